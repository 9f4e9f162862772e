"""Expectation suites: the auditor-readable YAML files under ``expectations/``, validated.

One file per twin table. Each expectation names a Great Expectations 1.x expectation type
(snake case, e.g. ``expect_column_values_to_be_between``) or one of our cross-table checks
(``twin.foreign_key``, ``twin.row_conservation``, ``twin.column_types``) that a single
DataFrame cannot express, with its kwargs, a ``severity`` (``error`` blocks downstream assets,
``warning`` records and continues), ``row_level`` (failing rows are quarantined under the
expectation's name instead of failing the table) and a plain-language ``why``.

Kwarg values may be time tokens resolved when the suite runs: ``@now`` or ``@as_of`` with an
optional ISO-8601 duration offset, e.g. ``@now+PT1H`` or ``@as_of-P2D``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import EXPECTATIONS_DIR
from twin_pipeline.yamlfiles import safe_load

TWIN_TYPES = frozenset({"twin.foreign_key", "twin.row_conservation", "twin.column_types"})
# GX expectation types whose failures are individual rows (these may be row_level).
ROW_TYPES_GX = frozenset(
    {
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_null",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_in_set",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_match_strftime_format",
        "expect_column_values_to_be_dateutil_parseable",
        "expect_column_value_lengths_to_be_between",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_pair_values_to_be_equal",
        "expect_column_pair_values_to_be_in_set",
        "expect_compound_columns_to_be_unique",
        "expect_multicolumn_values_to_be_unique",
        "expect_select_column_values_to_be_unique_within_record",
    }
)
UNIQUE_TYPES = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_multicolumn_values_to_be_unique",
    }
)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TOKEN = re.compile(r"^@(now|as_of)(?:([+-])(P(?:\d+D)?(?:T(?:\d+H)?(?:\d+M)?(?:\d+S)?)?))?$")
_DURATION = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


class ExpectationSpec(BaseModel):
    """One expectation as an auditor reads it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    severity: Literal["error", "warning"]
    row_level: bool = False
    why: str = Field(min_length=10)
    # For uniqueness expectations: quarantine every copy but the first (by lineage_key).
    keep: Literal["none", "first"] = "none"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"expectation name {v!r} must be snake_case")
        return v

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v in TWIN_TYPES or re.match(r"^expect_[a-z0-9_]+$", v):
            return v
        raise ValueError(f"unknown expectation type {v!r}")

    @model_validator(mode="after")
    def _consistent(self) -> ExpectationSpec:
        if self.row_level and not (self.type in ROW_TYPES_GX or self.type == "twin.foreign_key"):
            raise ValueError(
                f"{self.name}: {self.type} has no failing rows; row_level must be false"
            )
        if self.keep == "first" and self.type not in UNIQUE_TYPES:
            raise ValueError(f"{self.name}: keep: first only applies to uniqueness expectations")
        for value in _walk(self.kwargs):
            if isinstance(value, str) and value.startswith("@") and not _TOKEN.match(value):
                raise ValueError(f"{self.name}: bad time token {value!r}")
        if self.type == "twin.foreign_key":
            _require(self, "column", "ref_table", "ref_column")
        if self.type == "twin.row_conservation":
            _require(self, "raw_table")
        if self.type == "twin.column_types":
            _require(self, "columns")
        return self

    @property
    def is_gx(self) -> bool:
        return self.type not in TWIN_TYPES


class Suite(BaseModel):
    """A suite: the expectations one twin table must meet."""

    model_config = ConfigDict(extra="forbid")

    suite: str
    table: str
    description: str = Field(min_length=10)
    owner: str = "team:data-engineering"
    # Columns that identify a row in reasons (e.g. observation_id).
    row_id: list[str] = Field(default_factory=list)
    expectations: list[ExpectationSpec] = Field(min_length=1)

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        if not re.match(r"^[a-z_]+\.[a-z_][a-z0-9_]*$", v):
            raise ValueError(f"table {v!r} must be schema.table")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Suite:
        seen: set[str] = set()
        for e in self.expectations:
            if e.name in seen:
                raise ValueError(f"expectation name {e.name!r} appears twice")
            seen.add(e.name)
        return self

    @property
    def asset_key(self) -> list[str]:
        return self.table.split(".")

    @property
    def has_errors(self) -> bool:
        return any(e.severity == "error" for e in self.expectations)

    def expectation(self, name: str) -> ExpectationSpec:
        for e in self.expectations:
            if e.name == name:
                return e
        raise KeyError(name)


def _require(spec: ExpectationSpec, *keys: str) -> None:
    missing = [k for k in keys if k not in spec.kwargs]
    if missing:
        raise ValueError(f"{spec.name}: {spec.type} needs kwargs {missing}")


def _walk(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _walk(v)]
    if isinstance(value, list):
        return [x for v in value for x in _walk(v)]
    return [value]


def load_suite(path: Path) -> Suite:
    try:
        doc = safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read suite: {exc}", path=str(path)) from exc
    try:
        return Suite.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"invalid suite: {exc}", path=str(path)) from exc


def load_suites(directory: Path | None = None) -> dict[str, Suite]:
    """Every suite under ``expectations/`` keyed by table (``schema.table``)."""
    directory = directory or EXPECTATIONS_DIR
    suites: dict[str, Suite] = {}
    for path in sorted(directory.glob("*.yaml")):
        suite = load_suite(path)
        if suite.table in suites:
            raise ConfigError(f"second suite for {suite.table}", path=str(path))
        suites[suite.table] = suite
    return suites


def parse_duration(text: str) -> timedelta:
    m = _DURATION.match(text)
    if not m or text in ("P", "PT"):
        raise ConfigError(f"bad ISO-8601 duration {text!r}")
    d, h, mi, s = (int(x) if x else 0 for x in m.groups())
    return timedelta(days=d, hours=h, minutes=mi, seconds=s)


def resolve_tokens(value: Any, *, now: datetime, as_of: datetime) -> Any:
    """Replace ``@now``/``@as_of`` tokens (with offsets) by timezone-aware datetimes; YAML
    dates and naive datetimes become UTC instants (tables are compared in UTC)."""
    if isinstance(value, dict):
        return {k: resolve_tokens(v, now=now, as_of=as_of) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_tokens(v, now=now, as_of=as_of) for v in value]
    if isinstance(value, str) and value.startswith("@"):
        m = _TOKEN.match(value)
        if not m:
            raise ConfigError(f"bad time token {value!r}")
        anchor = now if m.group(1) == "now" else as_of
        if m.group(2):
            delta = parse_duration(m.group(3))
            anchor = anchor + delta if m.group(2) == "+" else anchor - delta
        return anchor
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return value
