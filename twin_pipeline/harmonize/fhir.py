"""FHIR R4 → harmonized twin tables, rebuilt in DuckDB SQL from ``raw.fhir_resource``.

Every build is a full rebuild from raw (idempotent: the same raw rows give the same content
hashes). The steps, each one function and one Dagster asset:

1. :func:`build_versions` — one current version per ``(resource_type, resource_id)``
   (``harmonized.fhir_resource``; newest ``meta.lastUpdated`` / ``meta.versionId``, then arrival
   order), older versions in ``harmonized.fhir_history``, exact duplicates counted, Bundle
   ``DELETE`` entries applied as ``deleted = true`` (never dropped), and the reference index
   (``Type/id``, ``urn:uuid`` fullUrls, ``Type?identifier=system|value``).
2. :func:`build_table` — one table per mapped resource type, columns from
   ``assets/ehr_fhir.yaml``; observations get canonical UCUM units (original kept beside),
   blood-pressure panels split into one row per component, and bad units, impossible values
   and unknown LOINC codes go to quarantine (stage ``harmonize``).
3. :func:`build_dangling` — ``harmonized.dangling_reference``: references whose target was
   missing when they arrived or is missing now; ``resolved`` turns true when it arrives.

:func:`conservation` and :func:`type_report` account for every raw record.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twin_pipeline.harmonize.fhir_spec import EHR_SPEC, Column, EhrSpec, TableSpec, load_spec
from twin_pipeline.harmonize.units import UnitError, linear_conversion, normalize_unit
from twin_pipeline.store import QuarantineRow, Store, sql_literal

RAW = "raw.fhir_resource"
CURRENT = "harmonized.fhir_resource"
HISTORY = "harmonized.fhir_history"
STATUS = "harmonized.fhir_record_status"
REF_INDEX = "harmonized.fhir_ref_index"
DANGLING = "harmonized.dangling_reference"
REFERENCES = "harmonized.fhir_reference"  # every reference of every table, for DANGLING
VERSION_TABLES = (CURRENT, HISTORY, STATUS, REF_INDEX)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# Every reference of every table. A row's own id and lineage key are (nearly) all distinct:
# stored uncompressed, they cost ~30% less to write (see Store.create_table_as).
REFERENCES_DDL = (
    f"CREATE TABLE IF NOT EXISTS {REFERENCES} (from_table VARCHAR, from_type VARCHAR, "
    "from_id VARCHAR USING COMPRESSION uncompressed, from_column VARCHAR, reference VARCHAR, "
    "ref_key VARCHAR, target_type VARCHAR, source_file VARCHAR, "
    "lineage_key VARCHAR USING COMPRESSION uncompressed)"
)
_REF_TARGET_RE = r"([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})(/_history/[^/]*)?$"


@dataclass
class TableStats:
    table: str
    rows: int = 0
    resources: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _macros(store: Store) -> None:
    con = store.con
    con.execute(
        "CREATE OR REPLACE TEMP MACRO fhir_ts(s) AS TRY_CAST(CASE WHEN length(s) = 4 "
        "THEN s || '-01-01' WHEN length(s) = 7 THEN s || '-01' ELSE s END AS TIMESTAMPTZ)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP MACRO fhir_date(s) AS TRY_CAST(CASE WHEN length(s) = 4 "
        "THEN s || '-01-01' WHEN length(s) = 7 THEN s || '-01' ELSE left(s, 10) END AS DATE)"
    )
    # A reference string in its lookup form: Type/id (history and base URL dropped),
    # urn:uuid:..., or Type?identifier=system|value.
    con.execute(
        "CREATE OR REPLACE TEMP MACRO fhir_ref_key(r) AS CASE "
        "WHEN r IS NULL THEN NULL "
        "WHEN r LIKE 'urn:%' OR contains(r, '?') THEN r "
        f"ELSE coalesce(nullif(regexp_extract(r, '{_REF_TARGET_RE}', 1), ''), r) END"
    )
    con.execute(
        "CREATE OR REPLACE TEMP MACRO fhir_ref_fallback_id(k) AS CASE "
        "WHEN k LIKE 'urn:uuid:%' THEN substr(k, 10) "
        "WHEN k LIKE 'urn:%' OR contains(k, '?') THEN NULL "
        "WHEN contains(k, '/') THEN split_part(k, '/', 2) ELSE NULL END"
    )


# -- skipping unchanged rebuilds -----------------------------------------------------------

BUILDS = "harmonized.fhir_build"  # step -> fingerprint of the inputs it was built from


@functools.cache
def _code_fingerprint() -> str:
    """The mapping code and spec: a change to either rebuilds everything."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in (
        here / "fhir.py",
        here / "fhir_spec.py",
        here / "units.py",
        here.parent / "sources" / "fhir.py",
        EHR_SPEC,
    ):
        h.update(f.read_bytes() if f.exists() else b"")
    return h.hexdigest()


def inputs_fingerprint(store: Store) -> str:
    """What every EHR table is a function of: the FHIR source files (path, sha256), the raw
    row count, the code and the spec. Deterministic, so the same data gives the same
    ``harmonized.fhir_build`` in any store."""
    row = store.con.execute(
        "SELECT coalesce(string_agg(path || ':' || sha256, ',' ORDER BY path), '') "
        "FROM governance.source_file WHERE kind = 'fhir'"
    ).fetchone()
    n = store.row_count(RAW) if store.table_exists(RAW) else -1
    material = f"{row[0] if row else ''}|{n}|{_code_fingerprint()}"
    return hashlib.sha256(material.encode()).hexdigest()


