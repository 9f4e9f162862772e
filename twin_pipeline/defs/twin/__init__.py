"""Twin assets: the graph (``twin/node``, ``twin/edge``), current state per twin, and what-if
simulation runs (``twin/simulation_result``), each a governed, lineage-recorded run."""

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from twin_pipeline.defs.common import GovernedRun, governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.procs import in_background
from twin_pipeline.sources import sha256_file
from twin_pipeline.store import Store
from twin_pipeline.twin.graph import build_graph, ensure_graph_tables
from twin_pipeline.twin.model import load_model
from twin_pipeline.twin.scenario import Scenario, load_scenario
from twin_pipeline.twin.simulate import NOTICE, make_chart, run_simulation, save_result, sim_id
from twin_pipeline.twin.state import (
    build_device_state,
    build_patient_vitals,
    build_scanner_state,
)

OWNERS = ["team:twin"]
DEFAULT_SCENARIO = "add_ct_scanner.yaml"


def _defined_elsewhere() -> set[dg.AssetKey]:
    """Asset keys other stage packages define (deps on keys nobody defines would become stubs)."""
    import importlib
    import pkgutil

    from twin_pipeline import defs as defs_pkg

    keys: set[dg.AssetKey] = set()
    for mod in pkgutil.iter_modules(defs_pkg.__path__):
        if not mod.ispkg or mod.name == "twin":
            continue
        stage = getattr(importlib.import_module(f"{defs_pkg.__name__}.{mod.name}"), "defs", None)
        if isinstance(stage, dg.Definitions):
            for a in stage.assets or []:
                if isinstance(a, dg.AssetsDefinition):
                    keys.update(a.keys)
    return keys


_MODEL = load_model()
_DEFINED = _defined_elsewhere()
SOURCE_KEYS = [
    k for k in (dg.AssetKey(t.split(".")) for t in _MODEL.source_tables()) if k in _DEFINED
]


def _source_keys(*tables: str) -> list[dg.AssetKey]:
    keys = [dg.AssetKey([_MODEL.source_schema, t]) for t in tables]
    return [k for k in keys if k in _DEFINED]


