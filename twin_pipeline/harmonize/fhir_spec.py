"""The declarative EHR mapping spec (``assets/ehr_fhir.yaml``), validated with pydantic.

It names the FHIR model package used for validation, the required bindings checked on top of
the models, every harmonized table with its columns (each a FHIR element and a kind of
extraction), and the observation vocabulary (canonical UCUM unit and plausibility range per
LOINC code, panel components).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.yamlfiles import safe_load

EHR_SPEC = ASSETS_DIR / "ehr_fhir.yaml"

ColumnKind = Literal[
    "id",
    "str",
    "bool",
    "int",
    "double",
    "ts",
    "date",
    "code",
    "system",
    "display",
    "ref",
    "identifier",
    "extension",
    "telecom",
    "note_b64",
    "sql",
]
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PATH = re.compile(r"^\$(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*$")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package: str
    version: str
    module: str
    fhir_version: str


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    kind: ColumnKind
    path: str | None = None
    target: str | None = None  # ref: the referenced resource type
    system: str | None = None  # identifier/telecom system, code preference
    type_code: str | None = None  # identifier type (v2-0203)
    url: str | None = None  # extension url
    value: str | None = None  # extension value[x] key
    type: str | None = None  # extension SQL type
    expr: str | None = None  # sql

    @model_validator(mode="after")
    def _check(self) -> Column:
        if not _NAME.match(self.name):
            raise ValueError(f"column name {self.name!r} is not snake_case")
        needs_path = {"str", "bool", "int", "double", "ts", "date", "code", "system", "display"}
        if self.kind in needs_path | {"ref"} and not self.path:
            raise ValueError(f"column {self.name}: kind {self.kind} needs a path")
        if self.path is not None and not _PATH.match(self.path):
            raise ValueError(f"column {self.name}: bad JSON path {self.path!r}")
        if self.kind == "ref" and not self.target:
            raise ValueError(f"column {self.name}: a ref needs a target resource type")
        if self.kind == "identifier" and not (self.system or self.type_code):
            raise ValueError(f"column {self.name}: identifier needs system or type_code")
        if self.kind == "telecom" and not self.system:
            raise ValueError(f"column {self.name}: telecom needs system")
        if self.kind == "extension" and not (self.url and self.value):
            raise ValueError(f"column {self.name}: extension needs url and value")
        if self.kind == "sql" and not self.expr:
            raise ValueError(f"column {self.name}: sql needs expr")
        return self


class TableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resource: str
    columns: list[Column]

    @property
    def key(self) -> str:
        return self.columns[0].name

    @model_validator(mode="after")
    def _check(self) -> TableSpec:
        if not self.columns or self.columns[0].kind != "id":
            raise ValueError(f"{self.resource}: the first column must be the id")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.resource}: duplicate column names")
        return self


class LoincEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    display: str
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    molar_mass: float | None = Field(default=None, gt=0)
    components: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> LoincEntry:
        if not self.components and self.unit is None:
            raise ValueError(f"{self.display}: a non-panel code needs a canonical unit")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.display}: min > max")
        return self


class ObservationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocabulary: dict[str, LoincEntry]
    unit_aliases: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ObservationSpec:
        from twin_pipeline.harmonize.units import UnitError, parse_unit

        for code, entry in self.vocabulary.items():
            for comp in entry.components:
                if comp not in self.vocabulary or self.vocabulary[comp].components:
                    raise ValueError(f"panel {code}: component {comp} is not a plain code")
            if entry.unit is not None:
                try:
                    parse_unit(entry.unit)
                except UnitError as exc:
                    raise ValueError(f"LOINC {code}: {exc}") from exc
        return self


class EhrSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelInfo
    required_bindings: dict[str, list[str]] = Field(default_factory=dict)
    tables: dict[str, TableSpec]
    observation: ObservationSpec

    @model_validator(mode="after")
    def _check(self) -> EhrSpec:
        seen: dict[str, str] = {}
        for name, t in self.tables.items():
            if not _NAME.match(name):
                raise ValueError(f"table name {name!r} is not snake_case")
            if t.resource in seen:
                raise ValueError(f"{t.resource} mapped twice ({seen[t.resource]}, {name})")
            seen[t.resource] = name
        for key in self.required_bindings:
            if key.count(".") != 1:
                raise ValueError(f"required binding {key!r} must be Resource.element")
        return self

    def table_of(self, resource_type: str) -> str | None:
        for name, t in self.tables.items():
            if t.resource == resource_type:
                return name
        return None

    @property
    def mapped_types(self) -> dict[str, str]:
        return {t.resource: name for name, t in self.tables.items()}


def load_spec_file(path: Path) -> EhrSpec:
    try:
        data = safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read EHR spec: {exc}", path=str(path)) from exc
    try:
        return EhrSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid EHR spec: {exc}", path=str(path)) from exc


@functools.cache
def load_spec(path: Path = EHR_SPEC) -> EhrSpec:
    """The validated spec (cached per path)."""
    return load_spec_file(path)
