"""Twin graph build time for N patients (default 10,000) and simulated events per second.

Graph: a synthetic hospital of ``--patients`` patients is written to ``harmonized.*`` in a fresh
store; building ``twin.node``/``twin.edge`` is timed against a baseline measured in the same run:
copying every source table the model reads (``CREATE TABLE AS SELECT *``), i.e. reading the same
rows once. State tables and two graph queries are timed too.
Simulation: the ``add_ct_scanner`` scenario, fitted on that history, is replicated; events/s is
compared with a bare SimPy loop (one process doing timeouts) run in the same process, and the
baseline's error against the historical throughput is printed.
"""

from __future__ import annotations

import argparse
import shutil
import time
from datetime import timedelta
from typing import Any

import simpy

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.twin import synthetic
from twin_pipeline.twin.graph import build_graph
from twin_pipeline.twin.model import load_model
from twin_pipeline.twin.query import k_hop, match
from twin_pipeline.twin.scenario import load_scenario
from twin_pipeline.twin.simulate import run_simulation
from twin_pipeline.twin.state import build_device_state, build_patient_vitals, build_scanner_state

PATTERN = (
    "Device -attached_to-> Patient <-subject- Encounter -located_at-> * "
    "-part_of*0..2-> CareUnit{name~Intensive}"
)


def _bare_simpy_events_per_s(n: int = 200_000) -> float:
    env = simpy.Environment()

    def proc() -> Any:
        for _ in range(n):
            yield env.timeout(1)

    env.process(proc())
    t = time.perf_counter()
    env.run()
    return n / (time.perf_counter() - t)


def run(args: argparse.Namespace) -> dict[str, Any]:
    patients = args.patients or (1_000 if getattr(args, "quick", False) else 10_000)
    home = args.workdir / "twin_bench"
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init(if_missing=True)
    model = load_model()
    out: dict[str, Any] = {"patients": patients}
    with Store.open(settings) as store:
        t = time.perf_counter()
        with store.transaction():
            h = synthetic.create_hospital(store, patients, seed=1, imaging_scale=patients / 500)
        out["generate_s"] = round(time.perf_counter() - t, 3)
        out["studies"] = h.studies
        out["encounters"] = h.encounters

        t = time.perf_counter()
        with store.transaction():
            for tab in model.source_tables():
                if store.table_exists(tab):
                    name = tab.replace(".", "_")
                    store.con.execute(
                        f"CREATE OR REPLACE TEMP TABLE copy_{name} AS SELECT * FROM {tab}"
                    )
        copy_s = time.perf_counter() - t

        t = time.perf_counter()
        with store.transaction():
            report = build_graph(store, model)
        build_s = time.perf_counter() - t
        out.update(
            nodes=report.node_count,
            edges=report.edge_count,
            graph_build_s=round(build_s, 3),
            copy_baseline_s=round(copy_s, 3),
            graph_build_vs_copy=round(build_s / copy_s, 2),
        )
        t = time.perf_counter()
        with store.transaction():
            for b in (build_patient_vitals, build_device_state, build_scanner_state):
                b(store, model)
        out["state_build_s"] = round(time.perf_counter() - t, 3)

        now = store.con.execute("SELECT max(ts_utc) FROM harmonized.telemetry_reading").fetchone()[
            0
        ]
        t = time.perf_counter()
        res = match(store, PATTERN, since=now - timedelta(hours=24), until=now)
        out["query_icu_devices_24h_ms"] = round((time.perf_counter() - t) * 1000, 1)
        out["query_icu_devices_24h_rows"] = len(res.rows)
        t = time.perf_counter()
        k_hop(store, "CareUnit/loc-icu", 3)
        out["query_khop3_ms"] = round((time.perf_counter() - t) * 1000, 1)

        sc, path, sha = load_scenario("add_ct_scanner")
        reps = 3 if getattr(args, "quick", False) else 10
        t = time.perf_counter()
        r = run_simulation(
            store, sc, scenario_path=str(path), scenario_sha256=sha, replications=reps
        )
        sim_s = time.perf_counter() - t
    bare = _bare_simpy_events_per_s()
    out.update(
        sim_replications=reps,
        sim_wall_s=round(sim_s, 3),
        sim_events=r["events"],
        sim_events_per_s=round(r["events"] / r["wall_s"]),
        bare_simpy_events_per_s=round(bare),
        sim_vs_bare_simpy=round(r["events"] / r["wall_s"] / bare, 3),
        historical_throughput=r["historical_throughput"],
        baseline_throughput=r["baseline_throughput"],
        baseline_error_pct=r["baseline_error_pct"],
    )
    print(
        f"   graph: {patients:,} patients -> {out['nodes']:,} nodes, {out['edges']:,} edges in "
        f"{build_s:.2f} s ({out['graph_build_vs_copy']}x a plain copy of the source tables, "
        f"{copy_s:.2f} s); state {out['state_build_s']} s"
    )
    print(
        f"   queries: ICU devices in last 24 h {out['query_icu_devices_24h_ms']} ms "
        f"({len(res.rows)} rows), 3-hop reach {out['query_khop3_ms']} ms"
    )
    print(
        f"   simulation: {r['events']:,} events in {r['wall_s']:.2f} s = "
        f"{out['sim_events_per_s']:,} events/s ({out['sim_vs_bare_simpy']}x a bare SimPy "
        f"timeout loop, {out['bare_simpy_events_per_s']:,} events/s)"
    )
    print(
        f"   baseline {r['baseline_throughput']} vs historical {r['historical_throughput']} "
        f"studies/day: error {r['baseline_error_pct']}%"
    )
    return out


if __name__ == "__main__":
    import sys

    from benchmarks.__main__ import main

    sys.exit(main(["--only", "twin", *sys.argv[1:]]))
