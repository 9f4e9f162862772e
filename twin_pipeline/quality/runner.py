"""Run a suite over a store table: validate, quarantine failing rows, record results.

Steps for one suite (inside one store transaction):

1. Quality quarantine entries of this table that a rebuild re-created are dropped (they are
   evaluated again); entries for rows still removed stay, so reruns keep conservation.
2. GX expectations run on a DataFrame of the needed columns indexed by DuckDB ``rowid``;
   cross-table checks (``twin.*``) run in SQL.
3. Rows failing a ``row_level`` expectation go to ``governance.quarantine`` (stage
   ``quality``, rule = expectation name, with source file and position from the raw record of
   their lineage key) and are removed from the table.
4. Every expectation's outcome is written to ``governance.validation_result``. A failing
   ``error`` expectation that is not row-level is *blocking*; a failing ``warning`` is
   recorded and the pipeline continues.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twin_pipeline.quality import gx as gxa
from twin_pipeline.quality import results as res
from twin_pipeline.quality import sqlchecks, sqlengine
from twin_pipeline.quality.catalog import Catalog
from twin_pipeline.quality.gx import GXOutcome
from twin_pipeline.quality.results import ExpectationResult
from twin_pipeline.quality.suite import ExpectationSpec, Suite, resolve_tokens
from twin_pipeline.store import QuarantineRow, Store

STAGE = "quality"
#: From this many rows on, ``engine="auto"`` pushes expectations down into DuckDB. Zero:
#: always, since the push-down gives GX's results (tests compare both engines) without GX's
#: fixed cost per expectation; GX validates only what cannot be pushed down.
SQL_MIN_ROWS = 0
_COLUMN_KWARGS = ("column", "column_A", "column_B")
_LIST_KWARGS = ("column_list",)
#: A list parameter of row ids as a relation: a hash semi-join, where ``list_contains`` would
#: compare every row of the table with every id.
_IDS = "(SELECT unnest(?::BIGINT[]))"
_NAIVE_TIME_TYPES = ("DATE", "TIMESTAMP", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S")


@dataclass
class SuiteRun:
    """The outcome of one suite over one table."""

    suite: str
    table: str
    run_id: str
    rows_before: int
    rows_after: int
    results: list[ExpectationResult] = field(default_factory=list)
    quarantined_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def blocking(self) -> list[ExpectationResult]:
        return [r for r in self.results if r.blocking]

    @property
    def warnings(self) -> list[ExpectationResult]:
        return [r for r in self.results if not r.passed and r.severity == "warning"]

    @property
    def passed(self) -> bool:
        """No error-severity expectation still fails after quarantine."""
        return not self.blocking

    @property
    def clean(self) -> bool:
        """Every expectation passed as evaluated (nothing quarantined, no warnings)."""
        return all(r.passed for r in self.results)


def run_suite(
    store: Store,
    suite: Suite,
    *,
    as_of: datetime | None = None,
    now: datetime | None = None,
    quarantine: bool = True,
    record: bool = True,
    engine: str = "auto",
    catalog: Catalog | None = None,
) -> SuiteRun:
    """Validate ``suite.table``; quarantine row-level failures; record results. Atomic.

    ``engine``: ``gx`` validates a DataFrame in Great Expectations; ``sql`` pushes every
    expectation :mod:`.sqlengine` can compile down into DuckDB (the rest still run in GX);
    ``auto`` uses ``sql`` from :data:`SQL_MIN_ROWS` rows on. ``catalog``: the store's tables
    as read once for several suites (read here when not given).
    """
    if engine not in ("auto", "gx", "sql"):
        raise ValueError(f"engine must be auto, gx or sql, not {engine!r}")
    now = now or datetime.now(UTC)
    as_of = as_of or now
    table = suite.table
    timings: dict[str, float] = {}
    with store.transaction():
        catalog = catalog or Catalog(store)
        if not catalog.exists(table):
            return _missing_table(store, suite, record=record)
        if quarantine:
            _release_requarantinable(store, table, catalog)
        n_rows = store.row_count(table)
        outcomes: dict[str, GXOutcome] = {}
        t0 = time.perf_counter()
        gx_specs = [e for e in suite.expectations if e.is_gx]
        if gx_specs:
            use_sql = engine == "sql" or (engine == "auto" and n_rows >= SQL_MIN_ROWS)
            outcomes.update(
                _run_gx(
                    store,
                    suite,
                    gx_specs,
                    now=now,
                    as_of=as_of,
                    push_down=use_sql,
                    catalog=catalog,
                )
            )
        timings["gx_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for spec in suite.expectations:
            if spec.type == "twin.foreign_key":
                outcomes[spec.name] = sqlchecks.foreign_key(store, table, spec, n_rows, catalog)
            elif spec.type == "twin.column_types":
                outcomes[spec.name] = sqlchecks.column_types(store, table, spec, n_rows, catalog)
        timings["sql_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        failing: dict[str, list[int]] = {}
        row_specs = [
            s
            for s in suite.expectations
            if s.row_level
            and (out := outcomes.get(s.name)) is not None
            and not out.success
            and not out.error
        ]
        for spec in row_specs:
            if spec.keep != "first":
                failing[spec.name] = outcomes[spec.name].index
        # Duplicates: keep the first copy among rows that pass everything else.
        excluded = {i for ids in failing.values() for i in ids}
        for spec in row_specs:
            if spec.keep == "first":
                candidates = [i for i in outcomes[spec.name].index if i not in excluded]
                failing[spec.name] = _all_but_first(store, table, candidates, spec, catalog)
        quarantined: dict[str, int] = {}
        if quarantine and failing:
            quarantined = _quarantine(store, suite, failing, catalog)
        timings["quarantine_s"] = time.perf_counter() - t0

        # Conservation last: it must see this run's quarantine and removals.
        t0 = time.perf_counter()
        rows_after = store.row_count(table)
        for spec in suite.expectations:
            if spec.type == "twin.row_conservation":
                outcomes[spec.name] = sqlchecks.row_conservation(
                    store, table, spec, rows_after, catalog
                )
        timings["conservation_s"] = time.perf_counter() - t0

        results_list = [
            _result(
                suite,
                spec,
                outcomes[spec.name],
                quarantined.get(spec.name, 0),
                quarantine,
                _gx_config(spec, now=now, as_of=as_of),
            )
            for spec in suite.expectations
        ]
        if record:
            res.write(store, store.run_id, results_list)
    return SuiteRun(
        suite=suite.suite,
        table=table,
        run_id=store.run_id,
        rows_before=n_rows,
        rows_after=rows_after,
        results=results_list,
        quarantined_rows=n_rows - rows_after,
        timings=timings,
    )


def run_suites(
    store: Store,
    suites: Iterable[Suite],
    *,
    as_of: datetime | None = None,
    quarantine: bool = True,
    docs_dir: Path | None = None,
    engine: str = "auto",
) -> list[SuiteRun]:
    """Run several suites (skipping tables not in the store); optionally render Data Docs."""
    with store.transaction():
        catalog = Catalog(store)
        runs = [
            run_suite(store, s, as_of=as_of, quarantine=quarantine, engine=engine, catalog=catalog)
            for s in suites
            if catalog.exists(s.table)
        ]
    if docs_dir is not None and runs:
        from twin_pipeline.quality import docs

        docs.render(store, docs_dir)
    return runs


# -- GX -------------------------------------------------------------------------------------
def _meta(spec: ExpectationSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "severity": spec.severity,
        "row_level": spec.row_level,
        "why": spec.why,
    }


def _gx_config(spec: ExpectationSpec, *, now: datetime, as_of: datetime) -> dict[str, Any] | None:
    """What GX needs to rebuild the expectation as evaluated (for Data Docs), or None."""
    if not spec.is_gx:
        return None
    kwargs = resolve_tokens(spec.kwargs, now=now, as_of=as_of)
    return {"type": spec.type, "kwargs": kwargs, "meta": _meta(spec)}


def _columns_of(spec: ExpectationSpec, table_cols: list[str]) -> set[str]:
    cols: set[str] = set()
    for k in _COLUMN_KWARGS:
        v = spec.kwargs.get(k)
        if isinstance(v, str):
            cols.add(v)
    for k in _LIST_KWARGS:
        v = spec.kwargs.get(k)
        if isinstance(v, list):
            cols.update(str(x) for x in v)
    cond = spec.kwargs.get("row_condition")
    if isinstance(cond, str):
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", cond))
        cols.update(w for w in words if w in table_cols)
    return cols


def _run_gx(
    store: Store,
    suite: Suite,
    specs: list[ExpectationSpec],
    *,
    now: datetime,
    as_of: datetime,
    push_down: bool = False,
    catalog: Catalog | None = None,
) -> dict[str, GXOutcome]:
    """GX-typed expectations: pushed down into DuckDB where compilable (if ``push_down``),
    all in one scan of the table, the rest validated by GX on a DataFrame. GX is imported
    only if something runs in it."""
    catalog = catalog or Catalog(store)
    types = dict(catalog.columns(suite.table))
    table_cols = list(types)
    resolved = [resolve_tokens(s.kwargs, now=now, as_of=as_of) for s in specs]
    metas = [_meta(s) for s in specs]
    outcomes: dict[str, GXOutcome] = {}
    in_gx: list[int] = []
    plans: list[tuple[int, sqlengine.Compiled]] = []
    for i, (s, kw) in enumerate(zip(specs, resolved, strict=True)):
        plan = sqlengine.compile_expectation(s.type, kw, table_cols) if push_down else None
        if plan is None:
            in_gx.append(i)
        else:
            plans.append((i, plan))
    batch = sqlengine.run_batch(store, suite.table, [(specs[i].name, p) for i, p in plans])
    for i, _ in plans:
        outcomes[specs[i].name] = batch[specs[i].name]
    if in_gx:
        needs_all = any(specs[i].type.startswith("expect_table_column") for i in in_gx)
        wanted: set[str] = set(table_cols) if needs_all else set()
        for i in in_gx:
            wanted |= _columns_of(specs[i], table_cols)
        present = [c for c in table_cols if c in wanted]
        select = ", ".join(_select_expr(c, types[c]) for c in present)
        sql = f"SELECT rowid AS __rowid{', ' + select if select else ''} FROM {suite.table}"
        df = store.con.execute(sql).df().set_index("__rowid")
        df.index.name = None
        objs = [gxa.build_expectation(specs[i].type, resolved[i], metas[i]) for i in in_gx]
        for out in gxa.validate(suite.suite, objs, df, run_name=store.run_id):
            outcomes[out.name] = out
    return outcomes


def _select_expr(col: str, dtype: str) -> str:
    q = '"' + col.replace('"', '""') + '"'
    # Naive dates/times are compared with timezone-aware bounds: read them as UTC instants.
    if dtype.upper() == "DATE" or dtype.upper() in _NAIVE_TIME_TYPES:
        return f"timezone('UTC', CAST({q} AS TIMESTAMP)) AS {q}"
    return q


# -- quarantine ---------------------------------------------------------------------------
def _release_requarantinable(store: Store, table: str, catalog: Catalog) -> None:
    """Drop this table's quality quarantine entries whose rows a rebuild brought back (they
    are evaluated again now) or whose raw record is gone; keep the rest (rows still removed)."""
    held = store.con.execute(
        "SELECT count(*) FROM governance.quarantine WHERE stage = ? AND table_name = ?",
        [STAGE, table],
    ).fetchone()
    if not held or not held[0]:
        return  # nothing quarantined here yet (a first run): no lookups to pay for
    if "lineage_key" not in catalog.column_names(table):
        store.clear_quarantine(STAGE, table)
        return
    raw = catalog.raw_lookup_sql()
    gone = f"OR lineage_key NOT IN (SELECT lineage_key FROM ({raw}))" if raw else ""
    store.con.execute(
        f"DELETE FROM governance.quarantine WHERE stage = ? AND table_name = ? AND "
        f"(lineage_key IS NULL OR lineage_key IN (SELECT lineage_key FROM {table}) {gone})",
        [STAGE, table],
    )


def _all_but_first(
    store: Store, table: str, rowids: list[int], spec: ExpectationSpec, catalog: Catalog
) -> list[int]:
    """Of duplicate rows, all but the first per key (ordered by lineage key, then row id)."""
    if not rowids:
        return []
    keys = spec.kwargs.get("column_list") or [spec.kwargs.get("column")]
    part = ", ".join('"' + str(k) + '"' for k in keys)
    has_lk = "lineage_key" in catalog.column_names(table)
    order = "lineage_key, rowid" if has_lk else "rowid"
    rows = store.con.execute(
        f"SELECT rid FROM (SELECT rowid AS rid, row_number() OVER "
        f"(PARTITION BY {part} ORDER BY {order}) AS n FROM {table} "
        f"WHERE rowid IN {_IDS}) WHERE n > 1 ORDER BY rid",
        [rowids],
    ).fetchall()
    return [int(r[0]) for r in rows]


def _quarantine(
    store: Store, suite: Suite, failing: dict[str, list[int]], catalog: Catalog
) -> dict[str, int]:
    """Move failing rows to quarantine under each expectation's name; delete them."""
    table = suite.table
    all_ids = sorted({i for ids in failing.values() for i in ids})
    if not all_ids:
        return {}
    cols = catalog.column_names(table)
    lk = "t.lineage_key" if "lineage_key" in cols else "NULL"
    raw = catalog.raw_lookup_sql()
    join = ""
    src = "NULL, NULL, NULL"
    if raw and "lineage_key" in cols:
        join = (
            f"LEFT JOIN (SELECT lineage_key, any_value(source_file) AS source_file, "
            f"any_value(position) AS position FROM ({raw}) WHERE lineage_key IN "
            f"(SELECT lineage_key FROM {table} WHERE rowid IN {_IDS}) GROUP BY lineage_key) r "
            f"ON r.lineage_key = t.lineage_key "
            f"LEFT JOIN governance.source_file f ON f.path = r.source_file"
        )
        src = "r.source_file, r.position, f.kind"
    rows = store.con.execute(
        f"SELECT t.rowid, {lk}, {src}, to_json(t)::VARCHAR FROM {table} t {join} "
        f"WHERE t.rowid IN {_IDS}",
        [all_ids, all_ids] if join else [all_ids],
    ).fetchall()
    by_id = {int(r[0]): r for r in rows}
    grouped: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    meta: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    counts: dict[str, int] = {}
    for name, ids in failing.items():
        spec = suite.expectation(name)
        counts[name] = len(ids)
        for rid in ids:
            _, lineage, source_file, position, kind, payload = by_id[rid]
            sf = source_file or f"table:{table}"
            pos = position or f"rowid:{rid}"
            key = (sf, pos, name)
            grouped[key].append(json.loads(payload))
            meta[key] = (lineage, kind, spec, _row_label(suite, json.loads(payload)))
    qrows = []
    for (sf, pos, name), payloads in grouped.items():
        lineage, kind, spec, label = meta[(sf, pos, name)]
        qrows.append(
            QuarantineRow(
                stage=STAGE,
                table_name=table,
                source_kind=kind or "unknown",
                source_file=sf,
                position=pos,
                rule=name,
                reason=f"{sf} [{pos}]: {table} {label} failed expectation {name} "
                f"({spec.type}): {spec.why}",
                payload=json.dumps(payloads[0] if len(payloads) == 1 else payloads, default=str),
                lineage_key=lineage,
            )
        )
    store.quarantine(qrows)
    store.con.execute(f"DELETE FROM {table} WHERE rowid IN {_IDS}", [all_ids])
    return counts


