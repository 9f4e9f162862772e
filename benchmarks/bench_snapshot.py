"""Snapshot export throughput: rows of Parquet written per second (goal >= 1,000,000 rows/s).

Builds a de-identified store of ``--patients`` patients (default 20,000; 50 observations and
3 encounters each, i.e. ~1.1 M rows) in the bench workdir, then measures in the same run:

- **baseline**: DuckDB's own ``COPY (SELECT * FROM table) TO ... (FORMAT parquet)`` of the same
  tables, no policy, no ordering (the fastest Parquet this machine writes from the store);
- **snapshot**: ``create_snapshot`` as the researcher: gateway reads (consent filter, masks),
  cohort/k-anonymity, total order, deterministic Parquet, hashes, manifest, signature, audit,
  ledger activity and signed PROV bundle.

Prints rows/s of both and the ratio snapshot / baseline.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from twin_pipeline.activity import table_versions
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.snapshot import create_snapshot
from twin_pipeline.store import Store

TABLES = ("deid.patient", "deid.encounter", "deid.observation")


def build(settings: Settings, patients: int) -> int:
    KeyRing(settings.keys_dir).init(if_missing=True)
    with Store.open(settings) as store, store.transaction() as con:
        con.execute(
            "CREATE TABLE deid.patient AS SELECT 'd' || i AS patient_id, NULL::VARCHAR AS mrn, "
            "CASE WHEN i % 2 = 0 THEN 'female' ELSE 'male' END AS gender, "
            "CAST(1940 + i % 80 AS INTEGER) AS birth_year, 'MA' AS state, "
            "['021', '022', '100'][1 + i % 3] AS postal_code, (i % 10 <> 0) AS research_consent, "
            "false AS deleted, md5('p' || i) AS lineage_key, 1 AS key_version "
            f"FROM range({patients}) t(i)"
        )
        con.execute(
            "CREATE TABLE deid.encounter AS SELECT md5('e' || j) AS encounter_id, "
            f"'d' || (j % {patients}) AS patient_id, 'finished' AS status, 'AMB' AS class_code, "
            "TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_hours(j) AS period_start, "
            "false AS deleted, md5('le' || j) AS lineage_key, 1 AS key_version "
            f"FROM range({patients * 3}) t(j)"
        )
        con.execute(
            "CREATE TABLE deid.observation AS SELECT md5('o' || j) AS observation_id, "
            f"'d' || (j % {patients}) AS patient_id, md5('e' || (j % {patients * 3})) AS "
            "encounter_id, 'vital-signs' AS category, 'http://loinc.org' AS code_system, "
            "['8867-4', '8310-5', '59408-5', '9279-1'][1 + j % 4] AS code, "
            "60.0 + (j % 40) AS value, '/min' AS unit, "
            "TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_minutes(j) AS effective_at, "
            "'final' AS status, false AS deleted, md5('lo' || j) AS lineage_key, "
            "1 AS key_version "
            f"FROM range({patients * 50}) t(j)"
        )
        table_versions(store, list(TABLES))  # as the pipeline does: versions cached for readers
        total = sum(store.row_count(t) for t in TABLES)
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = getattr(args, "quick", False)
    patients = getattr(args, "patients", None) or (2_000 if quick else 20_000)
    root = Path(args.workdir) / "snapshot_bench"
    shutil.rmtree(root, ignore_errors=True)
    settings = Settings.from_env(root / "home").ensure()
    rows_in_store = build(settings, patients)

    # baseline: plain DuckDB COPY of the same tables
    base_dir = root / "baseline"
    base_dir.mkdir()
    base_rows = 0
    with Store.open(settings) as store:
        t0 = time.perf_counter()
        for t in TABLES:
            store.con.execute(
                f"COPY (SELECT * FROM twin.{t}) TO '{base_dir / (t + '.parquet')}' "
                "(FORMAT parquet, COMPRESSION zstd)"
            )
            base_rows += store.row_count(t)
        base_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = create_snapshot("researcher", root / "snap", settings=settings, tables=list(TABLES))
    snap_s = time.perf_counter() - t0

    base_rps = base_rows / base_s if base_s else 0.0
    snap_rps = result.rows / snap_s if snap_s else 0.0
    out = {
        "patients": patients,
        "rows_in_store": rows_in_store,
        "baseline_copy": {
            "rows": base_rows,
            "seconds": round(base_s, 3),
            "rows_per_s": round(base_rps),
        },
        "snapshot": {
            "rows": result.rows,
            "seconds": round(snap_s, 3),
            "rows_per_s": round(snap_rps),
            "bytes": result.bytes,
            "patients_released": result.disclosure["patients_released"],
            "patients_suppressed": result.disclosure["patients_suppressed"],
        },
        "ratio_snapshot_to_baseline": round(snap_rps / base_rps, 3) if base_rps else None,
        "goal_rows_per_s": 1_000_000,
        "goal_met": snap_rps >= 1_000_000,
    }
    print(
        f"   baseline DuckDB COPY : {base_rows:>10,} rows in {base_s:6.2f} s = {base_rps:>12,.0f} rows/s"
    )
    print(
        f"   snapshot (governed)  : {result.rows:>10,} rows in {snap_s:6.2f} s = {snap_rps:>12,.0f} rows/s"
    )
    print(
        f"   ratio snapshot/baseline = {out['ratio_snapshot_to_baseline']}; "
        f"goal 1,000,000 rows/s {'met' if out['goal_met'] else 'NOT met'}"
    )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_snapshot")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"))
    run(parser.parse_args())