def _unchanged(store: Store, step: str, tables: Iterable[str]) -> bool:
    if not store.table_exists(BUILDS) or not all(store.table_exists(t) for t in tables):
        return False
    row = store.con.execute(f"SELECT fingerprint FROM {BUILDS} WHERE step = ?", [step]).fetchone()
    return row is not None and row[0] == inputs_fingerprint(store)


def _built(store: Store, step: str) -> None:
    store.con.execute(
        f"CREATE TABLE IF NOT EXISTS {BUILDS} (step VARCHAR PRIMARY KEY, fingerprint VARCHAR)"
    )
    store.con.execute(
        f"INSERT OR REPLACE INTO {BUILDS} VALUES (?, ?)", [step, inputs_fingerprint(store)]
    )


# -- 1. versions ---------------------------------------------------------------------------


def build_versions(store: Store, *, force: bool = False) -> dict[str, int]:
    """Current version, history, record status and reference index, from raw. Idempotent;
    skipped when its inputs did not change since the last build (``force`` rebuilds)."""
    con = store.con
    _macros(store)
    if not force and _unchanged(store, "versions", VERSION_TABLES):
        return _status_counts(store)
    if not store.table_exists(RAW):
        from twin_pipeline.sources.fhir import DDL

        con.execute(DDL)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _fhir_raw AS
        SELECT r.lineage_key, r.source_file, r.position, r.ordinal, r.record_hash,
               r.resource_type, r.resource_id, r.version_id, r.last_updated, r.full_url,
               coalesce(r.request_method = 'DELETE', false) AS is_delete,
               TRY_CAST(r.version_id AS BIGINT) AS vnum,
               f.first_seen, (f.file_rank << 32) + r.ordinal AS arrival
        FROM {RAW} r LEFT JOIN (
            SELECT s.path, sf.first_seen,
                   row_number() OVER (ORDER BY sf.first_seen NULLS FIRST, s.path) AS file_rank
            FROM (SELECT DISTINCT source_file AS path FROM {RAW}) s
            LEFT JOIN governance.source_file sf ON sf.path = s.path
        ) f ON f.path = r.source_file
        WHERE r.resource_type IS NOT NULL AND r.resource_id IS NOT NULL
    """)
    # Newest version first; among equal versions the content that arrived last; among exact
    # copies of that content the first to arrive (later copies are duplicates).
    order = (
        "last_updated DESC NULLS LAST, vnum DESC NULLS LAST, version_id DESC NULLS LAST, "
        "hash_last_arrival DESC, arrival ASC"
    )
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _fhir_ranked AS
        WITH _fhir_raw_m AS MATERIALIZED (FROM _fhir_raw WHERE NOT is_delete)
        SELECT *,
               row_number() OVER (PARTITION BY resource_type, resource_id ORDER BY {order}) AS rk,
               row_number() OVER (PARTITION BY resource_type, resource_id, record_hash
                                  ORDER BY {order}) AS hash_rk,
               count(*) FILTER (WHERE hash_first) OVER (PARTITION BY resource_type,
                                                         resource_id) AS versions_seen
        FROM (SELECT *, max(arrival) OVER (PARTITION BY resource_type, resource_id,
                                           record_hash) AS hash_last_arrival,
                     row_number() OVER (PARTITION BY resource_type, resource_id, record_hash
                                        ORDER BY arrival) = 1 AS hash_first
              FROM _fhir_raw_m)
    """)
    # A DELETE applies when it is newer than the current version: a later lastUpdated, or,
    # without one, a later arrival.
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _fhir_deleted AS
        SELECT c.resource_type, c.resource_id, true AS deleted
        FROM _fhir_ranked c JOIN _fhir_raw d
          ON d.is_delete AND d.resource_type = c.resource_type AND d.resource_id = c.resource_id
        WHERE c.rk = 1 AND (
              (d.last_updated IS NOT NULL AND c.last_updated IS NOT NULL
               AND d.last_updated >= c.last_updated)
           OR ((d.last_updated IS NULL OR c.last_updated IS NULL) AND d.arrival > c.arrival))
        GROUP BY ALL
    """)
    store.create_table_as(
        CURRENT,
        """
        SELECT c.resource_type, c.resource_id, c.version_id, c.last_updated,
               coalesce(d.deleted, false) AS deleted, c.record_hash, c.source_file,
               c.position, c.lineage_key, c.full_url,
               c.versions_seen
        FROM _fhir_ranked c
        LEFT JOIN _fhir_deleted d ON d.resource_type = c.resource_type
             AND d.resource_id = c.resource_id
        WHERE c.rk = 1
    """,
        plain=("record_hash", "lineage_key", "resource_id", "full_url"),
    )
    store.create_table_as(
        HISTORY,
        f"""
        SELECT h.resource_type, h.resource_id, h.version_id, h.last_updated, h.record_hash,
               h.source_file, h.position, h.lineage_key, c.lineage_key AS superseded_by,
               r.payload
        FROM _fhir_ranked h
        JOIN _fhir_ranked c ON c.resource_type = h.resource_type
             AND c.resource_id = h.resource_id AND c.rk = 1
        JOIN {RAW} r ON r.lineage_key = h.lineage_key AND r.source_file = h.source_file
        WHERE h.rk > 1 AND h.hash_rk = 1 AND h.record_hash <> c.record_hash
    """,
        plain=("record_hash", "lineage_key", "superseded_by"),
    )
    store.create_table_as(
        STATUS,
        """
        SELECT x.lineage_key, x.source_file, x.position, x.resource_type, x.resource_id,
               CASE WHEN x.rk = 1 THEN 'current'
                    WHEN x.record_hash = c.record_hash OR x.hash_rk > 1 THEN 'duplicate'
                    ELSE 'superseded' END AS status
        FROM _fhir_ranked x
        JOIN _fhir_ranked c ON c.resource_type = x.resource_type
             AND c.resource_id = x.resource_id AND c.rk = 1
        UNION ALL
        SELECT lineage_key, source_file, position, resource_type, resource_id, 'delete'
        FROM _fhir_raw WHERE is_delete
    """,
        plain=("lineage_key", "resource_id"),
    )
    store.create_table_as(
        REF_INDEX,
        f"""
        WITH keys AS (
            SELECT resource_type || '/' || resource_id AS ref, resource_type, resource_id
            FROM {CURRENT}
            UNION ALL
            SELECT full_url, resource_type, resource_id FROM _fhir_raw
            WHERE full_url IS NOT NULL AND NOT is_delete
            UNION ALL
            SELECT resource_type || '?identifier=' || coalesce(i.system, '') || '|' || i.value,
                   resource_type, resource_id
            FROM (SELECT resource_type, resource_id,
                         unnest(from_json(json_extract(payload, '$.identifier'),
                                          '[{{"system":"VARCHAR","value":"VARCHAR"}}]')) AS i
                  FROM {current_sql()}
                  -- only documents that can hold the key are parsed ('\\u': escaped keys)
                  WHERE contains(payload::VARCHAR, 'identifier')
                     OR contains(payload::VARCHAR, '\\u'))
            WHERE i.value IS NOT NULL
        )
        SELECT ref, min(resource_type) AS resource_type, min(resource_id) AS resource_id,
               count(DISTINCT resource_type || '/' || resource_id) AS candidates
        FROM keys WHERE ref IS NOT NULL GROUP BY ref
    """,
        plain=("ref", "resource_id"),
    )
    for t in ("_fhir_ranked", "_fhir_deleted"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    con.execute("DROP TABLE IF EXISTS _fhir_raw")
    _built(store, "versions")
    return _status_counts(store)


def _status_counts(store: Store) -> dict[str, int]:
    counts = dict(
        store.con.execute(f"SELECT status, count(*) FROM {STATUS} GROUP BY ALL").fetchall()
    )
    return {str(k): int(v) for k, v in counts.items()}


def current_sql(resource_type: str | None = None) -> str:
    """The current versions (of one type) with their payload, read from raw (not copied):
    raw joined to ``harmonized.fhir_resource`` on the row it chose (one raw row each)."""
    q = sql_literal(resource_type) if resource_type else ""
    t = f" AND c.resource_type = {q} AND r.resource_type = {q}" if resource_type else ""
    return (
        f"(SELECT r.resource_type, r.resource_id, r.version_id, r.last_updated, c.deleted, "
        f"r.record_hash, r.source_file, r.position, r.lineage_key, r.full_url, r.payload "
        f"FROM {CURRENT} c JOIN {RAW} r ON r.lineage_key = c.lineage_key "
        f"AND r.source_file = c.source_file{t})"
    )


# -- 2. tables -----------------------------------------------------------------------------


class _Paths:
    """Collects the scalar JSON paths of a query so the payload is parsed once per row:
    ``json_extract_string(p, [path, ...]) AS v`` and each column reads ``v[i]``."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> str:
        if path not in self.paths:
            self.paths.append(path)
        return f"v[{self.paths.index(path) + 1}]"

    def select(self) -> str:
        if not self.paths:
            return "NULL::VARCHAR[] AS v"
        return (
            "json_extract_string(payload, ["
            + ", ".join(sql_literal(x) for x in self.paths)
            + "]) AS v"
        )