@dg.asset(
    key=dg.AssetKey(["twin", "node"]),
    deps=SOURCE_KEYS,
    group_name="twin",
    kinds={"duckdb", "sql"},
    owners=OWNERS,
    description="Twin graph nodes (and, with them, twin.edge): one node per twin of each "
    "interface in assets/twin_model.yaml, built in SQL from the tables the model names.",
)
def twin_node(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    model = load_model()
    with governed_run(
        context, twin, inputs=model.source_tables(), params={"model_id": model.model_id}
    ) as run:
        # The graph is a function of the source tables' versions, the model and the code: when
        # none changed, the graph built then is kept (and its report given again).
        saved = run.reuse("twin.node", "twin.edge")
        if saved is None:
            rep = build_graph(run.store, model)
            saved = {
                "nodes_by_type": rep.nodes,
                "edges_by_rel": rep.edges,
                "dangling": rep.dangling,
                "warnings": rep.warnings,
            }
            run.outputs("twin.node", "twin.edge")
            run.keep("twin.node", "twin.edge", saved=saved)
        run.meta(**{k: dg.MetadataValue.json(v) for k, v in saved.items()})
    return run.result()


GRAPH_CHECK = "graph_integrity"
BASELINE_CHECK = "baseline_reproduces_history"


@dg.asset(
    key=dg.AssetKey(["twin", "edge"]),
    deps=[dg.AssetKey(["twin", "node"])],
    group_name="twin",
    kinds={"duckdb", "sql"},
    owners=OWNERS,
    description="Twin graph edges (relationships with validity periods). Written together "
    "with twin/node; this asset reports them and the graph_integrity check guards them.",
    check_specs=[
        dg.AssetCheckSpec(
            GRAPH_CHECK,
            asset=dg.AssetKey(["twin", "edge"]),
            blocking=True,
            description="Every edge joins two existing twins and every node id is unique; "
            "state and simulation assets do not run on a broken graph.",
        )
    ],
)
def twin_edge(
    context: dg.AssetExecutionContext, twin: TwinResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    with governed_run(context, twin, inputs=["twin.node"]) as run:
        ensure_graph_tables(run.store)
        rows = run.store.con.execute(
            "SELECT rel, count(*) FROM twin.twin.edge GROUP BY rel ORDER BY rel"
        ).fetchall()
        run.outputs("twin.edge", changed=False)  # twin/node wrote it (and recorded it)
        run.meta(edges_by_rel=dg.MetadataValue.json({r[0]: int(r[1]) for r in rows}))
        # The check runs in this step on this transaction's graph (no step of its own); a
        # failure fails the step, so nothing downstream of twin/edge runs.
        check = graph_integrity_result(run.store)
    yield run.result()
    yield check


def _as_of() -> datetime | None:
    """``TWIN_AS_OF`` (ISO-8601) pins "now" for state; default: the latest time in the data."""
    raw = dg.EnvVar("TWIN_AS_OF").get_value("") or ""
    if not raw:
        return None
    parsed = datetime.fromisoformat(raw)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _state_asset(  # type: ignore[no-untyped-def]
    name: str, builder, description: str, reads: tuple[str, ...] = ()
) -> dg.AssetsDefinition:
    @dg.asset(
        key=dg.AssetKey(["twin", name]),
        deps=[dg.AssetKey(["twin", "node"]), dg.AssetKey(["twin", "edge"]), *_source_keys(*reads)],
        group_name="twin",
        kinds={"duckdb", "sql"},
        owners=OWNERS,
        description=description,
    )
    def _asset(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
        model = load_model()
        with governed_run(context, twin, inputs=["twin.node", "twin.edge"]) as run:
            ensure_graph_tables(run.store)
            rep = builder(run.store, model, _as_of())
            run.record.params["as_of"] = rep.as_of.isoformat() if rep.as_of else None
            run.record.inputs.extend(t for t in rep.inputs if t not in run.record.inputs)
            run.outputs(f"twin.{name}")
            run.meta(
                as_of=str(rep.as_of) if rep.as_of else "none",
                warnings=dg.MetadataValue.json(rep.warnings),
            )
        return run.result()

    return _asset


state_patient_vitals = _state_asset(
    "state_patient_vitals",
    build_patient_vitals,
    "Latest value of each vital sign per Patient twin, from observations and device readings.",
    ("observation", "telemetry_reading"),
)
state_device = _state_asset(
    "state_device",
    build_device_state,
    "Per Device twin: status, last reading, readings in 24 h, attached patient at as-of time.",
    ("telemetry_reading",),
)
state_scanner = _state_asset(
    "state_scanner",
    build_scanner_state,
    "Per scanner twin: studies and busy minutes on the as-of day, utilization, last study.",
)


class SimulationConfig(dg.Config):  # type: ignore[misc]
    """Which scenario to run (a path, or a name under assets/scenarios/)."""

    scenario: str = DEFAULT_SCENARIO
    replications: int = 0  # 0: the scenario's own
    seed: int = -1  # -1: the scenario's own
    chart: str = ""  # PNG path; default TWIN_HOME/reports/simulation-<id>.png


@dg.asset(
    key=dg.AssetKey(["twin", "simulation_result"]),
    deps=[dg.AssetKey(["twin", "node"]), dg.AssetKey(["twin", "edge"])],
    group_name="twin",
    kinds={"python", "simpy"},
    owners=OWNERS,
    description="A what-if simulation run (SimPy) of the imaging department and bed capacity: "
    "baseline fitted from the twin's history vs a scenario, with replications and 95% CIs. "
    + NOTICE,
    check_specs=[
        dg.AssetCheckSpec(
            BASELINE_CHECK,
            asset=dg.AssetKey(["twin", "simulation_result"]),
            description="The fitted baseline's throughput is within 10% of the historical "
            "throughput it was fitted on (latest simulation run); a twin without history "
            "passes with a note.",
        )
    ],
)
def simulation_result(
    context: dg.AssetExecutionContext, twin: TwinResource, config: SimulationConfig
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    sc, path, sha = load_scenario(config.scenario)
    params = {"scenario_file": str(path), "scenario_sha256": sha, "scenario": sc.name}
    with governed_run(context, twin, inputs=["twin.node", "twin.edge"], params=params) as run:
        ensure_graph_tables(run.store)
        run.source_files(
            [
                {
                    "path": str(path),
                    "sha256": sha256_file(path),
                    "size": path.stat().st_size,
                    "kind": "scenario",
                }
            ]
        )
        # Seeded: the same graph (versions), scenario, settings and code give the same run.
        outs = ("twin.simulation_run", "twin.simulation_metric")
        settings = {"replications": config.replications, "seed": config.seed, "chart": config.chart}
        saved = run.reuse(
            *outs,
            extra={"scenario_sha256": sha, **settings},
            accept=lambda s: not s.get("chart") or Path(s["chart"]).is_file(),
        )
        if saved is None:
            saved = _simulate(run, sc, path, sha, config, twin)
            run.keep(*outs, saved=saved)
        run.record.params.update(saved["params"])
        run.meta(**saved["meta"])
        check = baseline_result(run.store)
    yield run.result()
    yield check


def _simulate(
    run: GovernedRun,
    sc: Scenario,
    path: Path,
    sha: str,
    config: SimulationConfig,
    twin: TwinResource,
) -> dict[str, Any]:
    """Run the scenario on the twin and store the result; what the step reports (JSON)."""
    snapshot = "|".join(f"{v.table}:{v.content_hash}" for v in run.record.input_versions)
    result = run_simulation(
        run.store,
        sc,
        scenario_path=str(path),
        scenario_sha256=sha,
        replications=config.replications or None,
        seed=None if config.seed < 0 else config.seed,
    )
    sid = sim_id(result, snapshot)
    chart = None
    if result.get("status") == "ok":
        target = config.chart or str(twin.settings().reports_dir / f"simulation-{sid}.png")
        # Drawn while the run goes on (~2 s, most of it matplotlib); the pipeline runner
        # waits for it before it returns, and the process cannot exit before it is written.
        in_background(f"simulation chart {target}", make_chart, result, Path(target))
        chart = target
    save_result(run.store, result, snapshot=snapshot, chart=chart)
    run.outputs("twin.simulation_run", "twin.simulation_metric")
    return {
        "chart": chart,
        "params": {
            "seed": result["seed"],
            "replications": result["replications"],
            "twin_snapshot": snapshot,
            "sim_id": sid,
        },
        "meta": {
            "sim_id": sid,
            "scenario": sc.name,
            "status": result.get("status", ""),
            "historical_throughput": result.get("historical_throughput") or 0.0,
            "baseline_throughput": result.get("baseline_throughput") or 0.0,
            "baseline_error_pct": result.get("baseline_error_pct") or 0.0,
            "scenario_throughput": result.get("scenario_throughput") or 0.0,
            "notice": NOTICE,
        },
    }


def graph_integrity_result(store: Store) -> dg.AssetCheckResult:
    """``twin/edge:graph_integrity`` evaluated on ``store`` (the edge asset's own step)."""
    ensure_graph_tables(store)
    row = store.con.execute(
        """
        SELECT (SELECT count(*) FROM twin.twin.edge e WHERE NOT EXISTS
                    (SELECT 1 FROM twin.twin.node n WHERE n.node_id = e.src)
                 OR NOT EXISTS (SELECT 1 FROM twin.twin.node n WHERE n.node_id = e.dst)),
               (SELECT count(*) - count(DISTINCT node_id) FROM twin.twin.node),
               (SELECT count(*) FROM twin.twin.node),
               (SELECT count(*) FROM twin.twin.edge)
        """
    ).fetchone()
    broken, dup, nodes, edges = (int(x) for x in row) if row else (0, 0, 0, 0)
    return dg.AssetCheckResult(
        check_name=GRAPH_CHECK,
        passed=broken == 0 and dup == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "edges_to_missing_nodes": broken,
            "duplicate_node_ids": dup,
            "nodes": nodes,
            "edges": edges,
        },
    )


def baseline_result(store: Store) -> dg.AssetCheckResult:
    """``twin/simulation_result:baseline_reproduces_history`` on the latest stored run."""
    row = None
    if store.table_exists("twin.simulation_run"):
        row = store.con.execute(
            "SELECT sim_id, status, result->>'baseline_error_pct', scenario "
            "FROM twin.twin.simulation_run ORDER BY created_at DESC LIMIT 1"
        ).fetchone()
    if row is None:
        return dg.AssetCheckResult(
            check_name=BASELINE_CHECK,
            passed=False,
            metadata={"reason": "no simulation run stored"},
        )
    sid, status, err, scenario = row
    if status != "ok" or err is None:
        return dg.AssetCheckResult(
            check_name=BASELINE_CHECK,
            passed=True,
            metadata={"sim_id": sid, "status": status, "scenario": scenario},
        )
    return dg.AssetCheckResult(
        check_name=BASELINE_CHECK,
        passed=float(err) <= 10.0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"sim_id": sid, "scenario": scenario, "baseline_error_pct": float(err)},
    )


defs = dg.Definitions(
    assets=[
        twin_node,
        twin_edge,
        state_patient_vitals,
        state_device,
        state_scanner,
        simulation_result,
    ],
)
