"""Great Expectations Data Docs for the latest run of every suite, rendered on demand.

The pipeline's checks record every outcome with its GX configuration in
``governance.validation_result`` and do not import GX at all (about two CPU seconds per
process, more than the validation itself). The Data Docs site is a view over those records,
rendered by GX at the end of every run (``twin run``, and the run-status sensor for runs
launched from the Dagster UI: :func:`refresh_after_run`), after the run's assets and checks,
and when asked for (``twin quality docs``, ``twin quality run``), much as
``dbt docs generate`` renders a project's docs from its artifacts. A marker file in the site
says which suite runs it shows, so ``twin quality report`` can say whether it is current and
``twin quality docs`` does nothing when it already is.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from twin_pipeline.quality import gx as gxa
from twin_pipeline.quality import results as res
from twin_pipeline.quality.sqlengine import AGG_TYPES
from twin_pipeline.store import Store

Status = Literal["current", "stale", "missing", "no_results"]


def _latest_runs(records: list[dict[str, Any]]) -> dict[str, str]:
    return {str(r["suite"]): str(r["run_id"]) for r in records}


def doc_runs(records: list[dict[str, Any]]) -> list[gxa.DocRun]:
    """Recorded results (``results.latest`` rows) as GX-renderable suite runs. Our own
    cross-table checks (``twin.*``) have no GX configuration and are left out of the docs."""
    runs: dict[tuple[str, str], gxa.DocRun] = {}
    for r in records:
        config = res.decode_config(r.get("gx_config"))
        if config is None:
            continue
        key = (str(r["suite"]), str(r["run_id"]))
        run = runs.get(key)
        if run is None:
            run = runs[key] = gxa.DocRun(key[0], key[1], r["created_at"], [])
        aggregate = config["type"] in AGG_TYPES and not r.get("error")
        run.results.append(
            gxa.DocResult(
                type_name=str(config["type"]),
                kwargs=dict(config["kwargs"]),
                meta=dict(config["meta"]),
                success=bool(r["passed"]),
                evaluated=int(r["evaluated_rows"] or 0),
                unexpected=int(r["failed_rows"] or 0),
                observed=r["observed"] if aggregate else None,
                error=r.get("error"),
            )
        )
    return list(runs.values())


def _shown(target: Path) -> dict[str, str] | None:
    try:
        doc = json.loads((target / gxa.MARKER).read_text())
    except (OSError, ValueError):
        return None
    runs = doc.get("runs") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in runs.items()} if isinstance(runs, dict) else None


def status(store: Store, target: Path) -> Status:
    """Whether the site at ``target`` shows the latest run of every suite."""
    latest = _latest_runs(res.latest(store))
    if not latest:
        return "no_results"
    shown = _shown(target)
    if shown is None or not (target / "index.html").is_file():
        return "missing"
    return "current" if shown == latest else "stale"


def render(store: Store, target: Path, *, force: bool = False) -> tuple[Path, bool]:
    """Render the latest run of every suite into ``target`` unless the site is already
    current (or ``force``); the index page and whether it was rendered now."""
    records = res.latest(store)
    latest = _latest_runs(records)
    index = target / "index.html"
    if not force and latest and _shown(target) == latest and index.is_file():
        return index, False
    index = gxa.build_data_docs(target, doc_runs(records))
    (target / gxa.MARKER).write_text(json.dumps({"runs": latest}, indent=1, sort_keys=True))
    return index, True


def refresh_after_run(store: Store, target: Path) -> str:
    """Bring the site up to date at the end of a pipeline run; what happened, for the log.

    A failure to render never fails the run (the results are already recorded and the
    site can be rendered again with ``twin quality docs``): it is reported instead."""
    return start_refresh(store, target).wait()


@dataclass
class Refresh:
    """A Data Docs refresh under way in a process of its own (:func:`start_refresh`)."""

    message: str | None = None  # the outcome, when nothing had to be rendered
    target: Path | None = None
    latest: dict[str, str] = field(default_factory=dict)
    future: Future[Path] | None = None

    def wait(self) -> str:
        """Wait for the site; what happened, for the log (a failure is reported, not raised)."""
        if self.future is None or self.target is None:
            return self.message or "Data Docs not rendered"
        try:
            index = self.future.result()
            marker = json.dumps({"runs": self.latest}, indent=1, sort_keys=True)
            (self.target / gxa.MARKER).write_text(marker)
        except BrokenProcessPool as exc:  # the renderer died: the next refresh starts anew
            _drop_renderer()
            return _not_rendered(exc)
        except Exception as exc:  # reported: the run's data is already committed
            return _not_rendered(exc)
        return f"Data Docs rendered: {index}"


def _not_rendered(exc: BaseException) -> str:
    return f"Data Docs not rendered ({type(exc).__name__}: {exc}); run `twin quality docs`"


def start_refresh(store: Store, target: Path) -> Refresh:
    """Start bringing the site up to date: the results are read here, the site is rendered by
    GX in a new process, while the caller goes on (``twin run`` signs its PROV bundle and
    writes its status meanwhile). Importing GX alone takes ~4 s of one core."""
    try:
        records = res.latest(store)
        latest = _latest_runs(records)
        if not latest:
            return Refresh("Data Docs no results")
        if _shown(target) == latest and (target / "index.html").is_file():
            return Refresh("Data Docs current")
        future = _renderer().submit(gxa.build_data_docs, target, doc_runs(records))
    except Exception as exc:
        _drop_renderer()
        return Refresh(_not_rendered(exc))
    return Refresh(None, target, latest, future)


_RENDERER: ProcessPoolExecutor | None = None


def prewarm() -> None:
    """Start the renderer now and have it import GX while the run goes on, so the refresh at
    the end of the run only renders (the import was ~5 of the ~6 s the run waited for the
    site). The pipeline runner calls it once the run reaches its last stage, past its memory
    peak: the renderer holds ~250 MB once GX is imported. Failures show at the refresh."""
    try:
        _renderer().submit(gxa.warm_for_docs)
    except Exception:  # a broken renderer: the refresh starts a new one and reports
        _drop_renderer()


def _renderer() -> ProcessPoolExecutor:
    """The process that renders Data Docs for this one: spawned at the first refresh and kept,
    so a long-lived process (``twin watch``, the Dagster daemon, a test session) imports GX
    once, not at every run."""
    global _RENDERER
    if _RENDERER is None:
        import multiprocessing

        from twin_pipeline.procs import worker_init

        _RENDERER = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init
        )
    return _RENDERER


def _drop_renderer() -> None:
    global _RENDERER
    if _RENDERER is not None:
        _RENDERER.shutdown(wait=False, cancel_futures=True)
        _RENDERER = None
