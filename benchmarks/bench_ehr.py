"""EHR benchmark: the same FHIR NDJSON loaded two ways in one run.

* **plain**: DuckDB ``read_json`` of each NDJSON file into a table (no validation, no lineage,
  unencrypted) — the baseline.
* **governed**: the ``fhir`` reader into the encrypted store (every resource validated against
  the R4B models, hashes, lineage keys, quarantine, source registry), then harmonization
  (versions, 15 tables, unit conversion, references, dangling references).

Prints both times, the ratios and resources/s, the reader's per-stage profile and how many
resources the full pydantic model validated versus the shape-compiled fast path.
Data: the Synthea export in ``../shared/data/synthea-10`` plus the bulk NDJSON of a generated
hospital (``--patients``; clean, so the plain load does not fail on planted defects).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb

from twin_pipeline.paths import SHARED_DATA_DIR, Settings


def _dataset(workdir: Path, patients: int) -> Path:
    from twin_pipeline.generate.core import generate_hospital

    landing = workdir / f"landing-{patients}"
    marker = landing / ".complete"
    if not marker.exists():
        shutil.rmtree(landing, ignore_errors=True)
        gen = workdir / f"gen-{patients}"
        shutil.rmtree(gen, ignore_errors=True)
        generate_hospital(gen, patients=patients, seed=20, dirty_rate=0.0)
        (landing / "ehr").mkdir(parents=True)
        shutil.copytree(gen / "ehr" / "bulk", landing / "ehr" / "generated")
        synthea = SHARED_DATA_DIR / "synthea-10"
        if synthea.is_dir():
            dst = landing / "ehr" / "synthea"
            dst.mkdir()
            for f in synthea.glob("*.000.ndjson"):
                shutil.copy(f, dst / f.name)
        shutil.rmtree(gen, ignore_errors=True)
        marker.touch()
    return landing


def _plain(files: list[Path], db: Path) -> tuple[float, float, int]:
    db.unlink(missing_ok=True)
    con = duckdb.connect(str(db))
    c0 = time.process_time()
    t0 = time.perf_counter()
    n = 0
    for i, f in enumerate(files):
        con.execute(
            f"CREATE TABLE t{i} AS SELECT * FROM read_json(?, format='newline_delimited')",
            [str(f)],
        )
        row = con.execute(f"SELECT count(*) FROM t{i}").fetchone()
        n += int(row[0]) if row else 0
    con.execute("CHECKPOINT")
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    con.close()
    return dt, cpu, n


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _governed(landing: Path, home: Path) -> dict[str, Any]:
    from twin_pipeline.harmonize import fhir as ehr
    from twin_pipeline.ingest import files_of_kind, ingest_files
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.sources import fhir as fhir_reader
    from twin_pipeline.sources import load_readers
    from twin_pipeline.store import Store

    shutil.rmtree(home, ignore_errors=True)
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init()
    reader = load_readers()["fhir"]
    files = files_of_kind(landing, "fhir")
    t0 = time.perf_counter()
    with Store.open(settings) as store:
        t_open = time.perf_counter()
        c_open = time.process_time()
        w_open = _children_cpu()
        result = ingest_files(store, reader, files)
        t_ingest = time.perf_counter()
        c_ingest = time.process_time()
        w_ingest = _children_cpu()  # the validation pool ends with the load: its CPU counts
        ehr.build_all(store)
        t_harm = time.perf_counter()
        c_harm = time.process_time()
        balance = ehr.conservation(store)
        store.con.execute("CHECKPOINT")
    t_end = time.perf_counter()
    profile = dict(fhir_reader.LAST_PROFILE)
    # a second run over the same files: nothing new to read, same tables
    t1 = time.perf_counter()
    with Store.open(settings) as store:
        ingest_files(store, reader, files)
        ehr.build_all(store)
    t_rerun = time.perf_counter() - t1
    return {
        "records_in": result.stats.records_in,
        "loaded": result.stats.loaded,
        "quarantined": result.stats.quarantined,
        "open_s": t_open - t0,
        "ingest_s": t_ingest - t_open,
        "harmonize_s": t_harm - t_ingest,
        "ingest_cpu_s": c_ingest - c_open + w_ingest - w_open,
        "ingest_worker_cpu_s": w_ingest - w_open,
        "harmonize_cpu_s": c_harm - c_ingest,
        "total_s": t_end - t0,
        "rerun_s": t_rerun,
        "balanced_files": sum(1 for b in balance if b["balanced"]),
        "files": len(balance),
        "reader_profile_s": {k: round(v, 3) for k, v in profile.items()},
        "validation": fhir_reader.validation_stats(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = args.patients or (150 if args.quick else 600)
    workdir = Path(args.workdir) / "ehr"
    workdir.mkdir(parents=True, exist_ok=True)
    landing = _dataset(workdir, patients)
    files = sorted(landing.rglob("*.ndjson"))
    files = [f for f in files if f.name != "log.ndjson"]
    plain_s, plain_cpu, plain_rows = _plain(files, workdir / "plain.duckdb")
    # single process (validation in-process), then with the validation pool if there are cores
    import os

    from twin_pipeline.sources import fhir as fhir_reader

    saved = os.environ.get("TWIN_FHIR_WORKERS")
    os.environ["TWIN_FHIR_WORKERS"] = "1"
    gov = _governed(landing, workdir / "home")
    pool: dict[str, Any] | None = None
    if (os.cpu_count() or 1) >= 2:
        os.environ["TWIN_FHIR_WORKERS"] = str(os.cpu_count())
        min_before = fhir_reader.PARALLEL_MIN
        fhir_reader.PARALLEL_MIN = 1000
        try:
            pool = _governed(landing, workdir / "home-pool")
        finally:
            fhir_reader.PARALLEL_MIN = min_before
            fhir_reader.shutdown_pool()
    if saved is None:
        os.environ.pop("TWIN_FHIR_WORKERS", None)
    else:
        os.environ["TWIN_FHIR_WORKERS"] = saved
    n = gov["records_in"]
    out = {
        "resources": n,
        "files": len(files),
        "plain_read_json_s": round(plain_s, 3),
        "plain_rows": plain_rows,
        "governed_ingest_s": round(gov["ingest_s"], 3),
        "governed_ingest_plus_harmonize_s": round(gov["ingest_s"] + gov["harmonize_s"], 3),
        "ratio_ingest_vs_plain": round(gov["ingest_s"] / plain_s, 2),
        "ratio_ingest_plus_harmonize_vs_plain": round(
            (gov["ingest_s"] + gov["harmonize_s"]) / plain_s, 2
        ),
        "ingest_resources_per_s": round(n / gov["ingest_s"]),
        "ingest_plus_harmonize_resources_per_s": round(n / (gov["ingest_s"] + gov["harmonize_s"])),
        "plain_resources_per_s": round(plain_rows / plain_s),
        # CPU seconds (all threads of this process): meaningful on a shared, loaded machine
        "plain_cpu_s": round(plain_cpu, 3),
        "ratio_ingest_cpu_vs_plain_cpu": round(gov["ingest_cpu_s"] / plain_cpu, 2),
        "ingest_resources_per_cpu_s": round(n / gov["ingest_cpu_s"]),
        "ingest_plus_harmonize_resources_per_cpu_s": round(
            n / (gov["ingest_cpu_s"] + gov["harmonize_cpu_s"])
        ),
        **{k: v for k, v in gov.items() if k not in ("records_in",)},
    }
    print(f"   resources: {n:,} in {len(files)} NDJSON files")
    print(
        f"   plain DuckDB read_json:       {plain_s:7.3f} s  ({out['plain_resources_per_s']:,}/s)"
    )
    print(
        f"   governed ingest (validate+raw): {gov['ingest_s']:7.3f} s  "
        f"({out['ingest_resources_per_s']:,}/s)  ratio {out['ratio_ingest_vs_plain']}x"
    )
    print(
        f"   + harmonize (15 tables):        {gov['harmonize_s']:7.3f} s  total "
        f"({out['ingest_plus_harmonize_resources_per_s']:,}/s)  ratio "
        f"{out['ratio_ingest_plus_harmonize_vs_plain']}x"
    )
    print(
        f"   CPU seconds: plain {plain_cpu:.3f}, ingest {gov['ingest_cpu_s']:.3f} "
        f"({out['ratio_ingest_cpu_vs_plain_cpu']}x; {out['ingest_resources_per_cpu_s']:,} "
        f"resources per CPU-s), harmonize {gov['harmonize_cpu_s']:.3f} "
        f"(ingest+harmonize {out['ingest_plus_harmonize_resources_per_cpu_s']:,}/CPU-s)"
    )
    if pool is not None:
        out["pool_ingest_s"] = round(pool["ingest_s"], 3)
        out["pool_ratio_ingest_vs_plain"] = round(pool["ingest_s"] / plain_s, 2)
        out["pool_ingest_resources_per_s"] = round(n / pool["ingest_s"])
        out["pool_ingest_cpu_s"] = round(pool["ingest_cpu_s"], 3)
        out["pool_ingest_worker_cpu_s"] = round(pool["ingest_worker_cpu_s"], 3)
        print(
            f"   governed ingest, {os.cpu_count()}-process validation pool: "
            f"{pool['ingest_s']:7.3f} s ({out['pool_ingest_resources_per_s']:,}/s)  ratio "
            f"{out['pool_ratio_ingest_vs_plain']}x; CPU {pool['ingest_cpu_s']:.2f} s "
            f"({pool['ingest_worker_cpu_s']:.2f} in workers)"
        )
    print(f"   rerun, no new files:           {gov['rerun_s']:7.3f} s")
    print(f"   reader profile (s): {gov['reader_profile_s']}")
    print(f"   validation: {gov['validation']}")
    print(f"   conservation: {gov['balanced_files']}/{gov['files']} files balanced")
    return out


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--patients", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=Settings.from_env().home / "bench")
    ns = p.parse_args(sys.argv[1:])
    run(ns)
