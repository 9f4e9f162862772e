"""Asset checks on the twin: graph integrity (blocking) and the baseline-vs-history figure."""

from __future__ import annotations

import dagster as dg

from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.defs.twin import baseline_reproduces_history, graph_integrity
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.twin.graph import GraphReport
from twin_pipeline.twin.scenario import Scenario
from twin_pipeline.twin.simulate import run_simulation, save_result


def _meta(result: dg.AssetCheckResult, key: str) -> object:
    return getattr(result.metadata[key], "value", getattr(result.metadata[key], "text", None))


def test_graph_integrity(twin_home: Settings, graph_store: tuple[Store, GraphReport]) -> None:
    store, report = graph_store
    store.close()
    twin = TwinResource(twin_home=str(twin_home.home))
    ok = graph_integrity(twin=twin)
    assert ok.passed and _meta(ok, "edges") == report.edge_count
    with Store.open(twin_home) as s:
        s.con.execute(
            "INSERT INTO twin.twin.edge SELECT 'Patient/p000001', 'subject', 'Patient/nobody', "
            "'Patient', 'Patient', NULL, NULL, 'x', NULL"
        )
        s.con.execute("INSERT INTO twin.twin.node SELECT * FROM twin.twin.node LIMIT 1")
    bad = graph_integrity(twin=twin)
    assert not bad.passed
    assert _meta(bad, "edges_to_missing_nodes") == 1 and _meta(bad, "duplicate_node_ids") == 1


def test_baseline_check(twin_home: Settings, graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    twin = TwinResource(twin_home=str(twin_home.home))
    r = run_simulation(store, Scenario.model_validate({"name": "t", "replications": 3}))
    with store.transaction():
        save_result(store, r, snapshot="s1", chart=None)
    store.close()
    ok = baseline_reproduces_history(twin=twin)
    assert ok.passed and _meta(ok, "baseline_error_pct") == r["baseline_error_pct"]
    with Store.open(twin_home) as s, s.transaction():
        save_result(s, {**r, "baseline_error_pct": 25.0, "seed": 99}, snapshot="s2", chart=None)
    bad = baseline_reproduces_history(twin=twin)
    assert not bad.passed and bad.severity == dg.AssetCheckSeverity.WARN
