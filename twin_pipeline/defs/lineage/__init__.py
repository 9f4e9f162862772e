"""Close every run with a signed PROV bundle, also for runs launched from the Dagster UI.

``twin run`` finalizes in-process (``defs/runner.py``); runs started from ``dagster dev`` or a
schedule are closed by this run-status sensor when they succeed or fail. A run that already has
a bundle is left alone, so the two paths never sign twice.
"""

import dagster as dg

from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.lineage import runs, storage


def _close(context: dg.RunStatusSensorContext, twin: TwinResource) -> dg.SkipReason | None:
    run_id = context.dagster_run.run_id
    with twin.open_store(run_id=run_id) as store:
        if storage.bundles(store, run_id):
            return dg.SkipReason(f"run {run_id} already has a signed PROV bundle")
        failures = {}
        if context.dagster_run.status == dg.DagsterRunStatus.FAILURE:
            failures = {"run": "run failed; see the Dagster event log"}
        result = runs.finalize_run(store, run_id, failures=failures)
        from twin_pipeline.quality.docs import refresh_after_run

        context.log.info(refresh_after_run(store, twin.settings().data_docs_dir))
    context.log.info(
        f"signed PROV bundle of run {run_id}: {result.activities} activities, "
        f"sha256 {result.sha256[:16]}, key v{result.key_version}"
    )
    return None


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    name="prov_bundle_on_success",
    description="Sign and store the PROV bundle of each successful run (and emit OpenLineage).",
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
)
def prov_bundle_on_success(
    context: dg.RunStatusSensorContext, twin: TwinResource
) -> dg.SkipReason | None:
    return _close(context, twin)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.FAILURE,
    name="prov_bundle_on_failure",
    description="Sign and store the PROV bundle of each failed run (what did materialize).",
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
)
def prov_bundle_on_failure(
    context: dg.RunStatusSensorContext, twin: TwinResource
) -> dg.SkipReason | None:
    return _close(context, twin)


defs = dg.Definitions(sensors=[prov_bundle_on_success, prov_bundle_on_failure])
