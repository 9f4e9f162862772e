"""The twin model: DTDL-style interfaces loaded from ``assets/twin_model.yaml`` and validated.

Each interface has a versioned model id (``dtmi:twinpipeline:Patient;1``), properties, telemetry
and relationships, in the spirit of the Digital Twins Definition Language. Unlike plain DTDL, an
interface also says which store table its twins come from (``source``) and how each property and
relationship is read from that table (a column name or a SQL expression over the source row,
aliased ``s``). The model as a whole says whether twins are built from ``harmonized`` or
``deid`` tables. Everything is checked on load: ids, unique names, relationship targets, and
that every SQL fragment parses.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import sqlglot
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.yamlfiles import safe_load

DTMI_RE = re.compile(
    r"^dtmi:[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?(?::[A-Za-z](?:[A-Za-z0-9_]*[A-Za-z0-9])?)*;[1-9][0-9]{0,8}$"
)
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
SCHEMA_REF_RE = re.compile(r"\{schema\}\.([a-z][a-z0-9_]*)")
TABLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
DEFAULT_MODEL_PATH = ASSETS_DIR / "twin_model.yaml"

Schema = Literal["string", "integer", "double", "boolean", "date", "dateTime", "duration"]
SQL_TYPES: dict[str, str] = {
    "string": "VARCHAR",
    "integer": "BIGINT",
    "double": "DOUBLE",
    "boolean": "BOOLEAN",
    "date": "DATE",
    "dateTime": "TIMESTAMPTZ",
    "duration": "DOUBLE",
}


def _check_sql(expr: str, what: str) -> str:
    try:
        probe = expr.replace("{schema}", "harmonized")
        sqlglot.parse_one(f"SELECT {probe} FROM t AS s", read="duckdb")
    except sqlglot.errors.ParseError as exc:
        raise ValueError(f"{what}: SQL expression does not parse: {expr!r} ({exc})") from exc
    if ";" in expr:
        raise ValueError(f"{what}: SQL expression must not contain ';': {expr!r}")
    return expr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class PropertyDef(_Strict):
    """A property: a value read from the source row (column, or SQL expression over ``s``)."""

    name: str
    schema_: Schema = Field(alias="schema")
    column: str | None = None
    expr: str | None = None
    unit: str | None = None
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"bad content name {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> PropertyDef:
        if self.column and self.expr:
            raise ValueError(f"property {self.name}: give either column or expr, not both")
        if self.expr:
            _check_sql(self.expr, f"property {self.name}")
        return self

    @property
    def sql(self) -> str:
        """SQL expression for the value over the source row alias ``s``."""
        if self.expr:
            return self.expr
        return f's."{self.column or self.name}"'


class TelemetryDef(_Strict):
    """A stream of measurements about a twin; ``codes`` match observation codes (LOINC) and
    device metrics (IEEE 11073 MDC), so latest values can be read from either source."""

    name: str
    schema_: Schema = Field(alias="schema")
    unit: str
    codes: list[str] = Field(min_length=1)
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"bad content name {v!r}")
        return v


class ViaDef(_Strict):
    """A link table: rows (``from`` → ``to``) with an optional validity period."""

    table: str
    from_: str = Field(alias="from")
    to: str
    valid_from: str | None = None
    valid_to: str | None = None
    where: str | None = None

    @model_validator(mode="after")
    def _sql(self) -> ViaDef:
        if not TABLE_RE.match(self.table):
            raise ValueError(f"bad table name {self.table!r}")
        for label, e in (
            ("from", self.from_),
            ("to", self.to),
            ("valid_from", self.valid_from),
            ("valid_to", self.valid_to),
            ("where", self.where),
        ):
            if e:
                _check_sql(e, f"via.{label}")
        return self


class RelationshipDef(_Strict):
    """A directed, named link to twins of ``target`` interfaces, from a column of the source
    row (``column``/``expr``) or from a link table (``via``); optionally valid for a period."""

    name: str
    target: list[str] = Field(min_length=1)
    column: str | None = None
    expr: str | None = None
    via: ViaDef | None = None
    valid_from: str | None = None
    valid_to: str | None = None
    description: str = ""

    @field_validator("target", mode="before")
    @classmethod
    def _target_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_source(self) -> RelationshipDef:
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad relationship name {self.name!r}")
        given = [x for x in (self.column, self.expr, self.via) if x is not None]
        if len(given) != 1:
            raise ValueError(f"relationship {self.name}: give exactly one of column, expr, via")
        for label, e in (
            ("expr", self.expr),
            ("valid_from", self.valid_from),
            ("valid_to", self.valid_to),
        ):
            if e:
                _check_sql(e, f"relationship {self.name}.{label}")
        return self

    @property
    def sql(self) -> str:
        if self.expr:
            return self.expr
        return f's."{self.column}"'


class SourceDef(_Strict):
    """Where an interface's twins come from: one table of the model's source schema."""

    table: str
    key: str
    where: str | None = None

    @model_validator(mode="after")
    def _sql(self) -> SourceDef:
        if not TABLE_RE.match(self.table):
            raise ValueError(f"bad table name {self.table!r}")
        _check_sql(self.key, "source.key")
        if self.where:
            _check_sql(self.where, "source.where")
        return self

    @property
    def key_sql(self) -> str:
        return self.key if not NAME_RE.match(self.key) else f's."{self.key}"'


class InterfaceDef(_Strict):
    id: str = Field(alias="@id")
    name: str
    display_name: str = ""
    description: str = ""
    source: SourceDef
    properties: list[PropertyDef] = Field(default_factory=list)
    telemetry: list[TelemetryDef] = Field(default_factory=list)
    relationships: list[RelationshipDef] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> InterfaceDef:
        if not DTMI_RE.match(self.id):
            raise ValueError(
                f"interface {self.name}: @id {self.id!r} is not a versioned DTMI "
                "(dtmi:<segment>(:<segment>)*;<version>)"
            )
        if not NAME_RE.match(self.name):
            raise ValueError(f"bad interface name {self.name!r}")
        seen: set[str] = set()
        for n in [
            *(p.name for p in self.properties),
            *(t.name for t in self.telemetry),
            *(r.name for r in self.relationships),
        ]:
            if n in seen:
                raise ValueError(f"interface {self.name}: content name {n!r} is used twice")
            seen.add(n)
        return self

    @property
    def version(self) -> int:
        return int(self.id.rsplit(";", 1)[1])


class TwinModel(_Strict):
    """The whole twin model file."""

    model_id: str = Field(alias="@id")
    description: str = ""
    source_schema: Literal["harmonized", "deid"]
    interfaces: list[InterfaceDef] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TwinModel:
        if not DTMI_RE.match(self.model_id):
            raise ValueError(f"model @id {self.model_id!r} is not a versioned DTMI")
        names = [i.name for i in self.interfaces]
        ids = [i.id for i in self.interfaces]
        for label, values in (("name", names), ("@id", ids)):
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise ValueError(f"interface {label} used more than once: {sorted(dup)}")
        known = set(names)
        for iface in self.interfaces:
            for rel in iface.relationships:
                missing = [t for t in rel.target if t not in known]
                if missing:
                    raise ValueError(
                        f"interface {iface.name}, relationship {rel.name}: unknown target "
                        f"interface(s) {missing}"
                    )
        return self

    @cached_property
    def by_name(self) -> dict[str, InterfaceDef]:
        return {i.name: i for i in self.interfaces}

    def interface(self, name: str) -> InterfaceDef:
        try:
            return self.by_name[name]
        except KeyError:
            raise ConfigError(
                f"no interface {name!r} in the twin model (have: {', '.join(self.by_name)})"
            ) from None

    def source_tables(self) -> list[str]:
        """Every table the model reads, qualified with the source schema."""
        tables: set[str] = set()
        exprs: list[str] = []
        for i in self.interfaces:
            tables.add(i.source.table)
            exprs += [i.source.key, i.source.where or ""]
            exprs += [p.expr or "" for p in i.properties]
            for r in i.relationships:
                exprs += [r.expr or "", r.valid_from or "", r.valid_to or ""]
                if r.via:
                    tables.add(r.via.table)
                    exprs.append(r.via.where or "")
        for e in exprs:
            tables.update(SCHEMA_REF_RE.findall(e))
        return sorted(f"{self.source_schema}.{t}" for t in tables)

    def relationship_names(self) -> list[str]:
        return sorted({r.name for i in self.interfaces for r in i.relationships})


def load_model(path: Path | None = None) -> TwinModel:
    """Read and validate the twin model; errors name the file and the offending entry."""
    path = path or DEFAULT_MODEL_PATH
    try:
        doc = safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("twin model file not found", path=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=str(path)) from exc
    if not isinstance(doc, dict):
        raise ConfigError("twin model must be a mapping", path=str(path))
    try:
        return TwinModel.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"invalid twin model ({exc.error_count()} error(s)); first at {loc or '<root>'}: "
            f"{first['msg']}",
            path=str(path),
            position=loc or None,
        ) from exc