def _row_label(suite: Suite, row: dict[str, Any]) -> str:
    if not suite.row_id:
        return "row"
    return " ".join(f"{c}={row.get(c)}" for c in suite.row_id)


# -- results ------------------------------------------------------------------------------
def _result(
    suite: Suite,
    spec: ExpectationSpec,
    out: GXOutcome,
    quarantined: int,
    quarantine: bool,
    gx_config: dict[str, Any] | None = None,
) -> ExpectationResult:
    passed = out.success
    if passed:
        action = "none"
    elif spec.row_level and not out.error:
        # Dry runs (no quarantine) report what quarantine would take out, not a block.
        action = "quarantined" if quarantine else "would_quarantine"
    elif spec.severity == "error":
        action = "blocked"
    else:
        action = "recorded"
    observed = out.observed
    if out.error:
        observed = f"could not evaluate: {out.error}"
    elif observed is None:
        observed = f"{out.unexpected} of {out.evaluated} rows unexpected"
    return ExpectationResult(
        suite=suite.suite,
        table_name=suite.table,
        expectation=spec.name,
        expectation_type=spec.type,
        severity=spec.severity,
        row_level=spec.row_level,
        passed=passed,
        evaluated_rows=out.evaluated,
        failed_rows=out.unexpected,
        quarantined_rows=quarantined,
        action=action,
        observed=observed,
        gx_config=gx_config,
        error=out.error,
    )


def _missing_table(store: Store, suite: Suite, *, record: bool) -> SuiteRun:
    results_list = [
        ExpectationResult(
            suite=suite.suite,
            table_name=suite.table,
            expectation=spec.name,
            expectation_type=spec.type,
            severity=spec.severity,
            row_level=spec.row_level,
            passed=False,
            evaluated_rows=0,
            failed_rows=0,
            quarantined_rows=0,
            action="blocked" if spec.severity == "error" else "recorded",
            observed=f"table {suite.table} does not exist",
        )
        for spec in suite.expectations
    ]
    if record:
        res.write(store, store.run_id, results_list)
    return SuiteRun(suite.suite, suite.table, store.run_id, 0, 0, results_list)
