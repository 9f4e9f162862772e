"""EHR benchmark: the same FHIR NDJSON loaded two ways in one run.

* **plain**: DuckDB ``read_json`` of each NDJSON file into a table (no validation, no lineage,
  unencrypted) — the baseline.
* **governed**: the ``fhir`` reader into the encrypted store (every resource validated against
  the R4B models, hashes, lineage keys, quarantine, source registry), then harmonization
  (versions, 15 tables, unit conversion, references, dangling references). Both loads end
  with a ``CHECKPOINT`` inside their timing (data compressed in the database file); the
  times at commit, before it (durable in the write-ahead log), are printed too.

The governed ingest runs twice: with the reader's own choice of process pool (what the
``raw/fhir`` asset runs: the pool when the chunk is large enough to pay) and forced into one
process (``TWIN_FHIR_WORKERS=1``). Validation caches are emptied before each run (every run
starts cold, like a fresh pipeline process); the one-off imports a process pays before its
first load (pyarrow, pandas, the FHIR models) are measured apart and printed.

Prints times, ratios to the plain load, resources/s (wall and per CPU-second, pool workers
included), the reader's stage profile and how many resources the full pydantic model
validated versus the shape-compiled fast path. Data: the Synthea export in
``../shared/data/synthea-10`` plus the bulk NDJSON of a generated hospital (``--patients``;
clean, so the plain load does not fail on planted defects); the full run adds the same data
scaled to ~100,000 resources (copies with every UUID rewritten, references still resolving),
so fixed costs do not dominate the rate.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import duckdb

from twin_pipeline.paths import SHARED_DATA_DIR, Settings
from twin_pipeline.procs import children_cpu_seconds


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


_UUID = re.compile(r"\b[0-9a-f]{8}(-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


def _scaled(workdir: Path, base: Path, copies: int) -> Path:
    """``copies`` copies of ``base``'s NDJSON, the first 8 hex digits of every UUID replaced by
    the copy number (ids distinct, references between resources of one copy still resolve)."""
    landing = workdir / f"scaled-{base.name}-x{copies}"
    marker = landing / ".complete"
    if marker.exists():
        return landing
    shutil.rmtree(landing, ignore_errors=True)
    for f in sorted(base.rglob("*.ndjson")):
        if f.name == "log.ndjson":
            continue
        rel = f.relative_to(base)
        text = f.read_text()
        for k in range(copies):
            out = landing / rel.parent / f"{rel.stem}.{k:03d}.ndjson"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                text if k == 0 else _UUID.sub(lambda m, k=k: f"{k:08x}{m.group(1)}", text)
            )
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
    committed = time.perf_counter() - t0
    con.execute("CHECKPOINT")
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    con.close()
    _PLAIN_COMMITTED[db] = committed
    return dt, cpu, n


_PLAIN_COMMITTED: dict[Path, float] = {}  # the plain load's time before its CHECKPOINT


def _warm_process() -> float:
    """Import what any first load in a process imports (seconds): not part of a load."""
    t0 = time.perf_counter()
    import pyarrow as pa

    from twin_pipeline.sources import fhir as fhir_reader

    pa.array(["x"])  # pyarrow's first array imports pandas (~0.2 s)
    fhir_reader._warm()
    return time.perf_counter() - t0


def _governed(landing: Path, home: Path, *, harmonize: bool = True) -> dict[str, Any]:
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
    fhir_reader.reset_validation()  # every run starts cold
    t0 = time.perf_counter()
    with Store.open(settings) as store:
        t_open = time.perf_counter()
        c_open = time.process_time()
        w_open = children_cpu_seconds()
        result = ingest_files(store, reader, files)
        t_committed = time.perf_counter()
        # on disk and compressed, as the plain load is (DuckDB checkpoints by itself only
        # once the write-ahead log passes 16 MB, so small loads would otherwise skip it)
        store.con.execute("CHECKPOINT")
        t_ingest = time.perf_counter()
        c_ingest = time.process_time()
        w_ingest = children_cpu_seconds()  # the validation pool ends with the load: its CPU counts
        profile = dict(fhir_reader.LAST_PROFILE)
        validation = fhir_reader.validation_stats()
        if harmonize:
            ehr.build_all(store)
        t_harm = time.perf_counter()
        c_harm = time.process_time()
        balance = ehr.conservation(store) if harmonize else []
        store.con.execute("CHECKPOINT")
    t_end = time.perf_counter()
    t_rerun = 0.0
    if harmonize:  # a second run over the same files: nothing new to read, same tables
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
        "ingest_committed_s": t_committed - t_open,
        "harmonize_s": t_harm - t_ingest,
        "ingest_cpu_s": c_ingest - c_open + w_ingest - w_open,
        "ingest_worker_cpu_s": w_ingest - w_open,
        "harmonize_cpu_s": c_harm - c_ingest,
        "total_s": t_end - t0,
        "rerun_s": t_rerun,
        "balanced_files": sum(1 for b in balance if b["balanced"]),
        "files": len(balance),
        "reader_profile_s": {k: round(v, 3) for k, v in profile.items()},
        "validation": validation,
    }


def _measure(landing: Path, workdir: Path, *, harmonize: bool) -> dict[str, Any]:
    """Plain load, then governed ingest forced into one process, then as the pipeline runs it
    (the reader decides on the pool), with harmonization after the latter."""
    files = sorted(f for f in landing.rglob("*.ndjson") if f.name != "log.ndjson")
    plain_s, plain_cpu, plain_rows = _plain(files, workdir / "plain.duckdb")
    from twin_pipeline.sources import fhir as fhir_reader

    saved = os.environ.get("TWIN_FHIR_WORKERS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        os.environ["TWIN_FHIR_WORKERS"] = "1"
        single = _governed(landing, workdir / "home-single", harmonize=False)
        os.environ["TWIN_FHIR_WORKERS"] = str(cores or 1)
        pool = _governed(landing, workdir / "home-pool", harmonize=False)
        if saved is None:
            os.environ.pop("TWIN_FHIR_WORKERS", None)
        else:
            os.environ["TWIN_FHIR_WORKERS"] = saved
        chosen = fhir_reader._workers()  # what the reader picks now (idle cores)
        gov = _governed(landing, workdir / "home", harmonize=harmonize)
    finally:
        if saved is None:
            os.environ.pop("TWIN_FHIR_WORKERS", None)
        else:
            os.environ["TWIN_FHIR_WORKERS"] = saved
    n = gov["records_in"]
    plain_committed = _PLAIN_COMMITTED[workdir / "plain.duckdb"]
    out: dict[str, Any] = {
        "plain_committed_s": round(plain_committed, 3),
        "governed_committed_s": round(gov["ingest_committed_s"], 3),
        "pool_committed_s": round(pool["ingest_committed_s"], 3),
        "single_process_committed_s": round(single["ingest_committed_s"], 3),
        "resources": n,
        "files": len(files),
        "plain_read_json_s": round(plain_s, 3),
        "plain_rows": plain_rows,
        "plain_cpu_s": round(plain_cpu, 3),
        "plain_resources_per_s": round(plain_rows / plain_s),
        "governed_ingest_s": round(gov["ingest_s"], 3),
        "ratio_ingest_vs_plain": round(gov["ingest_s"] / plain_s, 2),
        "ingest_resources_per_s": round(n / gov["ingest_s"]),
        "ingest_cpu_s": round(gov["ingest_cpu_s"], 3),
        "ingest_worker_cpu_s": round(gov["ingest_worker_cpu_s"], 3),
        "ingest_resources_per_cpu_s": round(n / gov["ingest_cpu_s"]),
        "ratio_ingest_cpu_vs_plain_cpu": round(gov["ingest_cpu_s"] / plain_cpu, 2),
        "single_process_ingest_s": round(single["ingest_s"], 3),
        "single_process_ingest_resources_per_s": round(n / single["ingest_s"]),
        "single_process_ingest_cpu_s": round(single["ingest_cpu_s"], 3),
        "single_process_ratio_vs_plain": round(single["ingest_s"] / plain_s, 2),
        "pool_workers": cores,
        "pool_ingest_s": round(pool["ingest_s"], 3),
        "pool_ingest_resources_per_s": round(n / pool["ingest_s"]),
        "pool_ingest_cpu_s": round(pool["ingest_cpu_s"], 3),
        "pool_ingest_worker_cpu_s": round(pool["ingest_worker_cpu_s"], 3),
        "pool_ratio_vs_plain": round(pool["ingest_s"] / plain_s, 2),
        "pipeline_workers_chosen": chosen,
        "load_average": round(os.getloadavg()[0], 2),
        **{k: v for k, v in gov.items() if k not in ("records_in",)},
    }
    print(f"   resources: {n:,} in {len(files)} NDJSON files")
    print(
        f"   plain DuckDB read_json:           {plain_s:7.3f} s  "
        f"({out['plain_resources_per_s']:,}/s; CPU {plain_cpu:.3f} s)"
    )
    print(
        f"   governed ingest, {cores}-process pool:  {pool['ingest_s']:7.3f} s  "
        f"({out['pool_ingest_resources_per_s']:,}/s)  ratio {out['pool_ratio_vs_plain']}x; "
        f"CPU {pool['ingest_cpu_s']:.3f} s ({pool['ingest_worker_cpu_s']:.3f} in workers)"
    )
    print(
        f"   governed ingest (pipeline path, {chosen} worker(s) at load "
        f"{out['load_average']}): {gov['ingest_s']:7.3f} s  "
        f"({out['ingest_resources_per_s']:,}/s)  ratio {out['ratio_ingest_vs_plain']}x; "
        f"CPU {gov['ingest_cpu_s']:.3f} s ({gov['ingest_worker_cpu_s']:.3f} in pool workers; "
        f"{out['ingest_resources_per_cpu_s']:,}/CPU-s, {out['ratio_ingest_cpu_vs_plain_cpu']}x "
        "plain CPU)"
    )
    print(
        f"   governed ingest, one process:     {single['ingest_s']:7.3f} s  "
        f"({out['single_process_ingest_resources_per_s']:,}/s)  ratio "
        f"{out['single_process_ratio_vs_plain']}x; CPU {single['ingest_cpu_s']:.3f} s "
        f"({round(n / single['ingest_cpu_s']):,}/CPU-s)"
    )
    print(
        "   committed, before the CHECKPOINT (resources/s): plain "
        f"{plain_committed:.3f} s ({round(n / plain_committed):,}/s); pool "
        f"{pool['ingest_committed_s']:.3f} s ({round(n / pool['ingest_committed_s']):,}/s); "
        f"pipeline path {gov['ingest_committed_s']:.3f} s "
        f"({round(n / gov['ingest_committed_s']):,}/s); one process "
        f"{single['ingest_committed_s']:.3f} s ({round(n / single['ingest_committed_s']):,}/s)"
    )
    if harmonize:
        both = gov["ingest_s"] + gov["harmonize_s"]
        out["governed_ingest_plus_harmonize_s"] = round(both, 3)
        out["ratio_ingest_plus_harmonize_vs_plain"] = round(both / plain_s, 2)
        out["ingest_plus_harmonize_resources_per_s"] = round(n / both)
        out["ingest_plus_harmonize_resources_per_cpu_s"] = round(
            n / (gov["ingest_cpu_s"] + gov["harmonize_cpu_s"])
        )
        print(
            f"   + harmonize (15 tables):          {gov['harmonize_s']:7.3f} s  total "
            f"{both:.3f} s ({out['ingest_plus_harmonize_resources_per_s']:,}/s)  ratio "
            f"{out['ratio_ingest_plus_harmonize_vs_plain']}x; harmonize CPU "
            f"{gov['harmonize_cpu_s']:.3f} s"
        )
        print(f"   rerun, no new files:              {gov['rerun_s']:7.3f} s")
        print(f"   conservation: {gov['balanced_files']}/{gov['files']} files balanced")
    print(f"   reader profile (s): {gov['reader_profile_s']}")
    print(f"   validation: {gov['validation']} (one process: {single['validation']})")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = args.patients or 150
    workdir = Path(args.workdir) / "ehr"
    workdir.mkdir(parents=True, exist_ok=True)
    landing = _dataset(workdir, patients)
    imports_s = _warm_process()
    print(f"   one-off process imports (pyarrow, pandas, FHIR models): {imports_s:.3f} s")
    out = _measure(landing, workdir, harmonize=True)
    out["process_imports_s"] = round(imports_s, 3)
    if not args.quick:
        copies = max(1, round(100_000 / max(1, out["resources"])))
        big = _scaled(workdir, landing, copies)
        print(f"   -- scaled x{copies} --")
        out["scaled"] = _measure(big, workdir, harmonize=True)
    return out


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--patients", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=Settings.from_env().home / "bench")
    ns = p.parse_args(sys.argv[1:])
    run(ns)
