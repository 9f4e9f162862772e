"""Column masks and the per-relation policy subquery a table reference is rewritten into.

``relation_query`` turns one store relation into::

    SELECT c1, <mask>(c2) AS c2, ... FROM twin.<schema>.<table> AS __src WHERE <row filters>

Masks keep the column's name; ``hash`` and ``last4`` and ``redact`` return text, ``year_only``
keeps the type of date and time columns (1 January of the year), ``null`` keeps the type.
``hash`` is keyed with a salt derived from the store's pseudonym key, so hashed values join
across tables but cannot be recomputed from a guessed value outside the gateway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlglot
from sqlglot import exp

from twin_pipeline.policy.model import MaskKind, Role
from twin_pipeline.policy.sqlcheck import CATALOG, DIALECT, check_filter_sql

_TEXT_TYPE = re.compile(r"^(VARCHAR|TEXT|STRING|CHAR|BPCHAR|UUID)(\(\d+\))?$")
_TIME_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_S", "TIMESTAMP_MS")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def mask_sql(mask: MaskKind, column: str, data_type: str, salt: str) -> str:
    """SQL expression for one masked column (``column`` is the raw column name)."""
    c = f"__src.{_ident(column)}"
    t = data_type.upper()
    text = f"CAST({c} AS VARCHAR)"
    if mask == "null":
        return f"CAST(NULL AS {data_type})"
    if mask == "hash":
        return (
            f"CASE WHEN {c} IS NULL THEN NULL ELSE "
            f"'h:' || substr(sha256('{salt}' || {text}), 1, 24) END"
        )
    if mask == "last4":
        return (
            f"CASE WHEN {c} IS NULL THEN NULL ELSE "
            f"'***' || right(regexp_replace({text}, '[^0-9A-Za-z]', '', 'g'), 4) END"
        )
    if mask == "year_only":
        if t in _TIME_TYPES:
            return f"CAST(date_trunc('year', {c}) AS {data_type})"
        if _TEXT_TYPE.match(t):
            return f"left({c}, 4)"
        return f"CAST(NULL AS {data_type})"
    if mask == "redact":
        if _TEXT_TYPE.match(t):
            return f"CASE WHEN {c} IS NULL THEN NULL ELSE '[REDACTED]' END"
        return f"CAST(NULL AS {data_type})"
    raise ValueError(f"unknown mask {mask!r}")  # pragma: no cover - pydantic restricts it


def qualify_filter(where: str) -> tuple[exp.Expr, set[str]]:
    """A row filter with every table reference pinned to the twin catalog; and those tables."""
    node = check_filter_sql(where)
    tables: set[str] = set()
    for t in node.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier) or not t.db:
            raise ValueError(f"row filter tables must be schema-qualified: {t.sql(DIALECT)}")
        t.set("catalog", exp.to_identifier(CATALOG))
        # Store tables read by policy SQL carry aliases in the reserved "__" namespace, which
        # user queries cannot use; the gateway's DuckDB cross-check relies on it.
        if not t.alias:
            t.set("alias", exp.TableAlias(this=exp.to_identifier("__pol")))
        elif not t.alias.startswith("__"):
            raise ValueError(f"aliases in row filters must start with '__' (found {t.alias!r})")
        tables.add(f"{t.db.lower()}.{t.name.lower()}")
    return node, tables


def relation_query(
    relation: str,
    columns: Sequence[tuple[str, str]],
    role: Role,
    salt: str,
) -> tuple[exp.Select, dict[str, str], list[str], set[str]]:
    """The policy subquery for ``relation``.

    Returns the SELECT, the masks applied (column -> mask), the names of the row filters
    applied, and the store relations those filters read.
    """
    schema, table = relation.split(".", 1)
    items = []
    masks: dict[str, str] = {}
    for name, dtype in columns:
        mask = role.mask_for(relation, name)
        if mask is None:
            items.append(f"__src.{_ident(name)}")
        else:
            masks[name] = mask
            items.append(f"{mask_sql(mask, name, dtype, salt)} AS {_ident(name)}")
    sql = f"SELECT {', '.join(items) or 'NULL AS _none'} FROM {CATALOG}.{schema}.{table} AS __src"
    select = sqlglot.parse_one(sql, read=DIALECT)
    assert isinstance(select, exp.Select)
    filters = role.filters_for(relation, [c for c, _ in columns])
    reads: set[str] = set()
    conds = []
    for f in filters:
        cond, tables = qualify_filter(f.where)
        reads |= tables
        for col in cond.find_all(exp.Column):
            # unqualified columns outside the filter's own subqueries belong to the relation
            if not col.table and col.find_ancestor(exp.Select) is None:
                col.set("table", exp.to_identifier("__src"))
        conds.append(exp.paren(cond, copy=False))
    if conds:
        select = select.where(exp.and_(*conds), copy=False)
    return select, masks, [f.name for f in filters], reads
