"""Role and user policies (``policies/roles.yaml``, ``policies/users.yaml``), validated on load.

The model follows Apache Ranger's vocabulary, which compliance auditors know:

* a role **reads** relations named by ``schema.table`` patterns (``deid.*``);
* **row filters** are SQL ``WHERE`` clauses attached to the tables they match; a filter may be
  a template that applies only to tables carrying given columns (``when_columns``), so one rule
  covers every table with a ``patient_id``;
* **column masks** replace a column's value by ``hash``, ``last4``, ``year_only``, ``null`` or
  ``redact`` for the tables and columns they match.

Nothing here touches the store: :mod:`twin_pipeline.policy.gateway` enforces the policy.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from twin_pipeline.errors import AccessDenied, ConfigError
from twin_pipeline.paths import POLICIES_DIR
from twin_pipeline.yamlfiles import safe_load

MaskKind = Literal["hash", "last4", "year_only", "null", "redact"]
_PATTERN = re.compile(r"^[a-z_*?][a-z0-9_*?]*\.[a-z_*?][a-z0-9_*?]*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _check_patterns(values: list[str]) -> list[str]:
    for v in values:
        if not _PATTERN.match(v):
            raise ValueError(f"{v!r} is not a 'schema.table' pattern (lower case, * and ? allowed)")
    return values


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RowFilter(_Strict):
    """A WHERE clause applied to every table it matches (all of them must hold)."""

    name: str
    tables: list[str] = Field(min_length=1)
    when_columns: list[str] = Field(default_factory=list)
    where: str = Field(min_length=1)
    description: str = ""

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)

    def applies(self, relation: str, columns: Sequence[str]) -> bool:
        if not any(fnmatch.fnmatchcase(relation, p) for p in self.tables):
            return False
        have = {c.lower() for c in columns}
        return all(c.lower() in have for c in self.when_columns)


class ColumnMask(_Strict):
    """Replace matching columns of matching tables by a masked value."""

    tables: list[str] = Field(min_length=1)
    columns: list[str] = Field(min_length=1)
    mask: MaskKind
    description: str = ""

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)

    def applies(self, relation: str, column: str) -> bool:
        return any(fnmatch.fnmatchcase(relation, p) for p in self.tables) and any(
            fnmatch.fnmatchcase(column.lower(), c.lower()) for c in self.columns
        )


class Role(_Strict):
    description: str
    read: list[str] = Field(default_factory=list)
    run_pipelines: bool = False
    catalog_views: bool = False  # information_schema / pg_catalog relations
    max_rows: int = Field(default=10_000, ge=1, le=10_000_000)
    row_filters: list[RowFilter] = Field(default_factory=list)
    masks: list[ColumnMask] = Field(default_factory=list)

    @field_validator("read")
    @classmethod
    def _read(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)

    def may_read(self, relation: str) -> bool:
        return any(fnmatch.fnmatchcase(relation, p) for p in self.read)

    def filters_for(self, relation: str, columns: Sequence[str]) -> list[RowFilter]:
        return [f for f in self.row_filters if f.applies(relation, columns)]

    def mask_for(self, relation: str, column: str) -> MaskKind | None:
        """The first matching mask wins (list specific rules before general ones)."""
        for m in self.masks:
            if m.applies(relation, column):
                return m.mask
        return None


class RolesFile(_Strict):
    version: Literal[1] = 1
    roles: dict[str, Role]

    @field_validator("roles")
    @classmethod
    def _names(cls, v: dict[str, Role]) -> dict[str, Role]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"bad role name {name!r}")
        if not v:
            raise ValueError("at least one role is needed")
        return v


class User(_Strict):
    role: str
    display_name: str = ""


class UsersFile(_Strict):
    version: Literal[1] = 1
    users: dict[str, User]


@dataclass(frozen=True)
class PolicySet:
    """Roles and users, cross-checked. Load with :func:`load_policies`."""

    roles: dict[str, Role]
    users: dict[str, User]
    roles_path: Path
    users_path: Path
    version: str  # sha256 of both files, recorded with audit entries

    def role_of(self, user: str) -> tuple[str, Role]:
        """The role name and role of ``user``; unknown users are refused."""
        u = self.users.get(user)
        if u is None:
            raise AccessDenied(
                f"unknown user {user!r} (users are defined in {self.users_path.name})",
                path=str(self.users_path),
            )
        return u.role, self.roles[u.role]


def _read_yaml(path: Path) -> Any:
    try:
        return safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError("policy file is missing", path=str(path)) from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read policy file: {exc}", path=str(path)) from exc


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def load_policies(directory: Path | None = None) -> PolicySet:
    """Load and validate ``roles.yaml`` and ``users.yaml`` (clear errors naming file and entry)."""
    directory = directory or POLICIES_DIR
    roles_path, users_path = directory / "roles.yaml", directory / "users.yaml"
    try:
        roles = RolesFile.model_validate(_read_yaml(roles_path) or {})
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc), path=str(roles_path)) from exc
    try:
        users = UsersFile.model_validate(_read_yaml(users_path) or {})
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc), path=str(users_path)) from exc
    for name, user in users.users.items():
        if user.role not in roles.roles:
            raise ConfigError(
                f"user {name!r} has unknown role {user.role!r} "
                f"(roles: {', '.join(sorted(roles.roles))})",
                path=str(users_path),
                position=f"users.{name}",
            )
    # Row filters must parse as SQL boolean expressions now, not at the first query.
    from twin_pipeline.policy.sqlcheck import check_filter_sql

    for rname, role in roles.roles.items():
        for f in role.row_filters:
            try:
                check_filter_sql(f.where)
            except ValueError as exc:
                raise ConfigError(
                    f"row filter {f.name!r}: {exc}",
                    path=str(roles_path),
                    position=f"roles.{rname}.row_filters",
                ) from exc
    digest = hashlib.sha256(roles_path.read_bytes() + b"\0" + users_path.read_bytes()).hexdigest()
    return PolicySet(dict(roles.roles), dict(users.users), roles_path, users_path, digest[:16])


def authorize_pipeline_run(user: str, policies: PolicySet | None = None) -> str:
    """The role of ``user`` if it may launch pipeline runs; :class:`AccessDenied` otherwise."""
    policies = policies or load_policies()
    role_name, role = policies.role_of(user)
    if not role.run_pipelines:
        raise AccessDenied(f"user {user!r} (role {role_name}) may not launch pipeline runs")
    return role_name
