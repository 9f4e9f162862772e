"""Run the asset graph in-process for the CLI (``twin run``), under a store-wide lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from twin_pipeline.activity import recorded_versions
from twin_pipeline.errors import StoreError, TwinPipelineError
from twin_pipeline.paths import Settings
from twin_pipeline.procs import background_allowed, wait_background
from twin_pipeline.sources import one_walk_per_run
from twin_pipeline.store import Store, hold_between_steps


@dataclass
class RunSummary:
    run_id: str
    success: bool
    wall_s: float
    status: dict[str, Any]
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)  # asset step -> seconds
    # Seconds of run_pipeline by phase: setup (lock, Dagster instance), execute (the job: the
    # steps' spans, and between_steps: Dagster's own work around them, part of execute),
    # events (reading the run's events), record (run row, Data Docs started), finalize
    # (signed PROV bundle, OpenLineage), status, compact, docs_wait, background_wait.
    phases_s: dict[str, float] = field(default_factory=dict)
    # CPU seconds of each governed asset step (the pipeline process's threads and the worker
    # processes the step waited for), from its materialization's ``cpu_s``.
    steps_cpu_s: dict[str, float] = field(default_factory=dict)


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


# The stage at which the run starts the Data Docs renderer (run_pipeline, data_docs=True):
# the last one, after every expectation suite and past the run's memory peak.
PREWARM_DOCS_AT_STAGE = "twin"


def _tell_steps_done(instance: dg.DagsterInstance, callback: Callable[[str], None]) -> None:
    """Call ``callback`` with the asset key path of each step of a run on ``instance`` that
    succeeds, in the process that runs it, as its STEP_SUCCESS event is stored.

    (A Dagster success hook on the job did this before; it wrote a HOOK_COMPLETED event, ~4 ms,
    for each of a run's 67 steps.)"""
    handle = instance.handle_new_event

    def handle_and_tell(event: Any, **kwargs: Any) -> None:
        handle(event, **kwargs)
        ev = event.dagster_event
        if ev is not None and ev.event_type_value == "STEP_SUCCESS" and ev.step_key:
            callback(ev.step_key.replace("__", "/"))

    setattr(instance, "handle_new_event", handle_and_tell)  # noqa: B010 - this instance only


def _docs_prewarmer() -> Callable[[str], None]:
    """A step callback that starts the Data Docs renderer once, at the first step of
    :data:`PREWARM_DOCS_AT_STAGE`."""
    started = False

    def on_step(key: str) -> None:
        nonlocal started
        if not started and key.split("/", 1)[0] == PREWARM_DOCS_AT_STAGE:
            started = True
            from twin_pipeline.quality.docs import prewarm

            prewarm()

    return on_step


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


def run_status(store: Store) -> dict[str, Any]:
    """``store.status()`` at the end of a run, without hashing again what steps wrote.

    A governed step records each table it writes (rows, content hash) in
    ``governance.table_version`` in the transaction that writes it, and every write to a
    raw, harmonized, deid or twin table goes through a governed step (the one-writer rule; a
    test compares this status with a full ``store.status()`` after runs). So a table whose
    recorded version (this run's, or the last run that wrote it: a watch round runs a few
    steps) still has its row count reports that version; every other table (the governance
    tables) is hashed as ``store.status()`` does. Hashing all ~80 tables took ~7 s CPU at
    1,000 patients at the end of every run, and 13 s at the end of a watch round over a
    10,000-patient store when only this run's records counted."""
    return store.status(known=recorded_versions(store))


def dagster_instance(settings: Settings) -> dg.DagsterInstance:
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    _pool_event_log_connections(instance)
    return instance


def _pool_event_log_connections(instance: dg.DagsterInstance) -> None:
    """Keep one SQLAlchemy engine (and its pooled SQLite connection) per event-log shard.

    Dagster's SQLite event log creates an engine, opens the shard's file, commits and disposes
    the engine for every write: a run writes ~5 events a step, several shard connections each.
    Closing the last connection to a WAL database checkpoints it (an fsync), so each event cost
    ~2 ms CPU and on a busy disk tens of ms of wall time; a 90-step run spent ~0.25 s a step in
    it. The shard files, their schema and what is written are unchanged (other processes, such
    as the Dagster UI, read them as before); only the connections are reused. Applied when the
    storage is exactly the SQLite event log whose internals this relies on; else left alone."""
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
        SQLITE_BUSY_TIMEOUT_SECONDS,
        SqliteEventLogStorage,
    )
    from sqlalchemy import create_engine, event
    from sqlalchemy.engine import Connection, Engine

    def _bounded_wal(dbapi_con: Any, _record: Any) -> None:
        # A connection kept open never gets the checkpoint-on-close: checkpoint the WAL every
        # 64 pages (256 KB) instead of SQLite's 1,000, and keep its file at most 1 MB, so the
        # event log takes no more disk during a run than when each event closed its connection.
        dbapi_con.execute("PRAGMA wal_autocheckpoint = 64")
        dbapi_con.execute("PRAGMA journal_size_limit = 1048576")

    storage = instance.event_log_storage
    needed = ("_db_lock", "_initialized_dbs", "_initdb", "conn_string_for_shard", "_connect")
    if type(storage) is not SqliteEventLogStorage or not all(hasattr(storage, a) for a in needed):
        return
    engines: dict[str, Engine] = {}

    @contextlib.contextmanager
    def _connect(shard: str) -> Iterator[Connection]:
        with storage._db_lock:
            engine = engines.get(shard)
            if engine is None:
                engine = engines[shard] = create_engine(
                    storage.conn_string_for_shard(shard),
                    connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
                )
                event.listen(engine, "connect", _bounded_wal)
            if shard not in storage._initialized_dbs:
                storage._initdb(engine)
                storage._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    dispose = storage.dispose

    def _dispose() -> None:
        for engine in engines.values():
            engine.dispose()
        engines.clear()
        dispose()

    storage._connect = _connect  # type: ignore[method-assign]
    storage.dispose = _dispose  # type: ignore[method-assign]


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
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - mark, 4)
        mark = now

    # The store stays attached from step to step and through the run's own records below (one
    # checkpoint a run instead of one a step), and is let go whenever a reader waits for it.
    with run_lock(settings, wait=wait), contextlib.ExitStack() as held:
        held.enter_context(hold_between_steps(settings))
        instance = dg.DagsterInstance.ephemeral() if ephemeral else dagster_instance(settings)
        phase("setup")
        started = time.perf_counter()
        t0 = datetime.now(UTC)
        if data_docs:
            _tell_steps_done(instance, _docs_prewarmer())
        with one_walk_per_run(), background_allowed():
            result = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                raise_on_error=False,
                asset_selection=asset_selection,
                tags={"twin/user": user, "twin/role": role, "twin/landing": str(landing)},
            )
        wall = time.perf_counter() - started
        phase("execute")
        mats: dict[str, dict[str, Any]] = {}
        for ev in result.get_asset_materialization_events():
            mat = getattr(ev.event_specific_data, "materialization", None)
            if mat is None:
                continue
            mats[mat.asset_key.to_user_string()] = {
                k: getattr(v, "value", v) for k, v in mat.metadata.items()
            }
        steps = _step_seconds(instance, result.run_id)
        instance.dispose()  # closes the event log's pooled connections (checkpoints once)
        failures = [
            f"{ev.step_key}: {_root_cause(ev.event_specific_data.error)}"  # type: ignore[union-attr]
            for ev in result.all_events
            if ev.is_step_failure
        ]
        phase("events")
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
            # The Data Docs are rendered in a process of their own meanwhile.
            from twin_pipeline.quality.docs import start_refresh

            docs = start_refresh(store, settings.data_docs_dir) if data_docs else None
            # Every run ends with a signed PROV bundle and its OpenLineage events.
            from twin_pipeline.lineage.runs import finalize_run

            phase("record")
            finalize_run(
                store,
                result.run_id,
                failures={
                    str(ev.step_key).replace("__", "/"): ev.event_specific_data.error.message  # type: ignore[union-attr]
                    for ev in result.all_events
                    if ev.is_step_failure
                },
            )
            phase("finalize")
            status = run_status(store)
            phase("status")
            # Each checkpoint leaves a row group (and a 256 KB block) in the keyed governance
            # tables appended to since the last one: one a run now that the store is kept
            # between steps. Merged here once a table has 32, so the store stops growing.
            store.compact()
        held.close()  # the store let go (its one checkpoint of the run)
        phase("compact")
        if docs is not None:
            outcome = docs.wait()
            if outcome.startswith("Data Docs not rendered"):
                print(f"twin: warning: {outcome}", file=sys.stderr)
        phase("docs_wait")
        # Work the steps left to finish off the critical path (a simulation's chart).
        for problem in wait_background():
            print(f"twin: warning: {problem}", file=sys.stderr)
        phase("background_wait")
    # The steps' own spans are part of "execute"; the rest of it is Dagster's work between them.
    phases["between_steps"] = round(max(0.0, phases["execute"] - sum(steps.values())), 4)
    cpu = {k: float(m["cpu_s"]) for k, m in mats.items() if "cpu_s" in m}
    return RunSummary(
        result.run_id, result.success, wall, status, mats, failures, steps, phases, cpu
    )
