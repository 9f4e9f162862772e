"""Data-quality gates: one Dagster asset check per expectation suite (``expectations/*.yaml``).

A check runs its suite on the table its asset just wrote. Rows failing a row-level expectation
are quarantined (stage ``quality``) and removed inside the check's own store transaction, so
they do not fail the table; the check fails only when an ``error`` expectation still fails
afterwards (schema, conservation, a value that could not be evaluated). Suites with error
expectations are *blocking*: de-identification and the twin wait for them and do not run on
a failed gate. Each check run is recorded in the ledger as an activity whose outputs include
``governance.validation_result``, so validations appear in lineage.

Checks are only created for asset keys that some other stage defines (a check on an undefined
asset would break loading the code location).
"""

import importlib
import pkgutil
import uuid
from datetime import UTC, datetime

import dagster as dg

from twin_pipeline import defs as defs_pkg
from twin_pipeline.activity import ActivityRecord, code_version, record_activity, table_versions
from twin_pipeline.defs.resources import TwinResource
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


def _metadata(run: SuiteRun) -> dict[str, dg.MetadataValue]:
    failed = [r for r in run.results if not r.passed]
    md: dict[str, dg.MetadataValue] = {
        "expectations": dg.MetadataValue.int(len(run.results)),
        "failed_expectations": dg.MetadataValue.int(len(failed)),
        "rows_before": dg.MetadataValue.int(run.rows_before),
        "rows_after": dg.MetadataValue.int(run.rows_after),
        "quarantined_rows": dg.MetadataValue.int(run.quarantined_rows),
        "blocking_failures": dg.MetadataValue.json([r.expectation for r in run.blocking]),
        "warnings": dg.MetadataValue.json([r.expectation for r in run.warnings]),
    }
    if failed:
        md["failures"] = dg.MetadataValue.md(
            "| expectation | severity | failed rows | action |\n|---|---|---|---|\n"
            + "\n".join(
                f"| {r.expectation} | {r.severity} | {r.failed_rows} | {r.action} |" for r in failed
            )
        )
    return md


def build_check(suite: Suite, existing: set[dg.AssetKey]) -> dg.AssetChecksDefinition:
    key = dg.AssetKey(suite.asset_key)
    deps = sorted(
        {
            dg.AssetKey(str(e.kwargs["ref_table"]).split("."))
            for e in suite.expectations
            if e.type == "twin.foreign_key" and str(e.kwargs["ref_table"]) != suite.table
        }
        & existing,
        key=lambda k: k.to_user_string(),
    )

    @dg.asset_check(
        asset=key,
        name=f"{suite.suite}_expectations",
        description=f"Expectation suite `{suite.suite}` ({len(suite.expectations)} "
        f"expectations): {suite.description}",
        blocking=suite.has_errors,
        additional_deps=deps or None,
        metadata={"suite_file": f"expectations/{suite.suite}.yaml"},
    )
    def _check(context: dg.AssetCheckExecutionContext, twin: TwinResource) -> dg.AssetCheckResult:
        run_id = context.op_execution_context.run_id
        store = twin.open_store(run_id=run_id)
        started = datetime.now(UTC).isoformat()
        try:
            with store.transaction():
                inputs = [suite.table]
                record = ActivityRecord(
                    activity_id=f"{run_id}:check:{suite.suite}:{uuid.uuid4().hex[:8]}",
                    run_id=run_id,
                    asset_key=f"{key.to_user_string()}:{suite.suite}_expectations",
                    started_at=started,
                    ended_at="",
                    user=twin.user,
                    role=twin.role,
                    inputs=inputs,
                    input_versions=table_versions(store, inputs),
                    params={"suite": suite.suite, "stage": "quality"},
                    code_version=code_version(),
                    informed_by=[key.to_user_string()],
                )
                run = run_suite(store, suite, as_of=_as_of())
                record.outputs = table_versions(
                    store, [suite.table, "governance.quarantine", RESULT_TABLE]
                )
                record.ended_at = datetime.now(UTC).isoformat()
                record_activity(store, record)
        finally:
            store.close()
        _render_docs(twin)
        if run.blocking:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.ERROR, metadata=_metadata(run)
            )
        if run.warnings:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.WARN, metadata=_metadata(run)
            )
        return dg.AssetCheckResult(passed=True, metadata=_metadata(run))

    return _check


def _render_docs(twin: TwinResource) -> None:
    """Great Expectations Data Docs for this process's validations, in TWIN_HOME/data_docs."""
    from twin_pipeline.quality import gx as gxa

    gxa.build_data_docs(twin.settings().data_docs_dir)


def build_checks() -> list[dg.AssetChecksDefinition]:
    existing = defined_asset_keys()
    return [
        build_check(suite, existing)
        for suite in load_suites().values()
        if dg.AssetKey(suite.asset_key) in existing
    ]


defs = dg.Definitions(asset_checks=build_checks())