def _coding(path: str, part: str, system: str | None, s: _Paths) -> str:
    if system:
        return (
            f"list_filter(CAST(json_extract(p, '{path}.coding') AS JSON[]), "
            f"x -> (x ->> '$.system') = {sql_literal(system)})[1] ->> '$.{part}'"
        )
    return s(f"{path}.coding[0].{part}")


def _ref_raw(col: Column, s: _Paths) -> str:
    path = col.path
    value = s(f"{path}.identifier.value")
    return (
        f"coalesce({s(f'{path}.reference')}, "
        f"CASE WHEN {value} IS NOT NULL THEN "
        f"{sql_literal(str(col.target))} || '?identifier=' || "
        f"coalesce({s(f'{path}.identifier.system')}, '') || '|' || {value} END)"
    )


def column_sql(col: Column, s: _Paths) -> str:
    """The DuckDB expression of one column over ``p`` (payload), ``v`` (scalar paths) and
    ``r`` (current row). A ref column gives its lookup key (resolved in a second step)."""
    path = str(col.path)
    k = col.kind
    if k == "id":
        return "r.resource_id"
    if k == "str":
        return s(path)
    if k == "bool":
        return f"TRY_CAST({s(path)} AS BOOLEAN)"
    if k == "int":
        return f"TRY_CAST({s(path)} AS BIGINT)"
    if k == "double":
        return f"TRY_CAST({s(path)} AS DOUBLE)"
    if k == "ts":
        return f"fhir_ts({s(path)})"
    if k == "date":
        return f"fhir_date({s(path)})"
    if k in ("code", "system", "display"):
        return _coding(path, k, col.system, s)
    if k == "identifier":
        cond = (
            f"(x ->> '$.system') = {sql_literal(col.system)}"
            if col.system
            else f"list_contains(json_extract_string(x, '$.type.coding[*].code'), "
            f"{sql_literal(str(col.type_code))})"
        )
        return (
            f"list_filter(CAST(json_extract(p, '$.identifier') AS JSON[]), x -> {cond})[1] "
            "->> '$.value'"
        )
    if k == "telecom":
        return (
            "list_filter(CAST(json_extract(p, '$.telecom') AS JSON[]), "
            f"x -> (x ->> '$.system') = {sql_literal(str(col.system))})[1] ->> '$.value'"
        )
    if k == "extension":
        v = (
            "list_filter(CAST(json_extract(p, '$.extension') AS JSON[]), "
            f"x -> (x ->> '$.url') = {sql_literal(str(col.url))})[1] ->> '$.{col.value}'"
        )
        return f"TRY_CAST({v} AS {col.type or 'VARCHAR'})"
    if k == "note_b64":
        return (
            f"coalesce(TRY(decode(from_base64({s('$.content[0].attachment.data')}))), "
            f"{s('$.text.div')})"
        )
    if k == "sql":
        return f"({col.expr})"
    if k == "ref":
        return f"fhir_ref_key({_ref_raw(col, s)})"
    raise AssertionError(k)  # pragma: no cover - the spec model restricts kinds


