"""Expectation time as a ratio of harmonization time for the same data (goal <= 0.5x).

A generated hospital (1 % dirty records) is landed and harmonized through the Dagster graph
(raw, harmonized and governance assets with their asset checks), in one process as
``twin run`` does. Baseline: the harmonized/* asset steps. Measured: the expectation-suite
asset check steps of the same run, with everything the pipeline pays for them: validation,
quarantine, results, the ledger record, Dagster's step overhead, and a Great Expectations
import if a step needed one (they do not: every expectation is pushed down into DuckDB and
Data Docs are rendered on demand). Both are printed in wall seconds (from Dagster's step
events) and in CPU seconds (process CPU sampled across each step: the machine this runs on is
shared, so CPU is the steadier figure).

Then, for the record: ``twin quality docs`` renders the Data Docs of that run in a fresh
process (GX import included), the GX import is timed alone, and the suites are re-run
in-process on the harmonized store (no quarantine) with each engine: ``gx`` (pandas
DataFrames validated by Great Expectations) and ``sql`` (pushed down into DuckDB, what the
pipeline uses; ``--quick`` runs only this one).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twin_pipeline.activity import activities
from twin_pipeline.defs.runner import dagster_instance, run_pipeline, step_spans
from twin_pipeline.generate import generate_hospital
from twin_pipeline.generate.vocab import GENERATOR_VERSION
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.procs import children_cpu_seconds, cpu_seconds
from twin_pipeline.quality import gx as gxa
from twin_pipeline.quality import load_suites, run_suite
from twin_pipeline.quality.catalog import Catalog
from twin_pipeline.store import Store

_GX_IMPORT = (
    "import time, twin_pipeline.definitions\n"
    "from twin_pipeline.quality import gx\n"
    "c, w = time.process_time(), time.perf_counter()\n"
    "gx.context()\n"
    "print(time.process_time() - c, time.perf_counter() - w)\n"
)


def _selection() -> list[str]:
    from twin_pipeline.definitions import defs

    return sorted(
        k.to_user_string()
        for k in defs.resolve_all_asset_keys()
        if k.path[0] in {"raw", "harmonized", "governance"}
    )


class CpuSampler:
    """Samples (wall clock, process CPU) every ``interval`` seconds in a thread, so the CPU
    spent between two wall times (Dagster's step start and end events) can be read back."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        self.walls.append(time.time())
        self.cpus.append(cpu_seconds())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def running(self) -> Iterator[CpuSampler]:
        self._sample()
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self._sample()

    def at(self, wall: float) -> float:
        """Process CPU at wall time ``wall`` (linear between the nearest samples)."""
        i = bisect.bisect_left(self.walls, wall)
        if i <= 0:
            return self.cpus[0]
        if i >= len(self.walls):
            return self.cpus[-1]
        w0, w1, c0, c1 = self.walls[i - 1], self.walls[i], self.cpus[i - 1], self.cpus[i]
        return c0 + (c1 - c0) * ((wall - w0) / (w1 - w0) if w1 > w0 else 1.0)


def _step_times(settings: Settings, run_id: str, sampler: CpuSampler) -> dict[str, list[float]]:
    """step -> [wall seconds, CPU seconds] from the run's STEP_START/STEP_SUCCESS events."""
    spans = step_spans(dagster_instance(settings), run_id)
    return {k: [t1 - t0, sampler.at(t1) - sampler.at(t0)] for k, (t0, t1) in spans.items()}


def _is_check(step: str) -> bool:
    return step.startswith("expectation_suites") or step.endswith("_expectations")


def _same_hospital(landing: Path, patients: int, *, seed: int, dirty_rate: float) -> bool:
    try:
        m = json.loads((landing / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(
        m.get("patients") == patients
        and m.get("seed") == seed
        and m.get("dirty_rate") == dirty_rate
        and m.get("generator_version") == GENERATOR_VERSION
    )


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = args.patients or (200 if args.quick else 1000)
    work = Path(args.workdir) / "quality"
    # A fresh store every run; the generated hospital is kept while its manifest matches.
    shutil.rmtree(work / "home", ignore_errors=True)
    landing = work / f"landing-{patients}"
    if not _same_hospital(landing, patients, seed=17, dirty_rate=0.01):
        shutil.rmtree(landing, ignore_errors=True)
        generate_hospital(landing, patients=patients, seed=17, dirty_rate=0.01)
    settings = Settings.from_env(work / "home").ensure()
    KeyRing(settings.keys_dir).init()

    # A file-backed Dagster instance (as `twin run` uses) so the step events can be read back.
    gx_before = "great_expectations" in sys.modules
    sampler = CpuSampler()
    with sampler.running():
        # Data Docs are rendered after the run's steps; they are timed on their own below.
        summary = run_pipeline(landing, settings, selection=_selection(), data_docs=False)
    steps = _step_times(settings, summary.run_id, sampler)
    harm = [v for k, v in steps.items() if k.startswith("harmonized/") and not _is_check(k)]
    checks = {k: v for k, v in steps.items() if _is_check(k)}
    harm_wall, harm_cpu = sum(v[0] for v in harm), sum(v[1] for v in harm)
    chk_wall, chk_cpu = sum(v[0] for v in checks.values()), sum(v[1] for v in checks.values())
    n_suites = len(load_suites())
    with Store.open(settings, read_only=True) as store:
        quality = [
            a["params"]
            for a in activities(store, summary.run_id)
            if a["params"].get("stage") == "quality"
        ]
    validate_wall = sum(float(p.get("seconds", 0.0)) for p in quality)
    validate_cpu = sum(float(p.get("cpu_seconds", 0.0)) for p in quality)
    result: dict[str, Any] = {
        "patients": patients,
        "pipeline_success": summary.success,
        "pipeline_failures": summary.failures,
        "suites": n_suites,
        "harmonize_s": round(harm_wall, 3),
        "harmonize_cpu_s": round(harm_cpu, 3),
        "harmonize_steps": len(harm),
        "checks_s": round(chk_wall, 3),
        "checks_cpu_s": round(chk_cpu, 3),
        "ratio_checks_to_harmonize": _ratio(chk_wall, harm_wall),
        "ratio_checks_to_harmonize_cpu": _ratio(chk_cpu, harm_cpu),
        "check_steps": {k: [round(x, 3) for x in v] for k, v in checks.items()},
        "checks_validation_s": round(validate_wall, 3),
        "checks_validation_cpu_s": round(validate_cpu, 3),
    }
    print(
        f"   {patients} patients; harmonization ({len(harm)} steps): {harm_wall:.2f} s wall, "
        f"{harm_cpu:.2f} s CPU (baseline)"
    )
    print(
        f"   {n_suites} expectation suites as asset checks ({len(checks)} steps): "
        f"{chk_wall:.2f} s wall, {chk_cpu:.2f} s CPU"
    )
    print(
        f"   ratio expectations / harmonization: {result['ratio_checks_to_harmonize']}x wall, "
        f"{result['ratio_checks_to_harmonize_cpu']}x CPU (goal <= 0.5x)"
    )
    gx_after = "great_expectations" in sys.modules
    result["gx_imported_by_checks"] = "already loaded" if gx_before else gx_after
    print(
        f"   of the checks: validation, quarantine, results and ledger {validate_wall:.2f} s "
        f"wall, {validate_cpu:.2f} s CPU; the rest is Dagster step overhead (store opening, "
        f"events). GX imported by the checks: {result['gx_imported_by_checks']}"
    )

    env = {**os.environ, "TWIN_HOME": str(settings.home)}
    kids0, w0 = children_cpu_seconds(), time.perf_counter()
    docs = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "quality", "docs"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    docs_cpu, docs_wall = children_cpu_seconds() - kids0, time.perf_counter() - w0
    result["data_docs_ok"] = docs.returncode == 0 and "rendered" in docs.stdout
    result["data_docs_s"] = round(docs_wall, 3)
    result["data_docs_cpu_s"] = round(docs_cpu, 3)
    print(
        f"   Data Docs render (`twin quality docs`, as at the end of `twin run`; fresh process, "
        f"GX import included): "
        f"{docs_wall:.2f} s wall, {docs_cpu:.2f} s CPU; ok={result['data_docs_ok']}"
    )

    out = subprocess.run(
        [sys.executable, "-c", _GX_IMPORT], capture_output=True, text=True, check=False
    )
    try:
        gx_cpu, gx_wall = (float(x) for x in out.stdout.split())
    except ValueError:
        gx_cpu = gx_wall = float("nan")
    result["gx_import_cpu_s"] = round(gx_cpu, 3)
    result["gx_import_s"] = round(gx_wall, 3)
    print(
        f"   GX import and context alone (fresh process, definitions loaded): {gx_wall:.2f} s "
        f"wall, {gx_cpu:.2f} s CPU, paid once per process"
    )

    suites = list(load_suites().values())
    # The GX engine's in-process figure is for the record (the pipeline pushes every
    # expectation down into DuckDB); --quick leaves it out, as it takes ~17 s of the ~5 min.
    engines = ("sql",) if args.quick else ("gx", "sql")
    if "gx" in engines:
        gxa.context()
    else:
        print("   suites in-process, engine=gx : not in --quick")
    with Store.open(settings) as store:
        catalog = Catalog(store)
        rows = {s.table: store.row_count(s.table) for s in suites if catalog.exists(s.table)}
        result["rows_validated"] = sum(rows.values())
        for engine in engines:
            c0, w0 = cpu_seconds(), time.perf_counter()
            for s in suites:
                if s.table in rows:
                    run_suite(
                        store, s, quarantine=False, record=False, engine=engine, catalog=catalog
                    )
            wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
            result[f"library_{engine}_s"] = round(wall, 3)
            result[f"library_{engine}_cpu_s"] = round(cpu, 3)
            result[f"ratio_library_{engine}_cpu"] = _ratio(cpu, harm_cpu)
            print(
                f"   suites in-process, engine={engine:3s}: {wall:.2f} s wall, {cpu:.2f} s CPU "
                f"= {result[f'ratio_library_{engine}_cpu']}x harmonization CPU"
            )
    print(f"   ({result['rows_validated']:,} rows in {len(rows)} tables)")
    return result
