"""Asset checks on the twin: graph integrity (blocking) and the baseline-vs-history figure."""

from __future__ import annotations

import dagster as dg

from twin_pipeline.defs import twin as twin_defs
from twin_pipeline.defs.twin import baseline_result, graph_integrity_result
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
    with Store.open(twin_home) as s:
        ok = graph_integrity_result(s)
    assert ok.passed and _meta(ok, "edges") == report.edge_count
    with Store.open(twin_home) as s:
        s.con.execute(
            "INSERT INTO twin.twin.edge SELECT 'Patient/p000001', 'subject', 'Patient/nobody', "
            "'Patient', 'Patient', NULL, NULL, 'x', NULL"
        )
        s.con.execute("INSERT INTO twin.twin.node SELECT * FROM twin.twin.node LIMIT 1")
    with Store.open(twin_home) as s:
        bad = graph_integrity_result(s)
    assert not bad.passed
    assert _meta(bad, "edges_to_missing_nodes") == 1 and _meta(bad, "duplicate_node_ids") == 1


def test_baseline_check(twin_home: Settings, graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    r = run_simulation(store, Scenario.model_validate({"name": "t", "replications": 3}))
    with store.transaction():
        save_result(store, r, snapshot="s1", chart=None)
    store.close()
    with Store.open(twin_home) as s:
        ok = baseline_result(s)
    assert ok.passed and _meta(ok, "baseline_error_pct") == r["baseline_error_pct"]
    with Store.open(twin_home) as s, s.transaction():
        save_result(s, {**r, "baseline_error_pct": 25.0, "seed": 99}, snapshot="s2", chart=None)
    with Store.open(twin_home) as s:
        bad = baseline_result(s)
    assert not bad.passed and bad.severity == dg.AssetCheckSeverity.WARN


def test_checks_run_in_their_assets_steps() -> None:
    """Both checks are specs of the asset they guard (no step of their own); graph_integrity
    still blocks what is downstream of twin/edge."""
    edge = dg.AssetKey(["twin", "edge"])
    sim = dg.AssetKey(["twin", "simulation_result"])
    assert not twin_defs.defs.asset_checks
    assert [(s.key, s.blocking) for s in twin_defs.twin_edge.check_specs] == [
        (dg.AssetCheckKey(edge, "graph_integrity"), True)
    ]
    assert [(s.key, s.blocking) for s in twin_defs.simulation_result.check_specs] == [
        (dg.AssetCheckKey(sim, "baseline_reproduces_history"), False)
    ]


def test_broken_graph_fails_the_edge_step_and_blocks_downstream(
    twin_home: Settings, graph_store: tuple[Store, GraphReport]
) -> None:
    from twin_pipeline.defs.resources import TwinResource

    store, _ = graph_store
    store.con.execute(
        "INSERT INTO twin.twin.edge SELECT 'Patient/p000001', 'subject', 'Patient/nobody', "
        "'Patient', 'Patient', NULL, NULL, 'x', NULL"
    )
    store.close()
    ran: list[str] = []

    @dg.asset(key=["twin", "after_edge"], deps=[dg.AssetKey(["twin", "edge"])])
    def after_edge() -> None:
        ran.append("after_edge")

    result = dg.materialize(
        [twin_defs.twin_edge, after_edge],
        resources={"twin": TwinResource(twin_home=str(twin_home.home))},
        instance=dg.DagsterInstance.ephemeral(),
        tags={"twin/user": "engineer"},
        raise_on_error=False,
    )
    assert not result.success
    evals = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert len(evals) == 1 and isinstance(evals[0], dg.AssetCheckEvaluation)
    assert evals[0].check_name == "graph_integrity" and not evals[0].passed
    assert [e.step_key for e in result.all_events if e.is_step_failure] == ["twin__edge"]
    assert ran == []
