"""Telemetry assets (readings, per-minute aggregates, device gaps), the device registry and the
``landing_sensor`` that starts runs for new landing files only."""

import json
import os
from pathlib import Path

import dagster as dg

from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.harmonize import devices as D
from twin_pipeline.harmonize import telemetry as T
from twin_pipeline.watch import changed_files, landing_snapshot, selection_for

RAW_KEYS = [dg.AssetKey(["raw", k]) for k in ("telemetry", "hl7v2", "wfdb")]
EHR = {
    n: dg.AssetKey(["harmonized", n]) for n in ("device", "imaging_study", "encounter", "patient")
}
OWNERS = ["team:data-engineering"]


@dg.asset(
    key=dg.AssetKey(["harmonized", "telemetry_reading"]),
    deps=[*RAW_KEYS, EHR["patient"]],
    group_name="telemetry",
    kinds={"duckdb"},
    owners=OWNERS,
    description="Device readings from NDJSON/CSV, HL7 v2 ORU^R01 and WFDB numerics: one MDC "
    "metric vocabulary (LOINC alongside), canonical UCUM units, instants in UTC, exact "
    "duplicates quarantined, implausible values flagged, late arrivals flagged. Incremental: "
    "only files not yet harmonized are read.",
)
def telemetry_reading(
    context: dg.AssetExecutionContext, twin: TwinResource
) -> dg.MaterializeResult:
    inputs = ["raw.telemetry_reading", "harmonized.patient", "harmonized.device_association"]
    with governed_run(context, twin, inputs=inputs) as run:
        res = T.harmonize_readings(run.store)
        run.outputs(T.READING)
        run.meta(
            files_processed=res.files_processed,
            records_in=res.rows_in,
            harmonized=res.harmonized,
            quarantined=res.quarantined,
            duplicates=res.duplicates,
            implausible=res.implausible,
            late=res.late,
        )
    return run.result()


@dg.asset(
    key=dg.AssetKey(["harmonized", "telemetry_minute"]),
    deps=[telemetry_reading],
    group_name="telemetry",
    kinds={"duckdb"},
    owners=OWNERS,
    description="Per patient, metric and minute: count, implausible count, min, max, mean "
    "(over plausible readings). Only minutes touched by new readings are recomputed.",
)
def telemetry_minute(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=[T.READING]) as run:
        n = T.build_minutes(run.store)
        run.outputs(T.MINUTE)
        run.meta(minutes=n)
    return run.result()


@dg.asset(
    key=dg.AssetKey(["harmonized", "device_gap"]),
    deps=[telemetry_reading],
    group_name="telemetry",
    kinds={"duckdb"},
    owners=OWNERS,
    description="Offline intervals: consecutive readings of a device further apart than the "
    "gap threshold in assets/telemetry.yaml.",
)
def device_gap(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=[T.READING]) as run:
        n = T.build_gaps(run.store)
        run.outputs(T.GAP)
        run.meta(gaps=n)
    return run.result()


@dg.asset(
    key=dg.AssetKey(["harmonized", "device_registry"]),
    deps=[
        EHR["device"],
        EHR["imaging_study"],
        dg.AssetKey(["harmonized", "imaging_series"]),
        telemetry_reading,
    ],
    group_name="telemetry",
    kinds={"duckdb"},
    owners=OWNERS,
    description="One device table: FHIR Devices, DICOM imaging equipment (by serial, else "
    "station) and telemetry sources, with where each was seen.",
)
def device_registry(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    inputs = ["harmonized.device", "harmonized.imaging_series", T.READING]
    with governed_run(context, twin, inputs=inputs) as run:
        n = D.build_registry(run.store)
        run.outputs(D.REGISTRY)
        run.meta(devices=n)
    return run.result()


@dg.asset(
    key=dg.AssetKey(["harmonized", "device_association"]),
    deps=[EHR["device"], EHR["encounter"], EHR["patient"], device_registry],
    group_name="telemetry",
    kinds={"duckdb"},
    owners=OWNERS,
    description="Device-to-patient association over time, from encounter locations, "
    "Device.patient and readings that name their patient.",
)
def device_association(
    context: dg.AssetExecutionContext, twin: TwinResource
) -> dg.MaterializeResult:
    inputs = ["harmonized.device", "harmonized.encounter", T.READING]
    with governed_run(context, twin, inputs=inputs) as run:
        n = D.build_association(run.store)
        run.outputs(D.ASSOCIATION)
        run.meta(associations=n)
    return run.result()


@dg.sensor(
    name="landing_sensor",
    job_name="twin_all",
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Watches TWIN_LANDING; starts one run per batch of new or changed files "
    "(cursor: path -> size, mtime and sha256 of every file already seen).",
)
def landing_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    landing = os.environ.get("TWIN_LANDING", "")
    if not landing or not Path(landing).is_dir():
        return dg.SkipReason(f"TWIN_LANDING is not a folder: {landing!r}")
    known = json.loads(context.cursor) if context.cursor else {}
    snap = landing_snapshot(Path(landing), known)
    new = changed_files(known, snap)
    if not new:
        return dg.SkipReason("no new files")
    digest = "|".join(f"{p}:{snap[p]['sha256']}" for p in sorted(new))
    import hashlib

    run_key = hashlib.sha256(digest.encode()).hexdigest()[:32]
    # First evaluation: the whole graph (catch-up); later: what the new files feed.
    selection = (
        [dg.AssetKey(k.split("/")) for k in selection_for(new, "harmonized")] if known else None
    )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run_key,
                tags={"twin/new_files": str(len(new)), "twin/landing": landing},
                asset_selection=selection,
            )
        ],
        cursor=json.dumps(snap, sort_keys=True),
    )


defs = dg.Definitions(
    assets=[
        telemetry_reading,
        telemetry_minute,
        device_gap,
        device_registry,
        device_association,
    ],
    sensors=[landing_sensor],
)
