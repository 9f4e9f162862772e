"""The snapshot policy (``policies/snapshot.yaml``) and cohort definitions (``assets/cohorts/``).

Both are YAML validated with pydantic before anything uses them; errors name the file and the
entry. A cohort narrows the released patients; the policy decides who may export what and the
disclosure control (k-anonymity over named quasi-identifiers).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import POLICIES_DIR
from twin_pipeline.yamlfiles import safe_load

_RELATION = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
_PATTERN = re.compile(r"^[a-z_*?][a-z0-9_*?]*\.[a-z_*?][a-z0-9_*?]*$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _relations(values: list[str]) -> list[str]:
    for v in values:
        if not _RELATION.match(v):
            raise ValueError(f"{v!r} is not a 'schema.table' name")
    return values


def _column(value: str) -> str:
    if not _COLUMN.match(value):
        raise ValueError(f"{value!r} is not a column name")
    return value


class Link(_Strict):
    """A table whose rows reach their patient through ``via`` (joined on ``key``)."""

    via: str
    key: str

    @field_validator("via")
    @classmethod
    def _via(cls, v: str) -> str:
        return _relations([v])[0]

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return _column(v)


class PatientSpec(_Strict):
    table: str = "deid.patient"
    key: str = "patient_id"
    consent_column: str = "research_consent"
    birth_year_column: str = "birth_year"
    gender_column: str = "gender"

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        return _relations([v])[0]

    @field_validator("key", "consent_column", "birth_year_column", "gender_column")
    @classmethod
    def _columns(cls, v: str) -> str:
        return _column(v)


class QuasiIdentifier(_Strict):
    """One quasi-identifier: released as ``name``, computed from ``source`` of the patient table."""

    name: str
    source: str
    generalize: Literal["none", "age_band", "zip3"] = "none"
    width: int = Field(default=10, ge=1, le=50)  # age_band: years per band
    top: int = Field(default=90, ge=1, le=130)  # age_band: this age and above are one band

    @field_validator("name", "source")
    @classmethod
    def _names(cls, v: str) -> str:
        return _column(v)


class KAnonymity(_Strict):
    k: int = Field(ge=1, le=1000)
    as_of_year: int = Field(ge=1900, le=2200)
    quasi_identifiers: list[QuasiIdentifier] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> KAnonymity:
        names = [q.name for q in self.quasi_identifiers]
        if len(set(names)) != len(names):
            raise ValueError(f"quasi-identifier names must be unique: {names}")
        return self


class ParquetSettings(_Strict):
    """Writer settings, fixed so that the same rows give the same bytes.

    ``order``: ``store`` writes each table's released rows in the store's order of the table
    (one DuckDB thread per file, so that order and the row-group boundaries never depend on
    scheduling): two exports of the same store give the same bytes. ``lineage_key`` sorts by
    lineage key, then every column: the bytes then depend only on the rows, even after a
    pipeline run rebuilds a table with the same content in another physical order, at about
    three times the CPU cost (the sort).
    """

    compression: Literal["zstd", "snappy"] = "zstd"
    compression_level: int | None = Field(default=1, ge=1, le=19)
    row_group_size: int = Field(default=131_072, ge=1_024, le=8_388_608)
    order: Literal["store", "lineage_key"] = "store"
    # 1: data pages v1, plain/dictionary encodings: every Parquet reader. 2: data pages v2 and
    # delta encodings (DuckDB PARQUET_VERSION V2): ~25% smaller, ~9% less CPU here, but older
    # readers (Spark < 3.3's vectorized reader, fastparquet) cannot read the delta encodings.
    format_version: Literal[1, 2] = 1


class SnapshotPolicy(_Strict):
    version: Literal[1] = 1
    roles: list[str] = Field(min_length=1)
    source_schema: str = "deid"
    tables: list[str] = Field(default_factory=lambda: ["deid.*"])
    reference_tables: list[str] = Field(default_factory=list)
    links: dict[str, Link] = Field(default_factory=dict)
    require_research_consent: bool = True
    exclude_deleted: bool = True
    patient: PatientSpec = PatientSpec()
    k_anonymity: KAnonymity
    parquet: ParquetSettings = ParquetSettings()

    @field_validator("tables")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _PATTERN.match(p):
                raise ValueError(f"{p!r} is not a 'schema.table' pattern")
        return v

    @field_validator("reference_tables")
    @classmethod
    def _refs(cls, v: list[str]) -> list[str]:
        return _relations(v)

    @model_validator(mode="after")
    def _same_schema(self) -> SnapshotPolicy:
        named = [self.patient.table, *self.reference_tables, *self.links]
        named += [link.via for link in self.links.values()]
        named += [p for p in self.tables if "*" not in p.split(".")[0]]
        for rel in named:
            if rel.split(".")[0] != self.source_schema:
                raise ValueError(
                    f"{rel} is outside source_schema {self.source_schema!r}: snapshots export "
                    "de-identified tables only"
                )
        return self


class CohortInclude(_Strict):
    """Who is in the cohort: every given criterion must hold (empty: every released patient)."""

    conditions: list[str] = Field(default_factory=list)  # codes, e.g. SNOMED CT
    condition_system: str | None = None  # e.g. http://snomed.info/sct; None matches any system
    age_min: int | None = Field(default=None, ge=0, le=130)
    age_max: int | None = Field(default=None, ge=0, le=130)
    gender: list[str] = Field(default_factory=list)

    @field_validator("gender", mode="before")
    @classmethod
    def _gender(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return [str(g).strip().lower() for g in v] if isinstance(v, list) else v

    @field_validator("conditions", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        if isinstance(v, str | int):
            v = [v]
        return [str(c).strip() for c in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _ages(self) -> CohortInclude:
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise ValueError(f"age_min {self.age_min} is above age_max {self.age_max}")
        return self


class Cohort(_Strict):
    name: str
    description: str = ""
    as_of_year: int | None = Field(default=None, ge=1900, le=2200)
    include: CohortInclude = CohortInclude()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError(f"cohort name {v!r}: letters, digits, '-', '_' and '.' only")
        return v


def _read_yaml(path: Path) -> Any:
    try:
        return safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError("file is missing", path=str(path)) from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read YAML: {exc}", path=str(path)) from exc


def _message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
    )


def policy_path(directory: Path | None = None) -> Path:
    return (directory or POLICIES_DIR) / "snapshot.yaml"


def load_snapshot_policy(path: Path | None = None) -> SnapshotPolicy:
    """Load and validate ``policies/snapshot.yaml``."""
    path = path or policy_path()
    try:
        return SnapshotPolicy.model_validate(_read_yaml(path) or {})
    except ValidationError as exc:
        raise ConfigError(_message(exc), path=str(path)) from exc


def load_cohort(path: Path) -> tuple[Cohort, str]:
    """A validated cohort and the sha256 of its file."""
    doc = _read_yaml(path)
    try:
        cohort = Cohort.model_validate(doc or {})
    except ValidationError as exc:
        raise ConfigError(_message(exc), path=str(path)) from exc
    return cohort, hashlib.sha256(path.read_bytes()).hexdigest()
