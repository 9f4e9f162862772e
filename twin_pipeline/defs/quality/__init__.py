"""Data-quality gates: one Dagster asset check per expectation suite (``expectations/*.yaml``).

The checks are the specs of one multi-asset check (one step, one store connection). A check
runs its suite on the table its asset wrote. Rows failing a row-level expectation
are quarantined (stage ``quality``) and removed inside the check's own store transaction, so
they do not fail the table; the check fails only when an ``error`` expectation still fails
afterwards (schema, conservation, a value that could not be evaluated). Suites with error
expectations are *blocking*: de-identification and the twin wait for them and do not run on
a failed gate. Each run of the checks is recorded in the ledger as an activity whose inputs
are the checked tables and whose outputs include ``governance.validation_result`` and
``governance.quarantine``, so validations appear in lineage. Results are recorded with each
expectation's GX configuration; Great Expectations renders them as Data Docs on demand
(``twin quality docs``), so a check step never pays GX's import.

Checks are only created for asset keys that some other stage defines (a check on an undefined
asset would break loading the code location).
"""

import importlib
import pkgutil
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from twin_pipeline import defs as defs_pkg
from twin_pipeline.activity import (
    ActivityRecord,
    code_version,
    input_versions,
    record_activity,
    table_versions,
)
from twin_pipeline.defs.common import launcher
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.quality.catalog import Catalog
from twin_pipeline.quality.runner import SuiteRun, run_suite
from twin_pipeline.quality.suite import Suite, load_suites

RESULT_TABLE = "governance.validation_result"


def defined_asset_keys() -> set[dg.AssetKey]:
    """Asset keys defined by the other stage packages."""
    keys: set[dg.AssetKey] = set()
    for mod in pkgutil.iter_modules(defs_pkg.__path__):
        if not mod.ispkg or mod.name == "quality":
            continue
        module = importlib.import_module(f"{defs_pkg.__name__}.{mod.name}")
        stage = getattr(module, "defs", None)
        if not isinstance(stage, dg.Definitions):
            continue
        for a in stage.assets or []:
            if isinstance(a, dg.AssetsDefinition):
                keys.update(a.keys)
            elif isinstance(a, dg.AssetSpec):
                keys.add(a.key)
    return keys


def _as_of() -> datetime | None:
    raw = dg.EnvVar("TWIN_AS_OF").get_value("") or ""
    if not raw:
        return None
    parsed = datetime.fromisoformat(raw)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _metadata(run: SuiteRun) -> dict[str, Any]:
    failed = [r for r in run.results if not r.passed]
    md: dict[str, Any] = {
        "expectations": dg.MetadataValue.int(len(run.results)),
        "failed_expectations": dg.MetadataValue.int(len(failed)),
        "rows_before": dg.MetadataValue.int(run.rows_before),
        "rows_after": dg.MetadataValue.int(run.rows_after),
        "quarantined_rows": dg.MetadataValue.int(run.quarantined_rows),
        "blocking_failures": dg.MetadataValue.json([r.expectation for r in run.blocking]),
        "warnings": dg.MetadataValue.json([r.expectation for r in run.warnings]),
        "seconds": dg.MetadataValue.float(round(sum(run.timings.values()), 3)),
    }
    if failed:
        md["failures"] = dg.MetadataValue.md(
            "| expectation | severity | failed rows | action |\n|---|---|---|---|\n"
            + "\n".join(
                f"| {r.expectation} | {r.severity} | {r.failed_rows} | {r.action} |" for r in failed
            )
        )
    return md


def _referenced(suite: Suite, existing: set[dg.AssetKey]) -> list[dg.AssetKey]:
    refs = {
        dg.AssetKey(str(e.kwargs["ref_table"]).split("."))
        for e in suite.expectations
        if e.type == "twin.foreign_key" and str(e.kwargs["ref_table"]) != suite.table
    }
    return sorted(refs & existing, key=lambda k: k.to_user_string())


def check_name(suite: Suite) -> str:
    return f"{suite.suite}_expectations"


def _order(suites: Sequence[Suite]) -> list[Suite]:
    """Referenced tables first, so rows quarantined there make their referrers orphans now."""
    by_table = {s.table: s for s in suites}
    done: list[Suite] = []
    seen: set[str] = set()

    def visit(s: Suite, stack: frozenset[str]) -> None:
        if s.table in seen or s.table in stack:
            return
        for e in s.expectations:
            ref = str(e.kwargs.get("ref_table", ""))
            if e.type == "twin.foreign_key" and ref in by_table:
                visit(by_table[ref], stack | {s.table})
        seen.add(s.table)
        done.append(s)

    for s in sorted(suites, key=lambda x: x.table):
        visit(s, frozenset())
    return done


