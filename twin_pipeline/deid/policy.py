"""The de-identification policy (``policies/deid.yaml``): pydantic models, loading, coverage.

A policy names, for every column of every harmonized table, one action:

==============  ==============================================================================
keep            released as is
drop            not released
pseudonymize    keyed HMAC-SHA256 surrogate (hex), stable for one key version; ``domain``
                decides which columns share surrogates (joins survive)
uid             DICOM UID remapped under the 2.25 root from the same HMAC (PS3.15 action U)
date_shift      moved by the patient's offset (one per patient, from the key), intervals kept
generalize      ``zip3`` (Safe Harbor restricted areas -> 000), ``age90`` (> 89 -> "90+"),
                ``year`` (birth date -> year; withheld when that year implies an age over 89)
redact_text     free text through the Presidio engine (consistent surrogates per patient)
==============  ==============================================================================

A table can instead be withheld whole (``release: false`` with a reason). A harmonized column
with no rule stops the run (:class:`PolicyViolation` naming ``table.column``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError, PolicyViolation
from twin_pipeline.paths import POLICIES_DIR
from twin_pipeline.yamlfiles import safe_load

POLICY_FILE = POLICIES_DIR / "deid.yaml"
Action = Literal["keep", "drop", "pseudonymize", "uid", "date_shift", "generalize", "redact_text"]
SAFE_HARBOR_CATEGORIES = (
    "A_names",
    "B_geographic_subdivisions",
    "C_dates_and_ages_over_89",
    "D_telephone_numbers",
    "E_fax_numbers",
    "F_email_addresses",
    "G_social_security_numbers",
    "H_medical_record_numbers",
    "I_health_plan_beneficiary_numbers",
    "J_account_numbers",
    "K_certificate_license_numbers",
    "L_vehicle_identifiers",
    "M_device_identifiers_serial_numbers",
    "N_urls",
    "O_ip_addresses",
    "P_biometric_identifiers",
    "Q_full_face_photographs",
    "R_other_unique_identifiers",
)
_STRICT = ConfigDict(extra="forbid")


class ColumnRule(BaseModel):
    model_config = _STRICT

    action: Action
    domain: str | None = None  # pseudonymize: surrogate namespace (defaults to the column name)
    length: int = Field(default=24, ge=12, le=64)
    to: Literal["zip3", "age90", "year"] | None = None  # generalize
    rename: str | None = None  # output column name (e.g. birth_date -> birth_year)
    annex_e: str | None = None  # DICOM PS3.15 Table E.1-1 action code this rule implements
    note: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ColumnRule:
        if self.action == "generalize" and self.to is None:
            raise ValueError("generalize needs `to: zip3 | age90 | year`")
        if self.action != "generalize" and self.to is not None:
            raise ValueError("`to` only applies to generalize")
        return self


class PersonRef(BaseModel):
    """How to find the patient of a row: a column, optionally looked up in another table."""

    model_config = _STRICT

    column: str
    via_table: str | None = None  # harmonized table holding `via_key` and `via_patient`
    via_key: str | None = None
    via_patient: str = "patient_id"


class AddedColumn(BaseModel):
    """A column the policy adds: a constant, or a flag raised unless a column equals a value."""

    model_config = _STRICT

    value: str | None = None
    flag_unless: tuple[str, str] | None = None  # (column, value) -> TRUE unless column = value
    note: str | None = None

    @model_validator(mode="after")
    def _one(self) -> AddedColumn:
        if (self.value is None) == (self.flag_unless is None):
            raise ValueError("give exactly one of `value` or `flag_unless`")
        return self


class TableRule(BaseModel):
    model_config = _STRICT

    release: bool = True
    reason: str | None = None  # why a table is withheld
    person: PersonRef | None = None
    columns: dict[str, ColumnRule] = Field(default_factory=dict)
    add: dict[str, AddedColumn] = Field(default_factory=dict)
    note: str | None = None

    @field_validator("columns", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"action": r} if isinstance(r, str) else r) for k, r in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self) -> TableRule:
        if not self.release:
            if not self.reason:
                raise ValueError("a withheld table (release: false) needs a reason")
            return self
        lk = self.columns.get("lineage_key")
        if lk is None or lk.action != "keep":
            raise ValueError("lineage_key must be kept (it is how deid rows trace to sources)")
        needs_person = [
            c
            for c, r in self.columns.items()
            if r.action in ("date_shift", "redact_text")
            or (r.action == "generalize" and r.to == "year")
        ]
        if needs_person and self.person is None:
            raise ValueError(f"columns {needs_person} need `person:` (whose offset/deny-list)")
        return self


class DateShift(BaseModel):
    model_config = _STRICT
    max_days: int = Field(default=365, ge=1, le=3650)


class DeidPolicy(BaseModel):
    model_config = _STRICT

    version: int
    key_kind: Literal["pseudonym"] = "pseudonym"
    date_shift: DateShift = Field(default_factory=DateShift)
    zip3_restricted: list[str]
    dicom: dict[str, str] = Field(default_factory=dict)
    safe_harbor: dict[str, list[str]]
    tables: dict[str, TableRule]

    @field_validator("zip3_restricted")
    @classmethod
    def _zip3(cls, v: list[str]) -> list[str]:
        for z in v:
            if len(z) != 3 or not z.isdigit():
                raise ValueError(f"zip3 entry {z!r} is not three digits")
        return v

    @model_validator(mode="after")
    def _safe_harbor(self) -> DeidPolicy:
        missing = [c for c in SAFE_HARBOR_CATEGORIES if c not in self.safe_harbor]
        extra = [c for c in self.safe_harbor if c not in SAFE_HARBOR_CATEGORIES]
        if missing or extra:
            raise ValueError(f"safe_harbor categories: missing {missing}, unknown {extra}")
        return self

    # -- helpers ----------------------------------------------------------------------------
    def released_tables(self) -> list[str]:
        return [t for t, r in self.tables.items() if r.release]

    def rule(self, table: str, column: str) -> ColumnRule | None:
        t = self.tables.get(table)
        return t.columns.get(column) if t else None


@functools.lru_cache(maxsize=8)
def _parsed(path: str, stamp: tuple[int, int]) -> Any:
    """The YAML document of ``path`` as of ``stamp`` (mtime_ns, size): a pipeline run loads the
    policy once per de-identification step (~80 ms with the pure-Python SafeLoader each)."""
    return safe_load(Path(path).read_text(encoding="utf-8"))


def load_policy(path: Path | None = None) -> DeidPolicy:
    """The policy, validated afresh each call (callers get their own object); the parsed YAML
    is reused while the file's mtime and size are unchanged."""
    path = Path(path or POLICY_FILE)
    try:
        st = path.stat()
        data = copy.deepcopy(_parsed(str(path.resolve()), (st.st_mtime_ns, st.st_size)))
    except FileNotFoundError as exc:
        raise ConfigError("de-identification policy not found", path=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=str(path)) from exc
    try:
        return DeidPolicy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{loc}: {first['msg']}", path=str(path)) from exc


def policy_sha256(path: Path | None = None) -> str:
    return hashlib.sha256(Path(path or POLICY_FILE).read_bytes()).hexdigest()


def check_coverage(policy: DeidPolicy, table: str, columns: list[str]) -> None:
    """Every actual column of ``harmonized.<table>`` needs a rule; the first gap stops the run."""
    rule = policy.tables.get(table)
    if rule is None:
        raise PolicyViolation(
            f"harmonized.{table} has no de-identification rule; add it to policies/deid.yaml",
            path=str(POLICY_FILE),
            position=f"tables.{table}",
        )
    if not rule.release:
        return
    missing = [c for c in columns if c not in rule.columns]
    if missing:
        names = ", ".join(f"{table}.{c}" for c in missing)
        raise PolicyViolation(
            f"column(s) without a de-identification rule: {names}",
            path=str(POLICY_FILE),
            position=f"tables.{table}.columns",
        )
