"""The one module that talks to Great Expectations (1.x). GX APIs change between versions.

GX is imported lazily (it costs about two CPU seconds) and once per process. Two uses:

- :func:`validate` runs GX expectations on a pandas DataFrame (indexed by the DuckDB
  ``rowid``, so ``result_format=COMPLETE`` gives the failing rows' ids), for expectations the
  DuckDB push-down cannot compile and for ``--engine gx``.
- :func:`build_data_docs` renders GX Data Docs from recorded results: every expectation's GX
  configuration and counts as kept in ``governance.validation_result``. GX builds each
  expectation from its configuration, holds the suite validation results and renders the
  site; the results hold counts, never row values, so neither do the docs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twin_pipeline.errors import ConfigError

_LOCK = threading.RLock()
_STATE: dict[str, Any] = {}
SITE = "twin"
#: Written into a Data Docs folder: which suite runs it shows (see ``quality.docs``).
MARKER = "twin_docs.json"


@dataclass
class GXOutcome:
    """What GX said about one expectation."""

    name: str
    success: bool
    evaluated: int
    unexpected: int
    index: list[int] = field(default_factory=list)
    observed: str | None = None
    error: str | None = None


def _defer_scipy_stats() -> None:
    """Let ``scipy.stats`` load on first use instead of with GX.

    GX imports it at import time for two distribution expectations (KL divergence, KS test)
    that our suites do not use, and it is about a third of GX's import CPU. A lazy module
    (:class:`importlib.util.LazyLoader`) stands in for it: the first attribute access loads
    the real module, so any code that does use it still works, just later.
    """
    if "scipy.stats" in sys.modules:
        return
    try:
        import scipy
    except ImportError:  # GX would fail the same way on its own
        return
    spec = importlib.util.find_spec("scipy.stats")
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["scipy.stats"] = module
    loader.exec_module(module)
    # scipy's own module __getattr__ would otherwise import the real one on `scipy.stats`.
    scipy.stats = module  # type: ignore[attr-defined]


def _gx() -> Any:
    with _LOCK:
        mod = _STATE.get("gx")
        if mod is None:
            for name in ("great_expectations", "great_expectations._docs_decorators"):
                logging.getLogger(name).setLevel(logging.ERROR)
            _defer_scipy_stats()
            import great_expectations as gx

            mod = _STATE["gx"] = gx
        return mod


def context() -> Any:
    """The process-wide ephemeral GX context with its pandas datasource."""
    gx = _gx()
    with _LOCK:
        ctx = _STATE.get("context")
        if ctx is None:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            ctx = gx.get_context(mode="ephemeral")
            ctx.variables.progress_bars = ProgressBarsConfig(
                globally=False, metric_calculations=False
            )
            ctx.data_sources.add_pandas("twin")
            _STATE["context"] = ctx
        return ctx


def expectation_class(type_name: str) -> Any:
    """``expect_column_values_to_be_between`` -> ``gx.expectations.ExpectColumnValuesToBeBetween``."""
    gx = _gx()
    cls_name = "".join(part.capitalize() for part in type_name.split("_"))
    cls = getattr(gx.expectations, cls_name, None)
    if cls is None:
        raise ConfigError(f"Great Expectations has no expectation {type_name!r}")
    return cls


def build_expectation(type_name: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> Any:
    """One GX expectation object; GX validates the kwargs (errors become ConfigError)."""
    cls = expectation_class(type_name)
    try:
        return cls(**kwargs, meta=meta, notes=meta.get("why"))
    except Exception as exc:  # GX raises pydantic and its own errors
        raise ConfigError(f"{meta.get('name')}: GX rejects {type_name} {kwargs}: {exc}") from exc


def build_suite(name: str, expectations: list[Any]) -> Any:
    """A GX suite of these expectations (GX needs an active context to hold one)."""
    gx = _gx()
    context()
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    return suite


def validate(
    suite_name: str, expectations: list[Any], df: Any, *, run_name: str
) -> list[GXOutcome]:
    """Validate ``df`` (indexed by row id) against GX expectations; per-name outcomes (with
    the failing rows' ids). The caller records them; GX keeps nothing (it would hold row
    values)."""
    gx = _gx()
    from great_expectations.core.run_identifier import RunIdentifier

    ctx = context()
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
    with _LOCK:
        ds = ctx.data_sources.get("twin")
        try:
            asset = ds.get_asset(suite_name)
        except LookupError:
            asset = ds.add_dataframe_asset(suite_name)
        try:
            batch_def = asset.get_batch_definition("whole")
        except (KeyError, LookupError, ValueError):
            batch_def = asset.add_batch_definition_whole_dataframe("whole")
        # Replace the stored suite and validation definition with this run's.
        with contextlib.suppress(Exception):  # not there yet
            ctx.validation_definitions.delete(suite_name)
        with contextlib.suppress(Exception):  # not there yet
            ctx.suites.delete(suite_name)
        suite = ctx.suites.add(build_suite(suite_name, expectations))
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch_def, suite=suite)
        )
        result = vd.run(
            batch_parameters={"dataframe": df},
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": 0},
            run_id=run_id,
        )
        outcomes = [_outcome(r, len(df)) for r in result.results]
        # GX stored the raw result (with row values): drop it. What Data Docs show is
        # rendered from governance.validation_result (counts only), see build_data_docs.
        store = ctx.validation_results_store
        for key in store.list_keys():
            if key.expectation_suite_identifier.name == suite_name and key.run_id == run_id:
                store.remove_key(key)
    return outcomes


def _outcome(r: Any, n_rows: int) -> GXOutcome:
    meta = r.expectation_config.meta or {}
    res = r.result or {}
    exc = r.exception_info or {}
    error = None
    if isinstance(exc, dict):
        if exc.get("raised_exception"):
            error = str(exc.get("exception_message"))
        else:
            for v in exc.values():
                if isinstance(v, dict) and v.get("raised_exception"):
                    error = str(v.get("exception_message"))
                    break
    index = [int(i) for i in (res.get("unexpected_index_list") or []) if not isinstance(i, dict)]
    observed = res.get("observed_value")
    return GXOutcome(
        name=str(meta.get("name")),
        success=bool(r.success) and error is None,
        evaluated=int(res.get("element_count", n_rows) or 0),
        unexpected=int(res.get("unexpected_count", len(index)) or 0),
        index=index,
        observed=None if observed is None else str(observed),
        error=error,
    )


@dataclass
class DocResult:
    """One recorded expectation outcome, as Data Docs show it."""

    type_name: str
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    success: bool
    evaluated: int
    unexpected: int
    observed: str | None = None  # an aggregate's observed value (max, min, row count)
    error: str | None = None


@dataclass
class DocRun:
    """The recorded results of one suite run."""

    suite: str
    run_name: str
    run_time: datetime
    results: list[DocResult]


def _summary(r: DocResult) -> dict[str, Any]:
    if r.observed is not None:
        return {"observed_value": r.observed, "element_count": r.evaluated}
    pct = 100.0 * r.unexpected / r.evaluated if r.evaluated else 0.0
    return {
        "element_count": r.evaluated,
        "unexpected_count": r.unexpected,
        "unexpected_percent": pct,
        "unexpected_percent_total": pct,
    }


def _suite_result(run: DocRun) -> Any:
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.core.run_identifier import RunIdentifier

    results = [
        ExpectationValidationResult(
            success=r.success,
            expectation_config=build_expectation(r.type_name, r.kwargs, r.meta).configuration,
            result=_summary(r),
            exception_info={
                "raised_exception": r.error is not None,
                "exception_message": r.error,
                "exception_traceback": None,
            },
        )
        for r in run.results
    ]
    return ExpectationSuiteValidationResult(
        success=all(r.success for r in results),
        results=results,
        suite_name=run.suite,
        meta={"run_id": RunIdentifier(run_name=run.run_name, run_time=run.run_time)},
    )


def warm_for_docs() -> None:
    """Import what :func:`build_data_docs` needs (GX: ~4 s of one core), nothing else."""
    _gx()
    import great_expectations.data_context.types.resource_identifiers  # noqa: F401


def build_data_docs(target: Path, runs: list[DocRun]) -> Path:
    """Render the Data Docs site for ``runs`` into ``target`` (replacing what was there); the
    index page. A fresh ephemeral context each time, so a site holds exactly these runs."""
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    gx = _gx()
    with _LOCK:
        ctx = gx.get_context(mode="ephemeral")
        ours = any((target / n).exists() for n in ("index.html", MARKER))
        if target.exists() and any(target.iterdir()) and not ours:
            raise ConfigError(
                "not a Data Docs folder (no index.html): not replacing it", path=str(target)
            )
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)
        ctx.add_data_docs_site(
            site_name=SITE,
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(target),
                },
            },
        )
        for run in runs:
            result = _suite_result(run)
            key = ValidationResultIdentifier(
                ExpectationSuiteIdentifier(name=run.suite), result.meta["run_id"], "twin"
            )
            ctx.validation_results_store.set(key, result)
        ctx.build_data_docs(site_names=[SITE])
    return target / "index.html"
