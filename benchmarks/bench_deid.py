"""De-identification: our text engine vs stock Presidio (and philter-lite) on the same notes;
structured de-identification in SQL vs a plain copy and a Python HMAC map.

    python -m benchmarks --only deid [--patients 200]

Everything is measured in this run on this machine; figures are printed with their ratio to
the baseline. Recall is the span-level, any-label recall (what leaks) from
:mod:`twin_pipeline.deid.evaluate`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from twin_pipeline.deid.context import deny_index_from_fhir
from twin_pipeline.deid.evaluate import i2b2_notes, load_labels, philter_corpus_dir, score
from twin_pipeline.deid.pool import TextPool
from twin_pipeline.deid.text import BATCH_SIZE, NoteContext, deidentify_stream, engine

KEY = bytes(range(32))


def _hospital(workdir: Path, patients: int) -> Path:
    root = workdir / f"deid-hospital-{patients}"
    if not (root / "labels" / "phi.jsonl").is_file():
        from twin_pipeline.generate.core import generate_hospital

        generate_hospital(root, patients=patients, seed=11)
    return root


def _rate(n: int, t: float) -> float:
    return n / max(t, 1e-9)


def bench_text(root: Path, philter_notes: int, stock_notes: int | None = None) -> dict[str, Any]:
    """Ours on every note; stock Presidio (~7 notes/s) on the first ``stock_notes`` (all when
    None). Speed ratios compare per-note rates measured in this run."""
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
    single = list(deidentify_stream(zip(texts, ctxs, strict=True), KEY, staff=sorted(idx.staff)))
    out["ours_deid_notes_s_1proc"] = round(_rate(len(texts), time.perf_counter() - t0), 1)
    out["ours_deid_notes_per_cpu_s"] = round(_rate(len(texts), time.process_time() - c0), 1)
    workers = min(2, os.cpu_count() or 1)
    items = list(zip(texts, ctxs, strict=True))
    t0 = time.perf_counter()
    with TextPool(KEY, workers=workers, staff=sorted(idx.staff)) as pool:
        list(pool.map(items[: 2 * BATCH_SIZE], batch_size=BATCH_SIZE))  # warm each worker
        out["pool_startup_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        pooled = list(pool.map(items, batch_size=BATCH_SIZE))
        out[f"ours_deid_notes_s_{workers}proc"] = round(
            _rate(len(texts), time.perf_counter() - t0), 1
        )
    out["workers"] = workers
    # the pipeline's guarantee: the same bytes whichever way the notes went
    out["pool_output_identical"] = pooled == single

    from twin_pipeline.deid.peers import philter_available, philter_spans, stock_presidio_spans

    stock_presidio_spans(texts[:8])  # load + warm-up
    n_stock = len(texts) if stock_notes is None else min(stock_notes, len(texts))
    t0, c0 = time.perf_counter(), time.process_time()
    sp = stock_presidio_spans(texts[:n_stock])
    t_stock, c_stock = time.perf_counter() - t0, time.process_time() - c0
    srep = score(texts[:n_stock], gold[:n_stock], sp)
    out["stock_presidio_notes"] = n_stock
    out["stock_presidio_notes_s"] = round(_rate(n_stock, t_stock), 1)
    out["stock_presidio_notes_per_cpu_s"] = round(_rate(n_stock, c_stock), 1)
    # per-note rates: the two may have run on different numbers of notes
    out["cpu_ratio_ours_vs_stock"] = round((c_stock / n_stock) / (c_ours / len(texts)), 2)
    out["stock_presidio_recall"] = srep.any_label.recall
    out["stock_presidio_precision"] = srep.any_label.precision
    out["speed_ratio_ours_vs_stock"] = round((t_stock / n_stock) / (t_ours / len(texts)), 2)

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


# Column shapes of a real harmonized.observation (categorical codes, a few units, one id per
# row): DuckDB compresses the repetitive columns cheaply. DISTINCT_SHAPE makes every string
# column distinct per row ('code-17', 'unit-17', ...), the worst case for string compression.
REAL_SHAPE = {
    "observation_id": "'obs-' || CAST(i AS VARCHAR)",
    "code_system": "CASE WHEN i % 7 = 0 THEN 'urn:iso:std:iso:11073:10101' "
    "ELSE 'http://loinc.org' END",
    "code": "CAST(8000 + i % 40 AS VARCHAR) || '-' || CAST(i % 40 % 9 AS VARCHAR)",
    "display": "'Observation display ' || CAST(i % 40 AS VARCHAR)",
    "component_code": "CASE WHEN i % 5 = 0 THEN '8480-6' END",
    "component_display": "CASE WHEN i % 5 = 0 THEN 'Systolic blood pressure' END",
    "unit": "['mm[Hg]', '/min', '%', 'kg', 'Cel', 'mg/dL'][1 + i % 6]",
    "original_unit": "['mm[Hg]', '/min', '%', 'kg', 'Cel', 'mg/dL'][1 + i % 6]",
    "category": "['vital-signs', 'laboratory', 'survey'][1 + i % 3]",
    "status": "CASE WHEN i % 50 = 0 THEN 'amended' ELSE 'final' END",
    "version_id": "'1'",
    "source_file": "'ehr/bulk/Observation-' || CAST(i // 50000 AS VARCHAR) || '.ndjson'",
    "source_position": "'line:' || CAST(i % 50000 + 1 AS VARCHAR)",
    "lineage_key": "md5(CAST(i AS VARCHAR))",
}


def _observation_exprs(shape: str) -> list[str]:
    from twin_pipeline.deid.policy import load_policy

    types = {
        "value": "DOUBLE",
        "original_value": "DOUBLE",
        "component_index": "BIGINT",
        "deleted": "BOOLEAN",
        "effective_at": "TIMESTAMPTZ",
        "last_updated": "TIMESTAMPTZ",
    }
    exprs = []
    for c in load_policy().tables["observation"].columns:
        t = types.get(c, "VARCHAR")
        # 10,000 patients, ~20 observations per encounter, one in ten from a device (500
        # devices); observation ids unique.
        if c == "patient_id":
            exprs.append(f"'patient-' || CAST(i % 10000 AS VARCHAR) AS {c}")
        elif c == "encounter_id":
            exprs.append(f"'encounter-' || CAST(i // 20 AS VARCHAR) AS {c}")
        elif c == "device_id":
            exprs.append(
                f"CASE WHEN i % 10 = 0 THEN 'device-' || CAST(i % 500 AS VARCHAR) END AS {c}"
            )
        elif shape == "real" and c in REAL_SHAPE:
            exprs.append(f"{REAL_SHAPE[c]} AS {c}")
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
    return exprs


PSEUDONYMIZED = {
    "observation_id": "observation",
    "patient_id": "patient",
    "encounter_id": "encounter",
    "device_id": "device",
}


def bench_structured(workdir: Path, rows: int, shape: str = "real") -> dict[str, Any]:
    """deid.observation from a synthetic harmonized.observation of ``rows`` rows, each step
    committed (as an asset run is), against a plain copy of the same table in the same store.
    CPU seconds count every thread of this process (DuckDB's too)."""
    from twin_pipeline.deid import keyed
    from twin_pipeline.deid.policy import load_policy
    from twin_pipeline.deid.structured import deidentify_table
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.paths import Settings
    from twin_pipeline.store import Store

    home = workdir / "deid-structured-home"
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init(if_missing=True)
    policy = load_policy()
    out: dict[str, Any] = {"rows": rows, "shape": shape}
    with Store.open(settings) as store:
        con = store.con
        con.execute("SET enable_progress_bar = false")
        with store.transaction():
            con.execute(
                "CREATE OR REPLACE TABLE harmonized.observation AS SELECT "
                f"{', '.join(_observation_exprs(shape))} FROM range({rows}) t(i)"
            )
        t0, c0 = time.perf_counter(), time.process_time()
        with store.transaction():
            con.execute(
                "CREATE OR REPLACE TABLE deid.copy_baseline AS SELECT * FROM harmonized.observation"
            )
        t_copy, c_copy = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        with store.transaction():
            res = deidentify_table(store, policy, "observation")
        t_sql, c_sql = time.perf_counter() - t0, time.process_time() - c0
        # The pseudonym step two ways over the same distinct values: HMAC in DuckDB SQL (the
        # previous path) and in Python with hashlib midstates (the current one).
        key = bytes(range(32))
        params = keyed.SqlKey.from_key(key).params()
        t0, c0 = time.perf_counter(), time.process_time()
        for c, domain in PSEUDONYMIZED.items():
            con.execute(
                f"SELECT count({keyed.sql_pseudonym('v', domain)}) FROM "
                f"(SELECT DISTINCT {c} AS v FROM harmonized.observation WHERE {c} IS NOT NULL)",
                params,
            ).fetchone()
        t_map_sql, c_map_sql = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        h = keyed.Hmac(key)
        for c, domain in PSEUDONYMIZED.items():
            vals = con.execute(
                f"SELECT DISTINCT CAST({c} AS VARCHAR) FROM harmonized.observation "
                f"WHERE {c} IS NOT NULL"
            ).fetch_arrow_table()
            h.pseudonyms(domain, vals.column(0).to_pylist())
        t_map_py, c_map_py = time.perf_counter() - t0, time.process_time() - c0
        with store.transaction():
            con.execute("DROP TABLE deid.copy_baseline")
    out["deid_rows_s"] = round(rows / t_sql)
    out["deid_rows_per_cpu_s"] = round(rows / c_sql)
    out["copy_rows_s"] = round(rows / t_copy)
    out["copy_rows_per_cpu_s"] = round(rows / c_copy)
    out["cpu_ratio_deid_vs_copy"] = round(c_sql / c_copy, 2)
    out["pseudonym_map_sql_cpu_s"] = round(c_map_sql, 3)
    out["pseudonym_map_python_cpu_s"] = round(c_map_py, 3)
    out["pseudonym_map_sql_wall_s"] = round(t_map_sql, 3)
    out["pseudonym_map_python_wall_s"] = round(t_map_py, 3)
    out["columns"] = len(res.columns)
    return out


def _print_structured(st: dict[str, Any]) -> None:
    print(
        f"   structured deid ({st['shape']} shape, {st['rows']:,} rows, {st['columns']} columns): "
        f"{st['deid_rows_s']:,} rows/s ({st['deid_rows_per_cpu_s']:,} rows/CPU-s); plain copy "
        f"{st['copy_rows_s']:,} rows/s ({st['copy_rows_per_cpu_s']:,} rows/CPU-s); CPU ratio "
        f"deid/copy {st['cpu_ratio_deid_vs_copy']:.2f}\n"
        f"      pseudonym maps (4 columns' distinct values): Python hashlib "
        f"{st['pseudonym_map_python_cpu_s']} CPU-s vs DuckDB SQL HMAC "
        f"{st['pseudonym_map_sql_cpu_s']} CPU-s (ratio "
        f"{st['pseudonym_map_sql_cpu_s'] / max(st['pseudonym_map_python_cpu_s'], 1e-9):.2f})",
        flush=True,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = int(
        getattr(args, "patients", None) or (60 if getattr(args, "quick", False) else 200)
    )
    quick = bool(getattr(args, "quick", False))
    workdir = Path(args.workdir)
    root = _hospital(workdir, patients)
    res: dict[str, Any] = {}
    # --quick (make bench-quick, goal: every bench in 5 min): stock Presidio on 80 notes
    res.update(
        bench_text(root, philter_notes=40 if quick else 100, stock_notes=80 if quick else None)
    )
    print(
        f"   notes: {res['notes']} (~{res['mean_note_kb']} kB each)\n"
        f"   ours   analyze {res['ours_analyze_notes_s']:>7} notes/s  recall {res['ours_recall']:.4f}"
        f"  precision {res['ours_precision']:.4f}  (min type recall {res['ours_min_type_recall']:.4f})\n"
        f"   ours   de-identify {res['ours_deid_notes_s_1proc']} notes/s (1 process), "
        f"{res['ours_deid_notes_s_' + str(res['workers']) + 'proc']} notes/s ({res['workers']} worker "
        f"processes, after a {res['pool_startup_s']} s start; output identical: "
        f"{res['pool_output_identical']})"
        f"\n   stock Presidio   {res['stock_presidio_notes_s']:>7} notes/s  recall "
        f"{res['stock_presidio_recall']:.4f}  precision {res['stock_presidio_precision']:.4f}"
        f" (first {res['stock_presidio_notes']} notes)\n"
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
    quick = getattr(args, "quick", False)
    structured: dict[str, Any] = {}
    for rows, shape in [(200_000, "real"), (200_000, "distinct")] + (
        [] if quick else [(2_000_000, "real")]
    ):
        st = bench_structured(workdir, rows, shape)
        _print_structured(st)
        structured[f"{shape}_{rows}"] = st
    res["structured"] = structured
    return res
