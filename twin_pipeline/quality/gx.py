"""The one module that talks to Great Expectations (1.x). GX APIs change between versions.

GX is imported lazily (it takes seconds) and once per process; one ephemeral context holds a
pandas datasource. Suites are validated on pandas DataFrames fetched from DuckDB (GX's SQL
datasource does not work over duckdb-engine), indexed by the DuckDB ``rowid`` so that
``result_format=COMPLETE`` gives the failing rows' ids. Results are stripped of row values
before they are kept for Data Docs, so the docs hold counts, never patient data.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
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
_VALUE_KEYS = (
    "unexpected_list",
    "partial_unexpected_list",
    "partial_unexpected_counts",
    "unexpected_index_list",
    "partial_unexpected_index_list",
    "unexpected_index_query",
    "unexpected_rows",
    "details",
)


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
    gx = _gx()
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    return suite


@dataclass
class PushedDown:
    """An expectation evaluated in DuckDB: what GX needs to show it in Data Docs."""

    type_name: str
    kwargs: dict[str, Any]
    meta: dict[str, Any]
    outcome: GXOutcome


def validate(
    suite_name: str, expectations: list[Any], df: Any, *, run_name: str
) -> list[GXOutcome]:
    """Validate ``df`` (indexed by row id) against GX expectations; per-name outcomes.

    The (sanitized) GX result is kept for Data Docs under this suite and run.
    """
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
        # GX stored the raw result (with row values); we keep a sanitized copy instead.
        store = ctx.validation_results_store
        for key in store.list_keys():
            if key.expectation_suite_identifier.name == suite_name and key.run_id == run_id:
                store.remove_key(key)
        _sanitize(result)
        _STATE.setdefault("results", {})[(suite_name, run_name)] = result
    return outcomes


def remember(suite_name: str, run_name: str, pushed: list[PushedDown]) -> None:
    """Keep expectations evaluated in DuckDB for Data Docs (no GX import needed)."""
    with _LOCK:
        _STATE.setdefault("pushed", {}).setdefault((suite_name, run_name), []).extend(pushed)


def _summary(o: GXOutcome) -> dict[str, Any]:
    if o.observed is not None and not o.index and o.unexpected == 0:
        return {"observed_value": o.observed, "element_count": o.evaluated}
    pct = 100.0 * o.unexpected / o.evaluated if o.evaluated else 0.0
    return {
        "element_count": o.evaluated,
        "unexpected_count": o.unexpected,
        "unexpected_percent": pct,
        "unexpected_percent_total": pct,
    }


def _store_pending(ctx: Any) -> list[Any]:
    """Turn this process's pending results into stored GX validation results; their keys."""
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResult,
        ExpectationValidationResult,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    results: dict[tuple[str, str], Any] = _STATE.pop("results", {})
    pushed: dict[tuple[str, str], list[PushedDown]] = _STATE.pop("pushed", {})
    keys = []
    for suite_run in sorted(set(results) | set(pushed)):
        suite_name, run_name = suite_run
        extra = [
            ExpectationValidationResult(
                success=p.outcome.success,
                expectation_config=build_expectation(p.type_name, p.kwargs, p.meta).configuration,
                result=_summary(p.outcome),
                exception_info={
                    "raised_exception": p.outcome.error is not None,
                    "exception_message": p.outcome.error,
                    "exception_traceback": None,
                },
            )
            for p in pushed.get(suite_run, [])
        ]
        result = results.get(suite_run)
        if result is None:
            run_id = RunIdentifier(run_name=run_name, run_time=datetime.now(UTC))
            result = ExpectationSuiteValidationResult(
                success=all(e.success for e in extra),
                results=extra,
                suite_name=suite_name,
                meta={"run_id": run_id, "engine": "duckdb"},
            )
        else:
            result.results.extend(extra)
            result.success = bool(result.success) and all(e.success for e in extra)
        key = ValidationResultIdentifier(
            ExpectationSuiteIdentifier(name=suite_name), result.meta["run_id"], "twin"
        )
        ctx.validation_results_store.set(key, result)
        keys.append(key)
    return keys


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


def _sanitize(result: Any) -> None:
    """Drop row values from a result (Data Docs must not show patient data)."""
    for r in result.results:
        if r.result:
            for key in _VALUE_KEYS:
                r.result.pop(key, None)
        if isinstance(r.exception_info, dict):
            # Tracebacks may quote row values; keep the message (renderers need the keys).
            for v in r.exception_info.values():
                if isinstance(v, dict) and "exception_traceback" in v:
                    v["exception_traceback"] = None
            if "exception_traceback" in r.exception_info:
                r.exception_info["exception_traceback"] = None


def build_data_docs(target: Path) -> Path:
    """Render the Data Docs site for this process's validations into ``target``; the index.

    The first call for a folder renders every validation of this process; later calls render
    only the validations since the last call, plus the index.
    """
    ctx = context()
    target.mkdir(parents=True, exist_ok=True)
    with _LOCK:
        pending = _store_pending(ctx)
        incremental = _STATE.get("docs_dir") == str(target)
        if not incremental:
            with contextlib.suppress(Exception):  # no site yet
                ctx.delete_data_docs_site(SITE)
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
            _STATE["docs_dir"] = str(target)
        if incremental and pending:
            ctx.build_data_docs(site_names=[SITE], resource_identifiers=pending)
        elif not incremental:
            ctx.build_data_docs(site_names=[SITE])
    return target / "index.html"
