"""Lineage overhead: PROV per materialization, signed run bundle and OpenLineage events, as a
ratio of the pipeline time without them (goal ≤ 0.2×).

Two measurements on the same generated hospital, in this process:

1. **A/B wall clock**: the whole graph through ``run_pipeline`` with lineage switched off (the
   PROV fragment hook and run finalization replaced by no-ops; the core activity ledger stays)
   and then with lineage on, each in a fresh TWIN_HOME. Noisy on a shared machine.
2. **Instrumented**: in the lineage-on run, the seconds spent inside the lineage code
   (``record_prov``, ``finalize_run``: bundle merge, signing, OpenLineage) divided by the rest of
   the run. This is the figure the goal is checked against; (1) is printed beside it.

Also times ``twin audit verify`` and a record-level trace on the resulting store.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings

GOAL = 0.2


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed


@contextlib.contextmanager
def _patched(**replacements: Callable[..., Any]) -> Iterator[None]:
    from twin_pipeline.lineage import runs

    saved = {name: getattr(runs, name) for name in replacements}
    try:
        for name, fn in replacements.items():
            setattr(runs, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(runs, name, fn)


def _home(root: Path, name: str) -> Settings:
    import shutil

    home = root / name
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init()
    return settings


def _run(landing: Path, settings: Settings) -> float:
    from twin_pipeline.defs.runner import run_pipeline

    t0 = time.perf_counter()
    summary = run_pipeline(landing, settings, user="engineer", ephemeral=True)
    wall = time.perf_counter() - t0
    if not summary.success:
        print(f"   warning: run had failures: {summary.failures[:3]}")
    return wall


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twin_pipeline.generate import generate_hospital
    from twin_pipeline.lineage import runs, trace
    from twin_pipeline.store import Store

    patients = args.patients or (10 if args.quick else 50)
    root = Path(args.workdir) / "lineage"
    landing = root / f"hospital-{patients}"
    if not (landing / "manifest.json").exists():
        generate_hospital(landing, patients=patients, seed=42)
    print(f"   hospital: {patients} patients at {landing}")

    # warm-up (imports, Dagster definitions, GX) so neither measured run pays for it
    from twin_pipeline.definitions import defs  # noqa: F401

    # The A/B run without lineage is noisy on a shared machine and costs a whole pipeline run;
    # --quick leaves it out and reports the instrumented ratio (the goal's figure) alone.
    t_off: float | None = None
    if not args.quick:
        off = _home(root, "home-off")
        noop_finalize = lambda store, run_id, **kw: None  # noqa: E731
        with _patched(record_prov=lambda store, record: "", finalize_run=noop_finalize):
            t_off = _run(landing, off)

    on = _home(root, "home-on")
    prov_t, fin_t = Timer(), Timer()
    with _patched(
        record_prov=prov_t.wrap(runs.record_prov), finalize_run=fin_t.wrap(runs.finalize_run)
    ):
        t_on = _run(landing, on)
    lineage_s = prov_t.seconds + fin_t.seconds
    instrumented = lineage_s / max(t_on - lineage_s, 1e-9)
    ab = (t_on - t_off) / t_off if t_off else None

    with Store.open(on, read_only=True) as store:
        from twin_pipeline.audit import verify_all

        t0 = time.perf_counter()
        report = verify_all(store)
        t_verify = time.perf_counter() - t0
        key = store.con.execute(
            "SELECT lineage_key FROM deid.observation USING SAMPLE 1 ROWS"
        ).fetchone()
        t0 = time.perf_counter()
        tr = trace.trace(store, "deid.observation", str(key[0])) if key else None
        t_trace = time.perf_counter() - t0
        n_bundle = len(
            store.con.execute("SELECT prov_json FROM governance.prov_bundle").fetchone()[0]
        )

    out = {
        "patients": patients,
        "pipeline_without_lineage_s": round(t_off, 2) if t_off is not None else None,
        "pipeline_with_lineage_s": round(t_on, 2),
        "lineage_code_s": round(lineage_s, 3),
        "record_prov_calls": prov_t.calls,
        "record_prov_s": round(prov_t.seconds, 3),
        "finalize_s": round(fin_t.seconds, 3),
        "overhead_ratio_instrumented": round(instrumented, 4),
        "overhead_ratio_ab_wall": round(ab, 4) if ab is not None else None,
        "goal_ratio": GOAL,
        "meets_goal": instrumented <= GOAL,
        "verify_s": round(t_verify, 3),
        "verify_ok": report.ok,
        "trace_s": round(t_trace, 3),
        "trace_verified": bool(tr and tr.verified),
        "bundle_bytes": n_bundle,
    }
    if t_off is not None and ab is not None:
        print(
            f"   pipeline without lineage {t_off:.1f} s, with lineage {t_on:.1f} s "
            f"(A/B ratio {ab:+.3f}x, noisy)"
        )
    else:
        print(f"   pipeline with lineage {t_on:.1f} s (A/B run without lineage: not in --quick)")
    print(
        f"   lineage code {lineage_s:.2f} s over {prov_t.calls} materializations "
        f"(PROV fragments {prov_t.seconds:.2f} s, bundle+signature+OpenLineage {fin_t.seconds:.2f} s)"
    )
    print(
        f"   lineage overhead ratio (instrumented) {instrumented:.4f}x of pipeline time without "
        f"it; goal <= {GOAL}x: {'met' if instrumented <= GOAL else 'NOT met'}"
    )
    print(
        f"   twin audit verify {t_verify:.2f} s ({report.ledger_entries} entries, ok={report.ok}); "
        f"trace {t_trace:.2f} s (verified={out['trace_verified']}); bundle {n_bundle:,} bytes"
    )
    return out
