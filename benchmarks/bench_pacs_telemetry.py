"""PACS and telemetry throughput, each against a baseline measured in the same run.

1. Telemetry readings/s: our path (raw ingest with line-level quarantine + incremental
   harmonization + minute aggregates + device gaps) vs a plain DuckDB load of the same files
   (``read_json``/``read_csv`` with explicit columns into a table of the same encrypted store).
   Goals: >= 1,000,000 readings/s and <= 2x the plain load.
2. DICOM headers/s: our reader (header row + DICOM JSON + private tags + truncation checks,
   written to the store; worker pool as configured, then one process) vs a bare
   ``pydicom.dcmread(stop_before_pixels=True)`` loop over the same files (500 files quick,
   5,000 otherwise), and CPU per file on pydicom-data's varied files. Goal: >= 2,000 files/s.
3. Watch mode: file drop to queryable (``harmonized.telemetry_reading`` holds the new file's
   rows) through ``twin watch`` rounds, vs the wall time of one plain Dagster run of the same
   selection. Goal: <= 5 s.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.procs import cpu_seconds
from twin_pipeline.store import Store

METRICS = (
    ("MDC_ECG_HEART_RATE", "/min", 60, 120),
    ("MDC_PULS_OXIM_SAT_O2", "%", 88, 100),
    ("MDC_RESP_RATE", "/min", 10, 30),
    ("MDC_PRESS_BLD_NONINV_SYS", "mm[Hg]", 90, 160),
)


def _home(root: Path, name: str) -> Settings:
    home = root / name
    shutil.rmtree(home, ignore_errors=True)
    s = Settings.from_env(home).ensure()
    KeyRing(s.keys_dir).init()
    return s


def make_telemetry(
    landing: Path, readings: int, files: int, seed: int = 7, *, with_patient: bool = True
) -> int:
    """NDJSON files (and one CSV) of bedside readings, one reading per device-metric-second."""
    rng = random.Random(seed)
    tdir = landing / "telemetry"
    tdir.mkdir(parents=True, exist_ok=True)
    per = readings // files
    n = 0
    for k in range(files):
        csv = k == files - 1
        path = tdir / (f"beds_{k:02d}.csv" if csv else f"monitors_{k:02d}.ndjson")
        with path.open("w") as fh:
            if csv:
                fh.write("device_id,patient_id,metric,value,unit,ts\n")
            for i in range(per):
                dev = k * 100 + i % 50
                metric, unit, lo, hi = METRICS[(i // 50) % len(METRICS)]
                sec = i // 200
                ts = f"2024-03-{5 + sec // 86400:02d}T{sec // 3600 % 24:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}-05:00"
                value = round(rng.uniform(lo, hi), 1)
                pat = f"pat-{dev}" if with_patient else ""
                if csv:
                    fh.write(f"mon-{dev},{pat},{metric},{value},{unit},{ts}\n")
                else:  # the bytes json.dumps writes, made by hand: 2M lines in seconds
                    pid = f'"{pat}"' if with_patient else "null"
                    fh.write(
                        f'{{"device_id": "mon-{dev}", "patient_id": {pid}, "metric": '
                        f'"{metric}", "value": {value}, "unit": "{unit}", "ts": "{ts}"}}\n'
                    )
                n += 1
    return n


def bench_telemetry(work: Path, readings: int) -> dict[str, Any]:
    """Our telemetry path (raw with line-level quarantine, harmonize, minute aggregates, device
    gaps) vs a plain DuckDB load of the same files into the same kind of store, wall and CPU,
    with each step's CPU seconds."""
    from twin_pipeline.harmonize import telemetry as T
    from twin_pipeline.ingest import ingest_files
    from twin_pipeline.sources import discover, load_readers

    landing = work / "tele_landing"
    shutil.rmtree(landing, ignore_errors=True)
    n = make_telemetry(landing, readings, files=8)
    files = sorted((landing / "telemetry").iterdir())
    ndjson = [str(p) for p in files if p.suffix == ".ndjson"]
    csv = [str(p) for p in files if p.suffix == ".csv"]
    cols = (
        "{'device_id': 'VARCHAR', 'patient_id': 'VARCHAR', 'metric': 'VARCHAR', "
        "'value': 'DOUBLE', 'unit': 'VARCHAR', 'ts': 'TIMESTAMPTZ'}"
    )
    # Baseline: plain DuckDB load into the same kind of (encrypted) store.
    base = _home(work, "home_plain")
    with Store.open(base) as store:
        t0, c0 = time.perf_counter(), cpu_seconds()
        with store.transaction() as con:
            con.execute(
                f"CREATE TABLE raw.plain AS SELECT * FROM read_json({ndjson}, "
                f"format='newline_delimited', columns={cols}) "
                f"UNION ALL SELECT * FROM read_csv({csv}, header=true, columns={cols})"
            )
        plain_s, plain_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        (plain_rows,) = store.con.execute("SELECT count(*) FROM raw.plain").fetchone() or (0,)
    # Ours.
    ours = _home(work, "home_ours")
    readers = load_readers()
    found, _ = discover(landing, readers)
    steps: dict[str, tuple[float, float]] = {}
    with Store.open(ours) as store:
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = ingest_files(store, readers["telemetry"], [f for f in found if f.kind == "telemetry"])
        steps["raw"] = (time.perf_counter() - t0, cpu_seconds() - c0)
        h = T.harmonize_readings(store)
        steps["harmonize"] = (time.perf_counter() - t0, cpu_seconds() - c0)
        T.build_minutes(store)
        T.build_gaps(store)
        steps["aggregates"] = (time.perf_counter() - t0, cpu_seconds() - c0)
        ours_s, ours_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    assert res.stats.loaded == n == plain_rows, (res.stats.loaded, n, plain_rows)
    # Each step's own share (the cumulative marks above, differenced).
    prev, own = (0.0, 0.0), {}
    for name, mark in steps.items():
        own[name] = (mark[0] - prev[0], mark[1] - prev[1])
        prev = mark
    out = {
        "readings": n,
        "plain_load_s": round(plain_s, 3),
        "plain_readings_per_s": round(n / plain_s),
        "ours_s": round(ours_s, 3),
        "ours_raw_s": round(own["raw"][0], 3),
        "ours_harmonize_s": round(own["harmonize"][0], 3),
        "ours_aggregates_s": round(own["aggregates"][0], 3),
        "ours_readings_per_s": round(n / ours_s),
        "ratio_ours_vs_plain": round(ours_s / plain_s, 2),
        "plain_cpu_s": round(plain_cpu, 3),
        "ours_cpu_s": round(ours_cpu, 3),
        "ours_cpu_by_step_s": {k: round(v[1], 3) for k, v in own.items()},
        "ours_readings_per_cpu_s": round(n / ours_cpu) if ours_cpu else None,
        "plain_readings_per_cpu_s": round(n / plain_cpu) if plain_cpu else None,
        "cpu_ratio_ours_vs_plain": round(ours_cpu / plain_cpu, 2) if plain_cpu else None,
        "harmonized": h.harmonized,
        "goal_readings_per_s": 1_000_000,
        "goal_ratio": 2.0,
    }
    by_step = ", ".join(f"{k} {v[0]:.2f} s / {v[1]:.2f} s CPU" for k, v in own.items())
    print(
        f"   telemetry: {n:,} readings; ours {out['ours_readings_per_s']:,}/s ({by_step}) "
        f"vs plain DuckDB load {out['plain_readings_per_s']:,}/s -> ratio "
        f"{out['ratio_ours_vs_plain']}x (goal >= 1,000,000/s and <= 2x); CPU {ours_cpu:.2f} s "
        f"vs {plain_cpu:.2f} s -> {out['cpu_ratio_ours_vs_plain']}x "
        f"({out['ours_readings_per_cpu_s']:,} vs {out['plain_readings_per_cpu_s']:,} "
        "readings per CPU second)",
        flush=True,
    )
    return out