_TRAILER_COLS = ("version_id", "last_updated", "deleted", "source_file", "source_position",
                 "lineage_key")  # fmt: skip


def extract_sql(
    spec: TableSpec,
    columns: list[Column] | None = None,
    extra: Callable[[_Paths], str] | None = None,
) -> str:
    """Stage 1: one pass over the resources of the table's type, payload parsed once
    (``extra`` adds columns over the same parse: it gets the path collector)."""
    s = _Paths()
    cols = columns if columns is not None else spec.columns
    exprs = [f"{column_sql(c, s)} AS {c.name}" for c in cols]
    # the reference as written, for harmonized.fhir_reference / dangling_reference
    exprs += [f"{_ref_raw(c, s)} AS refraw_{c.name}" for c in cols if c.kind == "ref"]
    more = extra(s) if extra is not None else ""
    return (
        f"SELECT r.resource_id AS _rid, {', '.join(exprs)}{more}, r.version_id, "
        "r.last_updated, r.deleted, "
        "r.source_file, r.position AS source_position, r.lineage_key\n"
        f"FROM (SELECT *, payload AS p, {s.select()} FROM {current_sql(spec.resource)}) r"
    )


def resolve_sql(source: str, columns: list[Column], keep: tuple[str, ...] = ()) -> str:
    """Stage 2: ref keys resolved through the reference index (unresolved: id from the key)."""
    sel, joins = [], []
    for c in columns:
        if c.kind == "ref":
            a = f"ref_{c.name}"
            t = sql_literal(str(c.target))
            # only a reference to the column's target type fills it (subject: Group/1 is no
            # patient); an unresolved Type/id or urn:uuid still gives its id
            sel.append(
                f"CASE WHEN {a}.resource_type = {t} THEN {a}.resource_id "
                f"WHEN {a}.ref IS NULL AND (x.{c.name} LIKE {t} || '/%' "
                f"OR x.{c.name} LIKE 'urn:uuid:%') THEN fhir_ref_fallback_id(x.{c.name}) "
                f"END AS {c.name}"
            )
            joins.append(f"LEFT JOIN {REF_INDEX} {a} ON {a}.ref = x.{c.name}")
        else:
            sel.append(f"x.{c.name}")
    sel += [f"x.{k}" for k in (*keep, *_TRAILER_COLS)]
    return f"SELECT {', '.join(sel)} FROM {source} x " + " ".join(joins)


def _record_refs(store: Store, name: str, spec: TableSpec, columns: list[Column]) -> None:
    """Keep the table's references (from ``_x``) for :func:`build_dangling`."""
    con = store.con
    con.execute(REFERENCES_DDL)
    con.execute(f"DELETE FROM {REFERENCES} WHERE from_table = ?", [name])
    refs = [c for c in columns if c.kind == "ref"]
    if not refs:
        return
    items = ", ".join(
        f"{{'col': {sql_literal(c.name)}, 'target': {sql_literal(str(c.target))}, "
        f"'reference': x.refraw_{c.name}, 'key': x.{c.name}}}"
        for c in refs
    )
    con.execute(f"""
        INSERT INTO {REFERENCES}
        SELECT {sql_literal(name)}, {sql_literal(spec.resource)}, _rid, e.col, e.reference, e.key, e.target,
               source_file, lineage_key
        FROM (SELECT x.*, unnest([{items}]) AS e FROM _x x)
        WHERE e.reference IS NOT NULL AND NOT starts_with(e.reference, '#')  -- contained
    """)