def _result(suite: Suite, run: SuiteRun | None, error: str | None) -> dg.AssetCheckResult:
    key = dg.AssetKey(suite.asset_key)
    name = check_name(suite)
    if run is None:
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=name,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"error": dg.MetadataValue.text(error or "not evaluated")},
        )
    md = _metadata(run)
    if run.blocking:
        severity, passed = dg.AssetCheckSeverity.ERROR, False
    elif run.warnings:
        severity, passed = dg.AssetCheckSeverity.WARN, False
    else:
        severity, passed = dg.AssetCheckSeverity.ERROR, True
    return dg.AssetCheckResult(
        asset_key=key, check_name=name, passed=passed, severity=severity, metadata=md
    )


def build_checks(suites: Sequence[Suite], existing: set[dg.AssetKey]) -> dg.AssetChecksDefinition:
    """One multi-asset check evaluating one check per suite.

    Dagster runs it in as few steps as the asset graph allows (a step per group of assets
    built together); each step opens the store once, runs its suites in reference order
    (patients before the rows that point at them, so quarantine cascades in the same run) and
    records one activity in the ledger. A check also waits for the tables its foreign keys
    reference. Suites with error expectations are blocking.
    """
    chosen = [s for s in suites if dg.AssetKey(s.asset_key) in existing]
    specs = [
        dg.AssetCheckSpec(
            check_name(s),
            asset=dg.AssetKey(s.asset_key),
            # Referenced tables must be built before referential integrity is checked.
            additional_deps=_referenced(s, existing) or None,
            description=f"Expectation suite `{s.suite}` ({len(s.expectations)} expectations, "
            f"expectations/{s.suite}.yaml): {s.description}",
            blocking=s.has_errors,
            metadata={"suite_file": f"expectations/{s.suite}.yaml"},
        )
        for s in chosen
    ]
    by_check = {check_name(s): s for s in chosen}

    @dg.multi_asset_check(
        name="expectation_suites",
        specs=specs,
        can_subset=True,
        description="Great Expectations suites over the harmonized tables: row failures are "
        "quarantined, errors that remain block de-identification and the twin.",
    )
    def expectation_suites(
        context: dg.AssetCheckExecutionContext, twin: TwinResource
    ) -> Iterator[dg.AssetCheckResult]:
        selected = {k.name for k in context.selected_asset_check_keys}
        todo = _order([by_check[n] for n in selected if n in by_check])
        run_id = context.op_execution_context.run_id
        results: list[tuple[Suite, SuiteRun | None, str | None]] = []
        user, role = launcher(context, twin)
        store = twin.open_store(run_id=run_id)
        started = datetime.now(UTC).isoformat()
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            with store.transaction():
                catalog = Catalog(store)
                tables = [s.table for s in todo if catalog.exists(s.table)]
                before = {tv.table: tv for tv in input_versions(store, tables)}
                for suite in todo:
                    try:
                        done = run_suite(store, suite, as_of=_as_of(), catalog=catalog)
                        results.append((suite, done, None))
                    except TwinPipelineError as exc:
                        results.append((suite, None, str(exc)))
                changed = [r.table for _, r, _ in results if r is not None and r.quarantined_rows]
                outputs = table_versions(store, [*changed, "governance.quarantine", RESULT_TABLE])
                unchanged = [before[t] for t in tables if t not in changed and t in before]
                record_activity(
                    store,
                    ActivityRecord(
                        activity_id=f"{run_id}:quality:{uuid.uuid4().hex[:8]}",
                        run_id=run_id,
                        asset_key="governance/validation_result",
                        started_at=started,
                        ended_at=datetime.now(UTC).isoformat(),
                        user=user,
                        role=role,
                        inputs=tables,
                        input_versions=list(before.values()),
                        outputs=[*outputs, *unchanged],
                        params={
                            "stage": "quality",
                            "seconds": round(time.perf_counter() - t0, 3),
                            "cpu_seconds": round(time.process_time() - cpu0, 3),
                            "suites": [s.suite for s in todo],
                            "blocking": sorted(
                                r.suite for _, r, _ in results if r is not None and r.blocking
                            ),
                        },
                        code_version=code_version(),
                        informed_by=[t.replace(".", "/", 1) for t in tables],
                    ),
                )
        finally:
            store.close()
        for suite, run, error in results:
            yield _result(suite, run, error)

    return expectation_suites


def _all_checks() -> list[dg.AssetChecksDefinition]:
    existing = defined_asset_keys()
    suites = list(load_suites().values())
    if not any(dg.AssetKey(s.asset_key) in existing for s in suites):
        return []
    return [build_checks(suites, existing)]


defs = dg.Definitions(asset_checks=_all_checks())
