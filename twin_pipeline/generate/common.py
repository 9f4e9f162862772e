"""Shared helpers: deterministic ids, time formatting, streaming writers, identifiers."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from random import Random
from typing import IO, Any

from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.generate.vocab import TZ_OFFSET, UID_ROOT, City

JsonDict = dict[str, Any]


class GeneratorError(TwinPipelineError, ValueError):
    """Invalid generator arguments or output directory."""


def new_id(rng: Random) -> str:
    """A deterministic random UUID4 string drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def new_uid(rng: Random) -> str:
    """A deterministic DICOM UID under the 2.25 (UUID-derived) root."""
    return UID_ROOT + str(uuid.UUID(int=rng.getrandbits(128), version=4).int)


def reference_datetime(seed: int) -> datetime:
    """The fixed 'now' of a generated hospital, derived from the seed only."""
    return datetime(2024, 6, 1, 8, 0, 0) + timedelta(days=seed % 365)


def fhir_dt(dt: datetime) -> str:
    """FHIR dateTime/instant with the hospital's UTC offset, second precision."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + TZ_OFFSET


def dumps(obj: Any) -> str:
    """Compact deterministic JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Person:
    """A generated patient's demographics."""

    idx: int
    id: str
    mrn: str
    ssn: str
    given: str
    middle: str
    family: str
    gender: str
    birth_date: date
    age: int
    city: City
    street: str
    zip: str
    phone: str
    email: str
    consent: bool
    relative_given: str
    relative_relation: str
    relative_phone: str
    ip: str
    url: str

    @property
    def full_name(self) -> str:
        """'Given Family'."""
        return f"{self.given} {self.family}"

    def age_on(self, day: date) -> int:
        """Age in whole years on ``day``."""
        b = self.birth_date
        return day.year - b.year - ((day.month, day.day) < (b.month, b.day))


@dataclass(slots=True)
class Clinician:
    """A staff member named in notes and DICOM headers."""

    given: str
    family: str
    credential: str

    @property
    def full_name(self) -> str:
        """'Given Family'."""
        return f"{self.given} {self.family}"


@dataclass(slots=True)
class Identifiers:
    """Ordered, de-duplicated raw identifier values planted anywhere in the output."""

    names: dict[str, None] = field(default_factory=dict)
    mrns: dict[str, None] = field(default_factory=dict)
    phones: dict[str, None] = field(default_factory=dict)
    ssns: dict[str, None] = field(default_factory=dict)
    emails: dict[str, None] = field(default_factory=dict)
    addresses: dict[str, None] = field(default_factory=dict)
    birth_dates: dict[str, None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, list[str]]:
        """Lists in first-planted order."""
        return {
            "names": list(self.names),
            "mrns": list(self.mrns),
            "phones": list(self.phones),
            "ssns": list(self.ssns),
            "emails": list(self.emails),
            "addresses": list(self.addresses),
            "birth_dates": list(self.birth_dates),
        }


class LineWriter:
    """Lazily opened text file that counts the lines written (1-based positions)."""

    def __init__(self, path: Path, header: str | None = None) -> None:
        self.path = path
        self.header = header
        self.lines = 0
        self._fh: IO[str] | None = None

    def write(self, line: str) -> int:
        """Append one line (no trailing newline in ``line``); return its 1-based number."""
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", encoding="utf-8", newline="\n")
            if self.header is not None:
                self._fh.write(self.header + "\n")
                self.lines = 1
        self._fh.write(line)
        self._fh.write("\n")
        self.lines += 1
        return self.lines

    def close(self) -> None:
        """Close the file if it was opened."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