def table_sql(spec: TableSpec) -> str:
    return resolve_sql(f"({extract_sql(spec)})", spec.columns)


def build_table(
    store: Store, name: str, spec: EhrSpec | None = None, *, force: bool = False
) -> TableStats:
    """Rebuild ``harmonized.<name>`` from the current versions. Needs :func:`build_versions`.
    Skipped when its inputs did not change since the last build (``force`` rebuilds)."""
    spec = spec or load_spec()
    tspec = spec.tables[name]
    _macros(store)
    qualified = f"harmonized.{name}"
    if not force and _unchanged(store, name, (qualified, REFERENCES)):
        return _table_stats(store, name)
    store.clear_quarantine("harmonize", qualified)
    if name == "observation":
        stats = _build_observation(store, spec)
        _built(store, name)
        return stats
    con = store.con
    con.execute(f"CREATE OR REPLACE TEMP TABLE _x AS {extract_sql(tspec)}")
    _record_refs(store, name, tspec, tspec.columns)
    store.create_table_as(
        qualified,
        f"{resolve_sql('_x', tspec.columns)} ORDER BY {tspec.key}",
        plain=(tspec.key, "lineage_key"),
    )
    con.execute("DROP TABLE IF EXISTS _x")
    _built(store, name)
    return _table_stats(store, name)


def _table_stats(store: Store, name: str) -> TableStats:
    qualified = f"harmonized.{name}"
    stats = TableStats(qualified, rows=store.row_count(qualified))
    row = store.con.execute(f"SELECT count(DISTINCT lineage_key) FROM {qualified}").fetchone()
    stats.resources = int(row[0]) if row else 0
    for rule, n in store.con.execute(
        "SELECT rule, count(*) FROM governance.quarantine WHERE stage = 'harmonize' "
        "AND table_name = ? GROUP BY ALL",
        [qualified],
    ).fetchall():
        stats.reasons[str(rule)] = int(n)
        stats.quarantined += int(n)
    return stats


def build_all(
    store: Store, spec: EhrSpec | None = None, *, force: bool = False
) -> dict[str, TableStats]:
    """Versions, every table and the dangling references, in the caller's transaction."""
    spec = spec or load_spec()
    with store.transaction():
        build_versions(store, force=force)
        out = {name: build_table(store, name, spec, force=force) for name in spec.tables}
        build_dangling(store, spec, force=force)
    return out


# -- observations --------------------------------------------------------------------------

_QTY = '{"value":"VARCHAR","unit":"VARCHAR","code":"VARCHAR","system":"VARCHAR"}'
_CODINGS = '[{"system":"VARCHAR","code":"VARCHAR","display":"VARCHAR"}]'


