"""Materialize the twin graph (``twin.node``, ``twin.edge``) from the tables the model names.

Everything is SQL run inside the caller's store transaction. The builder tolerates a store that
is still being filled: a missing source table gives no twins of that interface, a missing column
gives NULL for that property, and each such gap is reported in :class:`GraphReport.warnings`.
Rebuilding from the same source rows gives the same content hash (no run-varying values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import duckdb

from twin_pipeline.store import Store, sql_literal
from twin_pipeline.twin.model import NAME_RE, SQL_TYPES, InterfaceDef, RelationshipDef, TwinModel

NODE_TABLE = "twin.twin.node"
EDGE_TABLE = "twin.twin.edge"
NODE_DDL = f"""
CREATE OR REPLACE TABLE {NODE_TABLE} (
    node_id VARCHAR NOT NULL,     -- '<Interface>/<source key>'
    twin_type VARCHAR NOT NULL,   -- interface name
    model_id VARCHAR NOT NULL,    -- versioned DTMI of the interface
    source_id VARCHAR NOT NULL,
    source_table VARCHAR NOT NULL,
    props JSON,
    lineage_key VARCHAR
)
"""
EDGE_DDL = f"""
CREATE OR REPLACE TABLE {EDGE_TABLE} (
    src VARCHAR NOT NULL,
    rel VARCHAR NOT NULL,
    dst VARCHAR NOT NULL,
    src_type VARCHAR NOT NULL,
    dst_type VARCHAR NOT NULL,
    valid_from TIMESTAMPTZ,       -- NULL: valid since always
    valid_to TIMESTAMPTZ,         -- NULL: still valid
    source_table VARCHAR NOT NULL,
    lineage_key VARCHAR
)
"""
# FHIR references may arrive as 'Patient/123' or 'urn:uuid:...'; twins are keyed by bare id.
_REF_PREFIX = r"^(?:[A-Za-z]+/|urn:uuid:)"


@dataclass
class GraphReport:
    nodes: dict[str, int] = field(default_factory=dict)
    edges: dict[str, int] = field(default_factory=dict)
    dangling: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)

    @property
    def node_count(self) -> int:
        return sum(self.nodes.values())

    @property
    def edge_count(self) -> int:
        return sum(self.edges.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "edges": self.edges,
            "dangling": self.dangling,
            "duplicates": self.duplicates,
            "warnings": self.warnings,
        }


def _col(expr: str) -> str:
    """A bare column name becomes ``s."name"``; anything else is an expression over ``s``."""
    return f's."{expr}"' if NAME_RE.match(expr) else expr


class _Builder:
    def __init__(self, store: Store, model: TwinModel) -> None:
        self.store = store
        self.con: duckdb.DuckDBPyConnection = store.con
        self.model = model
        self.schema = model.source_schema
        self.report = GraphReport()

    def sql(self, expr: str) -> str:
        return expr.replace("{schema}", self.schema)

    def table(self, name: str) -> str | None:
        qualified = f"{self.schema}.{name}"
        if not self.store.table_exists(qualified):
            return None
        if qualified not in self.report.inputs:
            self.report.inputs.append(qualified)
        return qualified

    def probe(self, table: str, expr: str) -> str | None:
        """None if ``expr`` binds against ``table s``, else the error's first line."""
        try:
            self.con.execute(f"SELECT {self.sql(expr)} FROM {table} AS s LIMIT 0")
        except duckdb.Error as exc:
            return str(exc).split("\n")[0]
        return None

    def has_column(self, table: str, column: str) -> bool:
        return any(c == column for c, _ in self.store.columns(table))

    # -- nodes -------------------------------------------------------------------------------
    def nodes(self, iface: InterfaceDef) -> None:
        self.report.nodes[iface.name] = 0
        src = self.table(iface.source.table)
        if src is None:
            self.report.warnings.append(
                f"{iface.name}: source table {self.schema}.{iface.source.table} does not exist; "
                "no twins of this interface"
            )
            return
        key = _col(iface.source.key)
        err = self.probe(src, key)
        if err:
            self.report.warnings.append(f"{iface.name}: key {iface.source.key!r}: {err}")
            return
        where = self.sql(iface.source.where) if iface.source.where else "TRUE"
        err = self.probe(src, where)
        if err:
            self.report.warnings.append(
                f"{iface.name}: filter cannot be applied ({err}); no twins of this interface"
            )
            return
        props: list[str] = []
        for p in iface.properties:
            sql_type = SQL_TYPES[p.schema_]
            err = self.probe(src, p.sql)
            if err:
                self.report.warnings.append(f"{iface.name}.{p.name}: NULL ({err})")
                value = f"NULL::{sql_type}"
            else:
                value = f"TRY_CAST({self.sql(p.sql)} AS {sql_type})"
            props.append(f"{sql_literal(p.name)}, {value}")
        props_sql = f"json_object({', '.join(props)})" if props else "json_object()"
        lk = "s.lineage_key" if self.has_column(src, "lineage_key") else "NULL::VARCHAR"
        order = "s.lineage_key" if lk != "NULL::VARCHAR" else "1"
        body = f"""
            FROM (SELECT s.*, CAST({self.sql(key)} AS VARCHAR) AS __key FROM {src} AS s
                  WHERE {where}) AS s
            WHERE s.__key IS NOT NULL
        """
        total_row = self.con.execute(f"SELECT count(*), count(DISTINCT s.__key) {body}").fetchone()
        total, distinct = (int(total_row[0]), int(total_row[1])) if total_row else (0, 0)
        if total > distinct:
            self.report.duplicates[iface.name] = total - distinct
        self.con.execute(
            f"""
            INSERT INTO {NODE_TABLE}
            SELECT {sql_literal(iface.name)} || '/' || s.__key, {sql_literal(iface.name)}, {sql_literal(iface.id)},
                   s.__key, {sql_literal(src)}, {props_sql}, {lk}
            {body}
            QUALIFY row_number() OVER (PARTITION BY s.__key ORDER BY {order}) = 1
            """
        )
        self.report.nodes[iface.name] = distinct

    # -- edges -------------------------------------------------------------------------------
    def edges(self, iface: InterfaceDef, rel: RelationshipDef) -> None:
        label = f"{iface.name}.{rel.name}"
        self.report.edges[label] = 0
        targets = ", ".join(sql_literal(t) for t in rel.target)
        if rel.via:
            src = self.table(rel.via.table)
            if src is None:
                self.report.warnings.append(
                    f"{label}: link table {self.schema}.{rel.via.table} does not exist; no edges"
                )
                return
            from_sql, to_sql = _col(rel.via.from_), _col(rel.via.to)
            vf_expr, vt_expr = rel.via.valid_from, rel.via.valid_to
            where = self.sql(rel.via.where) if rel.via.where else "TRUE"
        else:
            main = self.table(iface.source.table)
            if main is None:
                return
            src = main
            from_sql, to_sql = _col(iface.source.key), rel.sql
            vf_expr, vt_expr = rel.valid_from, rel.valid_to
            where = self.sql(iface.source.where) if iface.source.where else "TRUE"
        for what, e in (("source", from_sql), ("target", to_sql), ("filter", where)):
            err = self.probe(src, e)
            if err:
                self.report.warnings.append(f"{label}: {what} cannot be read ({err}); no edges")
                return
        vf, vt = "NULL::TIMESTAMPTZ", "NULL::TIMESTAMPTZ"
        for name, opt in (("valid_from", vf_expr), ("valid_to", vt_expr)):
            if not opt:
                continue
            col = _col(opt)
            err = self.probe(src, col)
            if err:
                self.report.warnings.append(f"{label}.{name}: NULL ({err})")
                continue
            if name == "valid_from":
                vf = f"TRY_CAST({self.sql(col)} AS TIMESTAMPTZ)"
            else:
                vt = f"TRY_CAST({self.sql(col)} AS TIMESTAMPTZ)"
        lk = "s.lineage_key" if self.has_column(src, "lineage_key") else "NULL::VARCHAR"
        base = f"""
            FROM (SELECT s.*, CAST({self.sql(from_sql)} AS VARCHAR) AS __from,
                         regexp_replace(CAST({self.sql(to_sql)} AS VARCHAR), '{_REF_PREFIX}', '')
                             AS __to,
                         {vf} AS __vf, {vt} AS __vt
                  FROM {src} AS s WHERE {where}) AS s
            JOIN {NODE_TABLE} n ON n.twin_type = {sql_literal(iface.name)} AND n.source_id = s.__from
        """
        self.con.execute(
            f"""
            INSERT INTO {EDGE_TABLE}
            SELECT DISTINCT n.node_id, {sql_literal(rel.name)}, d.node_id, n.twin_type, d.twin_type,
                   s.__vf, s.__vt, {sql_literal(src)}, {lk}
            {base}
            JOIN {NODE_TABLE} d ON d.twin_type IN ({targets}) AND d.source_id = s.__to
            """
        )
        row = self.con.execute(
            f"SELECT count(*) FROM {EDGE_TABLE} WHERE src_type = ? AND rel = ?",
            [iface.name, rel.name],
        ).fetchone()
        self.report.edges[label] = int(row[0]) if row else 0
        dangling = self.con.execute(
            f"""
            SELECT count(*) {base}
            WHERE s.__to IS NOT NULL AND NOT EXISTS (
                SELECT 1 FROM {NODE_TABLE} d
                WHERE d.twin_type IN ({targets}) AND d.source_id = s.__to)
            """
        ).fetchone()
        if dangling and dangling[0]:
            self.report.dangling[label] = int(dangling[0])


def build_graph(store: Store, model: TwinModel) -> GraphReport:
    """Rebuild ``twin.node`` and ``twin.edge`` (inside the caller's transaction)."""
    b = _Builder(store, model)
    with store.transaction():
        store.con.execute("CREATE SCHEMA IF NOT EXISTS twin.twin")
        store.con.execute(NODE_DDL)
        store.con.execute(EDGE_DDL)
        for iface in model.interfaces:
            b.nodes(iface)
        for iface in model.interfaces:
            for rel in iface.relationships:
                b.edges(iface, rel)
    return b.report


def ensure_graph_tables(store: Store) -> None:
    """Empty graph tables if none exist yet (so queries on a fresh store return nothing)."""
    store.con.execute("CREATE SCHEMA IF NOT EXISTS twin.twin")
    if not store.table_exists("twin.node"):
        store.con.execute(NODE_DDL)
    if not store.table_exists("twin.edge"):
        store.con.execute(EDGE_DDL)


def safe_ident(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ValueError(f"not an identifier: {name!r}")
    return name
