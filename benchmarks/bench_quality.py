"""Expectation time as a ratio of harmonization time for the same data (goal <= 0.5x).

A generated hospital is landed and harmonized through the Dagster graph (raw, harmonized and
governance assets with their asset checks). Baseline: the wall seconds of the harmonized/*
asset steps. Measured: the seconds of the expectation-suite asset checks in the same run
(GX import, validation, quarantine, results, ledger record and Data Docs included). Then the
suites are re-run in-process on the harmonized store (no quarantine) with each engine: ``gx``
(pandas DataFrames through Great Expectations), ``sql`` (pushed down into DuckDB) and ``auto``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twin_pipeline.activity import activities
from twin_pipeline.defs.runner import run_pipeline
from twin_pipeline.generate import generate_hospital
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.quality import gx as gxa
from twin_pipeline.quality import load_suites, run_suite
from twin_pipeline.store import Store


def _selection() -> list[str]:
    from twin_pipeline.definitions import defs

    return sorted(
        k.to_user_string()
        for k in defs.resolve_all_asset_keys()
        if k.path[0] in {"raw", "harmonized", "governance"}
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = args.patients or (200 if args.quick else 1000)
    work = Path(args.workdir) / "quality"
    shutil.rmtree(work, ignore_errors=True)
    landing = work / "landing"
    generate_hospital(landing, patients=patients, seed=17, dirty_rate=0.01)
    settings = Settings.from_env(work / "home").ensure()
    KeyRing(settings.keys_dir).init()

    summary = run_pipeline(landing, settings, selection=_selection(), ephemeral=True)
    steps = summary.steps_s
    is_check = lambda k: k.startswith("expectation_suites") or k.endswith("_expectations")  # noqa: E731
    harmonize_s = sum(
        v for k, v in steps.items() if k.startswith("harmonized/") and not is_check(k)
    )
    checks_s = sum(v for k, v in steps.items() if is_check(k))
    n_checks = len(load_suites())

    with Store.open(settings, read_only=True) as store:
        validate_s = sum(
            float(a["params"].get("seconds", 0.0))
            for a in activities(store, summary.run_id)
            if a["params"].get("stage") == "quality"
        )
    result: dict[str, Any] = {
        "patients": patients,
        "pipeline_success": summary.success,
        "pipeline_failures": summary.failures,
        "harmonize_s": round(harmonize_s, 3),
        "checks_s": round(checks_s, 3),
        "checks": n_checks,
        "ratio_checks_to_harmonize": round(checks_s / harmonize_s, 3) if harmonize_s else None,
        "check_steps_s": {k: round(v, 3) for k, v in steps.items() if is_check(k)},
        "checks_validation_s": round(validate_s, 3),
        "ratio_validation_to_harmonize": round(validate_s / harmonize_s, 3)
        if harmonize_s
        else None,
    }
    print(f"   {patients} patients; harmonization steps {harmonize_s:.2f} s (baseline)")
    print(
        f"   {n_checks} expectation suites checked in the pipeline: {checks_s:.2f} s "
        f"= {result['ratio_checks_to_harmonize']}x harmonization (goal <= 0.5x), in "
        f"{len(result['check_steps_s'])} steps"
    )
    print(
        f"   of which validation, quarantine and results: {validate_s:.2f} s "
        f"= {result['ratio_validation_to_harmonize']}x harmonization; the rest is the Data Docs "
        "render (GX import, once per process), store opening and Dagster step overhead"
    )

    suites = list(load_suites().values())
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t = time.perf_counter(); import great_expectations; "
            "print(time.perf_counter() - t)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    result["gx_import_s"] = round(float(out.stdout.strip() or "nan"), 3)
    gxa.context()
    with Store.open(settings) as store:
        rows = {s.table: store.row_count(s.table) for s in suites if store.table_exists(s.table)}
        result["rows_validated"] = sum(rows.values())
        for engine in ("gx", "sql", "auto"):
            t0 = time.perf_counter()
            for s in suites:
                if s.table in rows:
                    run_suite(store, s, quarantine=False, record=False, engine=engine)
            secs = time.perf_counter() - t0
            result[f"library_{engine}_s"] = round(secs, 3)
            result[f"ratio_library_{engine}"] = (
                round(secs / harmonize_s, 3) if harmonize_s else None
            )
            print(
                f"   suites in-process, engine={engine:4s}: {secs:.2f} s "
                f"= {result[f'ratio_library_{engine}']}x harmonization"
            )
    print(
        f"   ({result['rows_validated']:,} rows in {len(rows)} tables; "
        f"GX import {result['gx_import_s']:.1f} s, paid once per process)"
    )
    return result