def bench_dicom(work: Path, n_files: int) -> dict[str, Any]:
    """DICOM headers/s: our reader into the store (worker pool as configured, and one
    process) vs a bare ``pydicom.dcmread(stop_before_pixels=True)`` loop over the same files;
    then per-file CPU on pydicom-data's varied files (no repeated headers: the element cache
    of a series does not help there)."""
    import warnings

    import pyarrow  # noqa: F401 - loaded once per process (a Dagster run has it), not timed
    import pydicom
    from pydicom.data import get_testdata_file, get_testdata_files

    from twin_pipeline.ingest import ingest_files
    from twin_pipeline.sources import dicom as D
    from twin_pipeline.sources import discover, load_readers

    landing = work / "dicom_landing"
    shutil.rmtree(landing, ignore_errors=True)
    pacs = landing / "pacs"
    pacs.mkdir(parents=True)
    # Modality-sized headers like the sample hospital's: CT and MR test files with new UIDs
    # (a series: most of each header repeats from file to file, as in a real PACS).
    sources = [pydicom.dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    for i in range(n_files):
        ds = sources[i % len(sources)]
        ds.SOPInstanceUID = f"2.25.{10**20 + i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(pacs / f"{i:05d}.dcm", enforce_file_format=True)
    paths = sorted(pacs.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0, c0 = time.perf_counter(), cpu_seconds()
        for p in paths:
            pydicom.dcmread(p, stop_before_pixels=True)
        base_s, base_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    readers = load_readers()
    found, _ = discover(landing, readers)

    def ours(name: str, workers: str | None) -> tuple[float, float]:
        home = _home(work, name)
        old = os.environ.get("TWIN_DICOM_WORKERS")
        if workers is not None:
            os.environ["TWIN_DICOM_WORKERS"] = workers
        D.clear_cache()
        try:
            with Store.open(home) as store:
                t0, c0 = time.perf_counter(), cpu_seconds()
                res = ingest_files(store, readers["dicom"], found)
                spent = time.perf_counter() - t0, cpu_seconds() - c0
                rows = store.row_count(D.TABLE)
        finally:
            if workers is not None:
                if old is None:
                    os.environ.pop("TWIN_DICOM_WORKERS", None)
                else:
                    os.environ["TWIN_DICOM_WORKERS"] = old
        assert res.stats.loaded == rows == n_files, (res.stats.quarantined, rows)
        return spent

    ours_s, ours_cpu = ours("home_dicom", None)
    one_s, one_cpu = ours("home_dicom_one", "0")
    # Varied real files, one process, parse only (no store): ours vs dcmread, CPU per file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        varied = [
            Path(p)
            for p in get_testdata_files("*")
            if "data_store" in p and Path(p).suffix.lower() not in (".json", ".txt", ".gz")
        ]
        D.clear_cache()
        c0 = cpu_seconds()
        for p in varied:
            D._read_one(p, f"pacs/{p.name}")
        varied_ours = cpu_seconds() - c0
        c0 = cpu_seconds()
        for p in varied:
            try:
                pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:  # a file pydicom cannot read costs what it cost
                continue
        varied_base = cpu_seconds() - c0
    out = {
        "files": n_files,
        "ours_s": round(ours_s, 3),
        "ours_files_per_s": round(n_files / ours_s),
        "pydicom_dcmread_files_per_s": round(n_files / base_s),
        "ratio_ours_vs_dcmread": round(ours_s / base_s, 2),
        "ours_cpu_s": round(ours_cpu, 3),
        "dcmread_cpu_s": round(base_cpu, 3),
        "cpu_ratio_ours_vs_dcmread": round(ours_cpu / base_cpu, 2) if base_cpu else None,
        "ours_one_process_files_per_s": round(n_files / one_s),
        "ours_one_process_cpu_s": round(one_cpu, 3),
        "varied_files": len(varied),
        "varied_ours_cpu_ms_per_file": round(varied_ours / max(1, len(varied)) * 1e3, 3),
        "varied_dcmread_cpu_ms_per_file": round(varied_base / max(1, len(varied)) * 1e3, 3),
        "dicom_workers": os.environ.get("TWIN_DICOM_WORKERS", "2"),
        "pool_min_files": D.POOL_MIN_FILES,
        "cpus": os.cpu_count(),
        "goal_files_per_s": 2000,
    }
    pool = "worker pool" if n_files >= D.POOL_MIN_FILES and D._workers() >= 2 else "1 process"
    print(
        f"   dicom: {n_files:,} headers; ours {out['ours_files_per_s']:,} files/s "
        f"({pool}, store writes included) vs bare pydicom.dcmread "
        f"{out['pydicom_dcmread_files_per_s']:,} files/s -> ratio "
        f"{out['ratio_ours_vs_dcmread']}x (goal >= 2,000 files/s); CPU {ours_cpu:.2f} s vs "
        f"{base_cpu:.2f} s -> {out['cpu_ratio_ours_vs_dcmread']}x",
        flush=True,
    )
    print(
        f"   dicom: one process {out['ours_one_process_files_per_s']:,} files/s, CPU "
        f"{one_cpu:.2f} s; {len(varied)} varied pydicom-data files (parse only): ours "
        f"{out['varied_ours_cpu_ms_per_file']} ms CPU/file vs dcmread "
        f"{out['varied_dcmread_cpu_ms_per_file']} ms",
        flush=True,
    )
    return out


def watch_round(landing: Path, home: Settings, *, remove: bool = False) -> dict[str, Any]:
    """One ``twin watch`` round over ``landing`` (already ingested into ``home``): a watcher
    that has made its catch-up round (definitions imported, the landing snapshot taken) sees
    a new telemetry file dropped into ``landing/telemetry``. Returns the seconds from the drop
    to ``harmonized.telemetry_reading`` holding it (committed) and to the round's end, and the
    round's steps. ``remove``: take the file out of the landing again afterwards (a generated
    hospital the benchmarks reuse); its reading stays in the store."""
    from twin_pipeline.watch import (
        WatchRound,
        landing_snapshot,
        materialized_at,
        selection_for,
        watch,
    )

    rounds: list[tuple[float, WatchRound]] = []
    dropped: dict[str, float] = {}
    new = landing / "telemetry" / "late_arrival.ndjson"
    stamp = time.time()  # a new reading each time: never a file the store already has
    line = json.dumps(
        {
            "device_id": "mon-new",
            "metric": "HR",
            "value": 60 + int(stamp * 1000) % 40,
            "unit": "bpm",
            "ts": f"2024-03-05T12:{int(stamp) % 60:02d}:{int(stamp * 10) % 60:02d}Z",
        }
    )

    def on_round(r: WatchRound) -> None:
        rounds.append((time.perf_counter(), r))

    def drop() -> None:
        time.sleep(1.0)  # the watcher is polling by now
        tmp = landing / ".late_arrival.tmp"
        tmp.write_text(line + "\n")
        dropped["t"] = time.perf_counter()
        dropped["epoch"] = time.time()
        tmp.rename(new)

    from twin_pipeline.defs.runner import dagster_instance

    known = landing_snapshot(landing)
    # What the watcher's catch-up round loaded: the definitions, Dagster's storage modules.
    selection_for(["telemetry/x.ndjson"], "harmonized")
    dagster_instance(home).dispose()
    th = threading.Thread(target=drop, daemon=True)
    th.start()
    try:
        watch(landing, home, interval=0.25, max_rounds=1, on_round=on_round, known=known)
        th.join()
    finally:
        if remove:
            new.unlink(missing_ok=True)
    end, last = rounds[-1]
    latency = end - dropped["t"]  # to the end of the whole round (PROV signing, status, ...)
    committed = materialized_at(home, last.run_id).get("harmonized/telemetry_reading")
    queryable = committed - dropped["epoch"] if committed else latency
    with Store.open(home, read_only=True) as store:
        (n_new,) = store.con.execute(
            "SELECT count(*) FROM harmonized.telemetry_reading WHERE device_id = 'mon-new' "
            "AND original_value = ?",
            [json.loads(line)["value"]],
        ).fetchone() or (0,)
    assert last.success and n_new >= 1, (last.failures, n_new)
    return {
        "drop_to_queryable_s": round(queryable, 2),
        "drop_to_round_end_s": round(latency, 2),
        "round_steps_s": {k: round(v, 2) for k, v in sorted(last.steps_s.items())},
        "round_assets": len(last.selection),
        "round_wall_s": round(last.wall_s, 2),
        "goal_s": 5.0,
    }


def bench_watch(work: Path) -> dict[str, Any]:
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.watch import selection_for

    landing = work / "watch_landing"
    shutil.rmtree(landing, ignore_errors=True)
    # No patient ids: this landing has no EHR, and the quality gate rejects unknown patients.
    make_telemetry(landing, 20_000, files=2, with_patient=False)
    # One EHR patient, so the quality gate's patient reference check can run.
    ehr = landing / "ehr" / "bulk"
    ehr.mkdir(parents=True)
    (ehr / "Patient.ndjson").write_text(
        json.dumps({"resourceType": "Patient", "id": "pat-bench", "gender": "female"}) + "\n"
    )
    home = _home(work, "home_watch")
    # Catch-up run of the telemetry lane and the EHR tables it reads.
    lane = sorted(
        set(selection_for(["telemetry/x.ndjson"], "harmonized"))
        | set(selection_for(["ehr/bulk/Patient.ndjson"], "harmonized"))
    )
    t0 = time.perf_counter()
    first = run_pipeline(landing, home, selection=lane, ephemeral=True)
    plain_run_s = time.perf_counter() - t0
    assert first.success, first.failures
    out = watch_round(landing, home)
    queryable, latency = out["drop_to_queryable_s"], out["drop_to_round_end_s"]
    out["baseline_one_dagster_run_of_lane_s"] = round(plain_run_s, 2)
    out["ratio_vs_one_run"] = round(queryable / plain_run_s, 2)
    print(
        f"   watch: file drop -> queryable (harmonized.telemetry_reading committed) in "
        f"{queryable:.2f} s, round over after {latency:.2f} s ({out['round_assets']} assets) "
        f"vs one Dagster run of the same lane {plain_run_s:.2f} s -> ratio "
        f"{out['ratio_vs_one_run']}x (goal <= 5 s)",
        flush=True,
    )
    print(f"   watch round steps (s): {out['round_steps_s']}", flush=True)
    return out


def run(args: Namespace) -> dict[str, Any]:
    work = Path(args.workdir) / "pacs_telemetry"
    work.mkdir(parents=True, exist_ok=True)
    quick = bool(getattr(args, "quick", False))
    return {
        # Fixed costs dominate at 200,000 readings; 2,000,000 shows the per-reading rate.
        "telemetry": [
            bench_telemetry(work, size) for size in ((200_000,) if quick else (200_000, 2_000_000))
        ],
        "dicom": bench_dicom(work, 500 if quick else 5_000),
        "watch": bench_watch(work),
    }
