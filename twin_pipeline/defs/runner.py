"""Run the asset graph in-process for the CLI (``twin run``), under a store-wide lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from twin_pipeline.errors import StoreError, TwinPipelineError
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


@dataclass
class RunSummary:
    run_id: str
    success: bool
    wall_s: float
    status: dict[str, Any]
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)  # asset step -> seconds


@contextlib.contextmanager
def run_lock(settings: Settings, *, wait: bool = False) -> Iterator[None]:
    """One pipeline run per TWIN_HOME at a time; a second one fails clearly (or waits)."""
    settings.ensure()
    fh = settings.lock_path.open("a+")
    try:
        flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
        try:
            fcntl.flock(fh, flags)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StoreError(
                f"another twin run is in progress ({holder}); wait for it or use --wait",
                path=str(settings.lock_path),
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
        fh.flush()
        yield
    finally:
        fh.close()


def _root_cause(error: Any) -> str:
    """The innermost error message: what went wrong, not Dagster's wrapper around it."""
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    if error is None:
        return "unknown error"
    cls = getattr(error, "cls_name", "") or ""
    msg = str(getattr(error, "message", error)).strip().splitlines()
    text = msg[-1] if msg else ""
    return f"{cls}: {text}" if cls and not text.startswith(cls) else text


def step_spans(instance: dg.DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """(start, end) timestamps of each finished step (asset key path) of a run, from the
    instance's STEP_START and STEP_SUCCESS/STEP_FAILURE events."""
    started: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not ev.step_key:
            continue
        key = ev.step_key.replace("__", "/")
        if ev.event_type_value == "STEP_START":
            started[key] = entry.timestamp
        elif ev.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and key in started:
            out[key] = (started[key], entry.timestamp)
    return out


def _step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Wall seconds per step (asset) of a run, from the instance's event log."""
    return {k: round(t1 - t0, 4) for k, (t0, t1) in step_spans(instance, run_id).items()}


def dagster_instance(settings: Settings) -> dg.DagsterInstance:
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def run_pipeline(
    landing: Path,
    settings: Settings | None = None,
    *,
    user: str = "engineer",
    role: str = "data_engineer",
    selection: Sequence[str] | None = None,
    wait: bool = False,
    ephemeral: bool = False,
    extra_config: dict[str, Any] | None = None,
    data_docs: bool = True,
) -> RunSummary:
    """Materialize the whole graph (or ``selection``, asset key paths like ``raw/fhir``).

    ``extra_config`` is merged into the run config (e.g. ``{"ops": {...}}`` asset config).
    ``data_docs``: bring the Great Expectations Data Docs up to date after the run.
    """
    from twin_pipeline.definitions import ALL_JOB, defs

    settings = (settings or Settings.from_env()).ensure()
    landing = landing.resolve()
    if not landing.is_dir():
        raise TwinPipelineError("landing folder does not exist", path=str(landing))
    run_config: dict[str, Any] = {
        "loggers": {
            "console": {"config": {"log_level": os.environ.get("TWIN_LOG_LEVEL", "WARNING")}}
        },
        "resources": {
            "twin": {
                "config": {
                    "twin_home": str(settings.home),
                    "landing": str(landing),
                    "user": user,
                    "role": role,
                }
            }
        },
    }
    if extra_config:
        run_config.update(extra_config)
    job = defs.resolve_job_def(ALL_JOB)
    asset_selection = [dg.AssetKey(s.split("/")) for s in selection] if selection else None
    with run_lock(settings, wait=wait):
        instance = dg.DagsterInstance.ephemeral() if ephemeral else dagster_instance(settings)
        started = time.perf_counter()
        t0 = datetime.now(UTC)
        result = job.execute_in_process(
            run_config=run_config,
            instance=instance,
            raise_on_error=False,
            asset_selection=asset_selection,
            tags={"twin/user": user, "twin/role": role, "twin/landing": str(landing)},
        )
        wall = time.perf_counter() - started
        mats: dict[str, dict[str, Any]] = {}
        for ev in result.get_asset_materialization_events():
            mat = getattr(ev.event_specific_data, "materialization", None)
            if mat is None:
                continue
            mats[mat.asset_key.to_user_string()] = {
                k: getattr(v, "value", v) for k, v in mat.metadata.items()
            }
        steps = _step_seconds(instance, result.run_id)
        failures = [
            f"{ev.step_key}: {_root_cause(ev.event_specific_data.error)}"  # type: ignore[union-attr]
            for ev in result.all_events
            if ev.is_step_failure
        ]
        with Store.open(settings, run_id=result.run_id) as store:
            store.record_run(
                result.run_id,
                started_at=t0,
                finished_at=datetime.now(UTC),
                landing=str(landing),
                user_name=user,
                role=role,
                status="success" if result.success else "failure",
            )
            # Every run ends with a signed PROV bundle and its OpenLineage events.
            from twin_pipeline.lineage.runs import finalize_run

            finalize_run(
                store,
                result.run_id,
                failures={
                    str(ev.step_key).replace("__", "/"): ev.event_specific_data.error.message  # type: ignore[union-attr]
                    for ev in result.all_events
                    if ev.is_step_failure
                },
            )
            if data_docs:
                from twin_pipeline.quality.docs import refresh_after_run

                docs = refresh_after_run(store, settings.data_docs_dir)
                if docs.startswith("Data Docs not rendered"):
                    print(f"twin: warning: {docs}", file=sys.stderr)
            status = store.status()
    return RunSummary(result.run_id, result.success, wall, status, mats, failures, steps)