def _build_observation(store: Store, spec: EhrSpec) -> TableStats:
    con = store.con
    tspec = spec.tables["observation"]
    vocab = spec.observation.vocabulary
    known = sorted(vocab)
    panels = {c: e.components for c, e in vocab.items() if e.components}
    base = [c for c in tspec.columns if c.name not in ("code_system", "code", "display")]
    known_list = "[" + ", ".join(sql_literal(c) for c in known) + "]"
    panel_list = "[" + ", ".join(sql_literal(c) for c in sorted(panels)) + "]"

    # the three structured parts come from the same parse (as JSON text)
    def extra(s: _Paths) -> str:
        return (
            f", from_json({s('$.code.coding')}, '{_CODINGS}') AS codings, "
            f"from_json({s('$.valueQuantity')}, '{_QTY}') AS vq, "
            f"{s('$.component')} AS components"
        )

    con.execute(f"CREATE OR REPLACE TEMP TABLE _x AS {extract_sql(tspec, base, extra)}")
    _record_refs(store, "observation", tspec, base)
    # One row per resource with the chosen LOINC coding (first coding whose code we know).
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _obs AS
        SELECT * EXCLUDE (codings),
               list_filter(codings, c -> c.system = {sql_literal(LOINC)}
                           AND list_contains({known_list}, c.code))[1] AS chosen,
               list_transform(codings, c -> coalesce(c.system, '?') || '|'
                              || coalesce(c.code, '?')) AS all_codes
        FROM ({resolve_sql("_x", base, keep=("codings", "vq", "components"))})
    """)
    con.execute("DROP TABLE IF EXISTS _x")
    # Candidate rows: plain observations, and one per component of a known panel.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _obs_rows AS
        SELECT o.* EXCLUDE (vq, components, chosen, all_codes),
               o.chosen.system AS code_system, o.chosen.code AS code,
               o.chosen.display AS display, NULL::VARCHAR AS component_code,
               NULL::VARCHAR AS component_display,
               o.vq.value AS original_value, o.vq.code AS q_code, o.vq.unit AS q_unit,
               o.vq.system AS q_system, 0 AS component_index,
               CASE WHEN o.chosen IS NULL THEN 'unknown_code' END AS rule,
               CASE WHEN o.chosen IS NULL THEN 'no known LOINC code among '
                    || array_to_string(o.all_codes, ', ') END AS reason
        FROM _obs o
        WHERE o.chosen IS NULL OR NOT list_contains({panel_list}, o.chosen.code)
        UNION ALL
        SELECT o.* EXCLUDE (vq, components, chosen, all_codes),
               o.chosen.system, o.chosen.code, o.chosen.display,
               comp.cc.code, comp.cc.display,
               comp.c.valueQuantity.value, comp.c.valueQuantity.code, comp.c.valueQuantity.unit,
               comp.c.valueQuantity.system, comp.idx,
               CASE WHEN comp.cc.code IS NULL THEN 'unknown_code' END,
               CASE WHEN comp.cc.code IS NULL THEN 'panel ' || o.chosen.code
                    || ' component without a known LOINC code' END
        FROM _obs o JOIN (
            SELECT lk, e.c AS c, e.idx AS idx,
                   list_filter(e.c.code.coding, x -> x.system = {sql_literal(LOINC)}
                               AND list_contains({known_list}, x.code))[1] AS cc
            FROM (SELECT o2.lineage_key AS lk,
                         unnest(list_transform(from_json(o2.components,
                             '[{{"code":{{"coding":{_CODINGS}}},"valueQuantity":{_QTY}}}]'),
                             (x, i) -> {{'c': x, 'idx': i}})) AS e
                  FROM _obs o2 WHERE o2.components IS NOT NULL
                    AND json_type(o2.components) = 'ARRAY')) comp
          ON comp.lk = o.lineage_key
        WHERE list_contains({panel_list}, o.chosen.code)
    """)
    # Panels whose components did not come through at all.
    con.execute(f"""
        INSERT INTO _obs_rows BY NAME
        SELECT o.* EXCLUDE (vq, components, chosen, all_codes),
               o.chosen.system AS code_system, o.chosen.code AS code,
               o.chosen.display AS display, 0 AS component_index,
               'unknown_code' AS rule, 'panel ' || o.chosen.code || ' has no components' AS reason
        FROM _obs o
        WHERE list_contains({panel_list}, o.chosen.code)
          AND (o.components IS NULL OR json_array_length(o.components) = 0)
    """)
    # Conversion coefficients for each (code, unit) pair present, computed by units.py.
    aliases = spec.observation.unit_aliases
    pairs = con.execute(
        "SELECT DISTINCT coalesce(component_code, code), q_code, q_unit FROM _obs_rows "
        "WHERE rule IS NULL"
    ).fetchall()
    conv: list[tuple[Any, ...]] = []
    for code, q_code, q_unit in pairs:
        entry = vocab[code]
        unit = normalize_unit(q_code or q_unit, aliases)
        if unit is None:
            conv.append((code, q_code, q_unit, None, None, None, "no unit"))
            continue
        try:
            a, b = linear_conversion(unit, str(entry.unit), molar_mass=entry.molar_mass)
        except UnitError as exc:
            conv.append((code, q_code, q_unit, unit, None, None, str(exc)))
            continue
        conv.append((code, q_code, q_unit, unit, a, b, None))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _obs_conv (code VARCHAR, q_code VARCHAR, q_unit VARCHAR, "
        "ucum VARCHAR, a DOUBLE, b DOUBLE, err VARCHAR)"
    )
    if conv:
        con.executemany("INSERT INTO _obs_conv VALUES (?,?,?,?,?,?,?)", conv)
    ranges = [(c, e.unit, e.min, e.max) for c, e in vocab.items() if e.unit is not None]
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _obs_vocab (code VARCHAR, unit VARCHAR, lo DOUBLE, hi DOUBLE)"
    )
    con.executemany("INSERT INTO _obs_vocab VALUES (?,?,?,?)", ranges)
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _obs_final AS
        WITH j AS (
            SELECT r.*, v.unit AS canonical_unit, v.lo, v.hi, k.ucum, k.a, k.b, k.err,
                   TRY_CAST(r.original_value AS DOUBLE) AS ov
            FROM _obs_rows r
            LEFT JOIN _obs_vocab v ON v.code = coalesce(r.component_code, r.code)
            LEFT JOIN _obs_conv k ON k.code = coalesce(r.component_code, r.code)
                 AND k.q_code IS NOT DISTINCT FROM r.q_code
                 AND k.q_unit IS NOT DISTINCT FROM r.q_unit
        ), v AS (
            SELECT *, round(a * ov + b, 6) AS cv FROM j
        )
        SELECT * EXCLUDE (rule, reason),
          CASE WHEN rule IS NOT NULL THEN rule
               WHEN ov IS NULL THEN 'impossible_value'
               WHEN err IS NOT NULL THEN 'bad_unit'
               WHEN (lo IS NOT NULL AND cv < lo) OR (hi IS NOT NULL AND cv > hi)
                    THEN 'impossible_value' END AS rule,
          CASE WHEN rule IS NOT NULL THEN reason
               WHEN ov IS NULL THEN 'LOINC ' || coalesce(component_code, code)
                    || ': no numeric valueQuantity.value'
               WHEN err IS NOT NULL THEN 'LOINC ' || coalesce(component_code, code) || ': unit '
                    || coalesce(q_code, q_unit, '(none)') || ' cannot be converted to '
                    || canonical_unit || ' (' || err || ')'
               WHEN (lo IS NOT NULL AND cv < lo) OR (hi IS NOT NULL AND cv > hi)
                    THEN 'LOINC ' || coalesce(component_code, code) || ': ' || original_value
                    || ' ' || coalesce(q_code, q_unit, '') || ' = ' || cv || ' '
                    || canonical_unit || ' outside the plausible range ['
                    || coalesce(lo::VARCHAR, '') || ', ' || coalesce(hi::VARCHAR, '') || ']'
               END AS reason
        FROM v
    """)
    bad = con.execute(f"""
        SELECT f.lineage_key, f.source_file, f.source_position,
               min(f.rule ORDER BY f.component_index) AS rule,
               string_agg(f.reason, '; ' ORDER BY f.component_index) AS reason,
               any_value(r.payload)::VARCHAR AS payload, any_value(f.observation_id)
        FROM _obs_final f JOIN {RAW} r ON r.lineage_key = f.lineage_key
             AND r.source_file = f.source_file
        WHERE f.rule IS NOT NULL GROUP BY ALL
    """).fetchall()
    cols = [c.name for c in tspec.columns if c.name not in ("code_system", "code", "display")]
    head = cols[:1]
    rest = cols[1:]
    store.create_table_as(
        "harmonized.observation",
        f"""
        SELECT {", ".join(head)}, code_system, code, display, component_code,
               component_display, cv AS value, canonical_unit AS unit,
               TRY_CAST(original_value AS DOUBLE) AS original_value,
               coalesce(q_code, q_unit) AS original_unit,
               {", ".join(rest)}, component_index,
               version_id, last_updated, deleted, source_file, source_position, lineage_key
        FROM _obs_final
        WHERE lineage_key NOT IN (SELECT lineage_key FROM _obs_final WHERE rule IS NOT NULL)
        ORDER BY observation_id, component_index
    """,
        plain=("observation_id", "lineage_key"),
    )
    qrows = [
        QuarantineRow(
            stage="harmonize",
            table_name="harmonized.observation",
            source_kind="fhir",
            source_file=sf,
            position=pos,
            rule=rule,
            reason=f"{sf} [{pos}] Observation/{oid}: {reason}",
            payload=payload,
            lineage_key=lk,
        )
        for lk, sf, pos, rule, reason, payload, oid in bad
    ]
    store.quarantine(qrows)
    for t in ("_obs", "_obs_rows", "_obs_conv", "_obs_vocab", "_obs_final"):
        con.execute(f"DROP TABLE IF EXISTS {t}")
    return _table_stats(store, "observation")


# -- 3. dangling references ------------------------------------------------------------------


def build_dangling(store: Store, spec: EhrSpec | None = None, *, force: bool = False) -> int:
    """Rebuild ``harmonized.dangling_reference`` (from, to, resolved) for every ref column.
    Needs the tables (they record their references); skipped when nothing changed."""
    spec = spec or load_spec()
    con = store.con
    _macros(store)
    if not force and _unchanged(store, "dangling", (DANGLING,)):
        return store.row_count(DANGLING)
    tables = "[" + ", ".join(sql_literal(n) for n in spec.tables) + "]"
    con.execute(REFERENCES_DDL)
    con.execute(f"""
        CREATE OR REPLACE TABLE {DANGLING} AS
        WITH refs AS (SELECT * FROM {REFERENCES} WHERE list_contains({tables}, from_table)),
        arrivals AS (
            SELECT s.resource_type, s.resource_id, min(sf.first_seen) AS first_seen
            FROM {STATUS} s LEFT JOIN governance.source_file sf ON sf.path = s.source_file
            WHERE s.status <> 'delete' GROUP BY ALL
        )
        SELECT refs.from_table, refs.from_type, refs.from_id, refs.from_column,
               refs.reference, refs.target_type,
               coalesce(ix.resource_id, fhir_ref_fallback_id(refs.ref_key)) AS target_id,
               ix.resource_id IS NOT NULL AS resolved,
               refs.source_file, refs.lineage_key
        FROM refs
        LEFT JOIN {REF_INDEX} ix ON ix.ref = refs.ref_key
        LEFT JOIN arrivals ta ON ta.resource_type = ix.resource_type
             AND ta.resource_id = ix.resource_id
        LEFT JOIN governance.source_file fs ON fs.path = refs.source_file
        WHERE refs.reference IS NOT NULL
          AND (ix.resource_id IS NULL OR ta.first_seen > fs.first_seen)
        ORDER BY ALL
    """)
    _built(store, "dangling")
    return store.row_count(DANGLING)


# -- accounting ------------------------------------------------------------------------------


def _mapped_keys_sql(spec: EhrSpec, store: Store) -> str:
    parts = [
        f"SELECT DISTINCT lineage_key FROM harmonized.{n}"
        for n in spec.tables
        if store.table_exists(f"harmonized.{n}")
    ]
    return " UNION ".join(parts) if parts else "SELECT NULL::VARCHAR AS lineage_key WHERE false"


def conservation(store: Store, spec: EhrSpec | None = None) -> list[dict[str, Any]]:
    """Per FHIR source file: records in = harmonized + quarantined + superseded + duplicate
    + deletes + raw_only (types without a table, kept in raw)."""
    spec = spec or load_spec()
    if not store.table_exists(STATUS):
        return []
    mapped = "[" + ", ".join(sql_literal(t) for t in spec.mapped_types) + "]"
    rows = store.con.execute(f"""
        WITH files AS (
            SELECT path, records_in FROM governance.source_file WHERE kind = 'fhir'
        ), mk AS ({_mapped_keys_sql(spec, store)}),
        -- quarantined after raw: by harmonization (units, codes, values) or by a data-quality
        -- expectation that removed the row from its table
        hq AS (SELECT DISTINCT lineage_key FROM governance.quarantine
               WHERE stage IN ('harmonize', 'quality') AND source_kind = 'fhir'
               AND lineage_key IS NOT NULL),
        st AS (
            SELECT s.source_file,
                   count(*) FILTER (WHERE s.status = 'current' AND mk.lineage_key IS NOT NULL)
                       AS harmonized,
                   count(*) FILTER (WHERE s.status = 'current' AND mk.lineage_key IS NULL
                                    AND hq.lineage_key IS NOT NULL) AS quarantined_harmonize,
                   count(*) FILTER (WHERE s.status = 'current' AND mk.lineage_key IS NULL
                                    AND hq.lineage_key IS NULL
                                    AND NOT list_contains({mapped}, s.resource_type)) AS raw_only,
                   count(*) FILTER (WHERE s.status = 'current' AND mk.lineage_key IS NULL
                                    AND hq.lineage_key IS NULL
                                    AND list_contains({mapped}, s.resource_type)) AS missing,
                   count(*) FILTER (WHERE s.status = 'superseded') AS superseded,
                   count(*) FILTER (WHERE s.status = 'duplicate') AS duplicate,
                   count(*) FILTER (WHERE s.status = 'delete') AS deletes
            FROM {STATUS} s
            LEFT JOIN mk ON mk.lineage_key = s.lineage_key
            LEFT JOIN hq ON hq.lineage_key = s.lineage_key
            GROUP BY ALL
        ), rq AS (
            SELECT source_file, count(*) AS n FROM governance.quarantine
            WHERE stage = 'read' AND source_kind = 'fhir' GROUP BY ALL
        )
        SELECT f.path, f.records_in, coalesce(st.harmonized, 0),
               coalesce(rq.n, 0) + coalesce(st.quarantined_harmonize, 0),
               coalesce(st.superseded, 0), coalesce(st.duplicate, 0),
               coalesce(st.deletes, 0), coalesce(st.raw_only, 0), coalesce(st.missing, 0)
        FROM files f LEFT JOIN st ON st.source_file = f.path
        LEFT JOIN rq ON rq.source_file = f.path
        ORDER BY f.path
    """).fetchall()
    out = []
    for path, n_in, harm, quar, sup, dup, dele, raw_only, missing in rows:
        accounted = harm + quar + sup + dup + dele + raw_only
        out.append(
            {
                "file": path,
                "in": int(n_in or 0),
                "harmonized": int(harm),
                "quarantined": int(quar),
                "superseded": int(sup),
                "duplicate": int(dup),
                "deletes": int(dele),
                "raw_only": int(raw_only),
                "unaccounted": int(missing),
                "balanced": int(n_in or 0) == accounted and missing == 0,
            }
        )
    return out


def type_report(store: Store, spec: EhrSpec | None = None) -> dict[str, dict[str, Any]]:
    """Per resource type: raw records, current resources, harmonized, quarantined with reasons,
    superseded/duplicate/deleted counts, and the table it maps to (None = kept in raw)."""
    spec = spec or load_spec()
    out: dict[str, dict[str, Any]] = {}
    if not store.table_exists(STATUS):
        return out
    mk = _mapped_keys_sql(spec, store)
    for rtype, status, n, harm in store.con.execute(f"""
        SELECT s.resource_type, s.status, count(*),
               count(*) FILTER (WHERE mk.lineage_key IS NOT NULL)
        FROM {STATUS} s LEFT JOIN ({mk}) mk ON mk.lineage_key = s.lineage_key
        GROUP BY ALL ORDER BY ALL
    """).fetchall():
        d = out.setdefault(
            rtype,
            {
                "table": spec.mapped_types.get(rtype),
                "raw": 0,
                "current": 0,
                "harmonized": 0,
                "superseded": 0,
                "duplicate": 0,
                "delete": 0,
                "quarantined": 0,
                "reasons": {},
            },
        )
        d["raw"] += int(n)
        d[status] += int(n)
        d["harmonized"] += int(harm)
    for payload_type, rule, n in store.con.execute(f"""
        SELECT coalesce(s.resource_type, TRY(json_extract_string(q.payload, '$.resourceType')),
                        '(not a resource)'),
               q.rule, count(DISTINCT q.source_file || '|' || q.position)
        FROM governance.quarantine q
        LEFT JOIN (SELECT DISTINCT lineage_key, resource_type FROM {STATUS}) s
               ON s.lineage_key = q.lineage_key
        WHERE q.source_kind = 'fhir' AND q.stage IN ('read', 'harmonize', 'quality')
        GROUP BY ALL
    """).fetchall():
        d = out.setdefault(
            payload_type,
            {
                "table": spec.mapped_types.get(payload_type),
                "raw": 0,
                "current": 0,
                "harmonized": 0,
                "superseded": 0,
                "duplicate": 0,
                "delete": 0,
                "quarantined": 0,
                "reasons": {},
            },
        )
        d["quarantined"] += int(n)
        d["reasons"][rule] = d["reasons"].get(rule, 0) + int(n)
    return out


def harmonized_tables(spec: EhrSpec | None = None) -> list[str]:
    spec = spec or load_spec()
    return [f"harmonized.{n}" for n in spec.tables]


def all_outputs(spec: EhrSpec | None = None) -> Iterable[str]:
    yield from VERSION_TABLES
    yield from harmonized_tables(spec)
    yield DANGLING
