"""De-identification: our text engine vs stock Presidio (and philter-lite) on the same notes;
structured de-identification in SQL vs a plain copy and a Python HMAC map.

    python -m benchmarks --only deid [--patients 200]

Everything is measured in this run on this machine; figures are printed with their ratio to
the baseline. Recall is the span-level, any-label recall (what leaks) from
:mod:`twin_pipeline.deid.evaluate`.
"""

from __future__ import annotations

import argparse
import hmac
import os
import time
from pathlib import Path
from typing import Any

from twin_pipeline.deid.context import deny_index_from_fhir
from twin_pipeline.deid.evaluate import i2b2_notes, load_labels, philter_corpus_dir, score
from twin_pipeline.deid.text import NoteContext, TextPool, deidentify_stream, engine

KEY = bytes(range(32))


def _hospital(workdir: Path, patients: int) -> Path:
    root = workdir / f"deid-hospital-{patients}"
    if not (root / "labels" / "phi.jsonl").is_file():
        from twin_pipeline.generate.core import generate_hospital

        generate_hospital(root, patients=patients, seed=11)
    return root


def _rate(n: int, t: float) -> float:
    return n / max(t, 1e-9)


def bench_text(root: Path, philter_notes: int) -> dict[str, Any]:
    notes = load_labels(root / "labels" / "phi.jsonl")
    texts = [n.text for n in notes]
    gold = [n.spans for n in notes]
    idx = deny_index_from_fhir(root / "ehr")
    ctxs = [NoteContext(n.patient_id, idx.for_patient(n.patient_id)) for n in notes]
    kb = sum(len(t) for t in texts) / len(texts) / 1000
    out: dict[str, Any] = {"notes": len(notes), "mean_note_kb": round(kb, 2)}

    eng = engine()
    eng.set_staff(sorted(idx.staff))
    eng.analyze_batch(texts[:16], ctxs[:16])  # warm-up (model loaded, caches primed)
    t0, c0 = time.perf_counter(), time.process_time()
    pred = eng.analyze_batch(texts, ctxs)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    rep = score(texts, gold, pred)
    out["ours_analyze_notes_s"] = round(_rate(len(texts), t_ours), 1)
    out["ours_analyze_notes_per_cpu_s"] = round(_rate(len(texts), c_ours), 1)
    out["ours_recall"] = rep.any_label.recall
    out["ours_precision"] = rep.any_label.precision
    out["ours_min_type_recall"] = min(s.recall for s in rep.by_type.values() if s.gold)

    t0, c0 = time.perf_counter(), time.process_time()
    list(deidentify_stream(zip(texts, ctxs, strict=True), KEY, staff=sorted(idx.staff)))
    out["ours_deid_notes_s_1proc"] = round(_rate(len(texts), time.perf_counter() - t0), 1)
    out["ours_deid_notes_per_cpu_s"] = round(_rate(len(texts), time.process_time() - c0), 1)
    workers = min(2, os.cpu_count() or 1)
    items = list(zip(texts, ctxs, strict=True))
    t0 = time.perf_counter()
    with TextPool(KEY, workers=workers, staff=sorted(idx.staff)) as pool:
        list(pool.map(items[: 2 * 32], batch_size=32))  # each worker loads spaCy once
        out["pool_startup_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        list(pool.map(items, batch_size=32))
        out[f"ours_deid_notes_s_{workers}proc"] = round(
            _rate(len(texts), time.perf_counter() - t0), 1
        )
    out["workers"] = workers

    from twin_pipeline.deid.peers import philter_available, philter_spans, stock_presidio_spans

    stock_presidio_spans(texts[:8])  # load + warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    sp = stock_presidio_spans(texts)
    t_stock, c_stock = time.perf_counter() - t0, time.process_time() - c0
    srep = score(texts, gold, sp)
    out["stock_presidio_notes_s"] = round(_rate(len(texts), t_stock), 1)
    out["stock_presidio_notes_per_cpu_s"] = round(_rate(len(texts), c_stock), 1)
    out["cpu_ratio_ours_vs_stock"] = round(c_stock / c_ours, 2)
    out["stock_presidio_recall"] = srep.any_label.recall
    out["stock_presidio_precision"] = srep.any_label.precision
    out["speed_ratio_ours_vs_stock"] = round(t_stock / t_ours, 2)

    if philter_available() and philter_notes:
        sub = texts[:philter_notes]
        philter_spans(sub[:2])
        t0 = time.perf_counter()
        pp = philter_spans(sub)
        prep = score(sub, gold[:philter_notes], pp)
        out["philter_notes_s"] = round(_rate(len(sub), time.perf_counter() - t0), 2)
        out["philter_recall"] = prep.any_label.recall
        out["philter_precision"] = prep.any_label.precision
        out["philter_notes_scored"] = len(sub)
    return out


def bench_external() -> dict[str, Any]:
    folder = philter_corpus_dir()
    if folder is None:
        return {"external_corpus": "philter-lite not installed"}
    notes = i2b2_notes(folder)
    texts = [n.text for n in notes]
    gold = [n.spans for n in notes]
    from twin_pipeline.deid.peers import philter_available, philter_spans, stock_presidio_spans

    out: dict[str, Any] = {"external_corpus": f"philter-lite i2b2 sample ({len(notes)} notes)"}
    eng = engine()
    eng.set_staff([])
    ours = score(texts, gold, eng.analyze_batch(texts))
    stock = score(texts, gold, stock_presidio_spans(texts))
    out["external_ours"] = ours.as_dict()
    out["external_stock_presidio_any"] = stock.any_label.as_dict()
    if philter_available():
        out["external_philter_any"] = score(texts, gold, philter_spans(texts)).any_label.as_dict()
    return out


def bench_structured(workdir: Path, rows: int) -> dict[str, Any]:
    """deid.observation from a synthetic harmonized.observation of ``rows`` rows."""
    from twin_pipeline.deid.policy import load_policy
    from twin_pipeline.deid.structured import deidentify_table
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.paths import Settings
    from twin_pipeline.store import Store

    home = workdir / "deid-structured-home"
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init(if_missing=True)
    policy = load_policy()
    cols = policy.tables["observation"].columns
    types = {
        "value": "DOUBLE",
        "original_value": "DOUBLE",
        "component_index": "BIGINT",
        "deleted": "BOOLEAN",
        "effective_at": "TIMESTAMPTZ",
        "last_updated": "TIMESTAMPTZ",
    }
    exprs = []
    for c in cols:
        t = types.get(c, "VARCHAR")
        # Shape of real observations: 10,000 patients, ~20 observations per encounter,
        # one in ten from a device (500 devices); observation ids unique.
        if c == "patient_id":
            exprs.append(f"'patient-' || CAST(i % 10000 AS VARCHAR) AS {c}")
        elif c == "encounter_id":
            exprs.append(f"'encounter-' || CAST(i // 20 AS VARCHAR) AS {c}")
        elif c == "device_id":
            exprs.append(
                f"CASE WHEN i % 10 = 0 THEN 'device-' || CAST(i % 500 AS VARCHAR) END AS {c}"
            )
        elif t == "TIMESTAMPTZ":
            exprs.append(f"TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i) AS {c}")
        elif t == "DOUBLE":
            exprs.append(f"CAST(i % 200 AS DOUBLE) AS {c}")
        elif t == "BIGINT":
            exprs.append(f"CAST(i % 3 AS BIGINT) AS {c}")
        elif t == "BOOLEAN":
            exprs.append(f"FALSE AS {c}")
        else:
            exprs.append(f"'{c}-' || CAST(i AS VARCHAR) AS {c}")
    out: dict[str, Any] = {"structured_rows": rows}
    with Store.open(settings) as store, store.transaction():
        store.con.execute("SET enable_progress_bar = false")
        store.con.execute("DROP TABLE IF EXISTS harmonized.observation")
        store.con.execute(
            f"CREATE TABLE harmonized.observation AS SELECT {', '.join(exprs)} FROM range({rows}) t(i)"
        )
        t0, c0 = time.perf_counter(), time.process_time()
        store.con.execute(
            "CREATE OR REPLACE TABLE deid.copy_baseline AS SELECT * FROM harmonized.observation"
        )
        t_copy, c_copy = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        res = deidentify_table(store, policy, "observation")
        t_sql, c_sql = time.perf_counter() - t0, time.process_time() - c0
        # Baseline 2: HMAC of the 5 pseudonymized columns' distinct values in Python (no join).
        t0 = time.perf_counter()
        for c in ("observation_id", "patient_id", "encounter_id", "device_id"):
            vals = store.con.execute(
                f"SELECT DISTINCT CAST({c} AS VARCHAR) FROM harmonized.observation"
            ).fetchall()
            for (v,) in vals:
                hmac.digest(KEY, f"{c}\x1f{v}".encode(), "sha256")
        t_py = time.perf_counter() - t0
        store.con.execute("DROP TABLE deid.copy_baseline")
    out["structured_sql_rows_s"] = round(rows / t_sql)
    out["structured_sql_rows_per_cpu_s"] = round(rows / c_sql)
    out["structured_plain_copy_rows_s"] = round(rows / t_copy)
    out["structured_plain_copy_rows_per_cpu_s"] = round(rows / c_copy)
    out["structured_python_hmac_map_rows_s"] = round(rows / t_py)
    out["structured_columns"] = len(res.columns)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = int(
        getattr(args, "patients", None) or (100 if getattr(args, "quick", False) else 200)
    )
    workdir = Path(args.workdir)
    root = _hospital(workdir, patients)
    res: dict[str, Any] = {}
    res.update(bench_text(root, philter_notes=40 if getattr(args, "quick", False) else 100))
    print(
        f"   notes: {res['notes']} (~{res['mean_note_kb']} kB each)\n"
        f"   ours   analyze {res['ours_analyze_notes_s']:>7} notes/s  recall {res['ours_recall']:.4f}"
        f"  precision {res['ours_precision']:.4f}  (min type recall {res['ours_min_type_recall']:.4f})\n"
        f"   ours   de-identify {res['ours_deid_notes_s_1proc']} notes/s (1 process), "
        f"{res['ours_deid_notes_s_' + str(res['workers']) + 'proc']} notes/s ({res['workers']} worker "
        f"processes, after a {res['pool_startup_s']} s start)"
        f"\n   stock Presidio   {res['stock_presidio_notes_s']:>7} notes/s  recall "
        f"{res['stock_presidio_recall']:.4f}  precision {res['stock_presidio_precision']:.4f}\n"
        f"   ratio: ours is {res['speed_ratio_ours_vs_stock']}x stock Presidio's speed (wall); "
        f"{res['cpu_ratio_ours_vs_stock']}x per CPU second ({res['ours_analyze_notes_per_cpu_s']} vs "
        f"{res['stock_presidio_notes_per_cpu_s']} notes/CPU-s; de-identify incl. replacement "
        f"{res['ours_deid_notes_per_cpu_s']} notes/CPU-s)",
        flush=True,
    )
    if "philter_recall" in res:
        print(
            f"   philter-lite     {res['philter_notes_s']:>7} notes/s  recall "
            f"{res['philter_recall']:.4f}  precision {res['philter_precision']:.4f} "
            f"({res['philter_notes_scored']} notes)",
            flush=True,
        )
    ext = bench_external()
    res.update(ext)
    if "external_ours" in ext:
        o = ext["external_ours"]
        print(
            f"   {ext['external_corpus']}: ours recall(any) {o['any_label']['recall']:.4f} "
            f"precision(any) {o['any_label']['precision']:.4f}; stock Presidio recall(any) "
            f"{ext['external_stock_presidio_any']['recall']:.4f}"
            + (
                f"; philter-lite recall(any) {ext['external_philter_any']['recall']:.4f}"
                if "external_philter_any" in ext
                else ""
            ),
            flush=True,
        )
    rows = 200_000 if getattr(args, "quick", False) else 1_000_000
    st = bench_structured(workdir, rows)
    res.update(st)
    print(
        f"   structured deid (SQL, {rows:,} rows, {st['structured_columns']} columns): "
        f"{st['structured_sql_rows_s']:,} rows/s ({st['structured_sql_rows_per_cpu_s']:,} rows/CPU-s); plain copy {st['structured_plain_copy_rows_s']:,} "
        f"rows/s ({st['structured_plain_copy_rows_per_cpu_s']:,} rows/CPU-s; wall ratio "
        f"{st['structured_sql_rows_s'] / st['structured_plain_copy_rows_s']:.2f}); "
        f"Python HMAC map alone {st['structured_python_hmac_map_rows_s']:,} rows/s",
        flush=True,
    )
    return res
