"""``twin graph ...`` (build and query the twin graph) and ``twin simulate SCENARIO.yaml``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

GRAPH_ASSETS = [
    "twin/node",
    "twin/edge",
    "twin/state_patient_vitals",
    "twin/state_device",
    "twin/state_scanner",
]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("graph", help="build and query the twin graph (nodes, edges, state)")
    gsub = g.add_subparsers(dest="graph_command", metavar="ACTION")
    b = gsub.add_parser("build", help="materialize twin/node, twin/edge and state through Dagster")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_graph_build)
    s = gsub.add_parser("stats", help="nodes per interface and edges per relationship")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_graph_stats)

    q = gsub.add_parser("query", help="neighbours, k-hop reach, paths, filters, patterns")
    qsub = q.add_subparsers(dest="query_kind", metavar="KIND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    common.add_argument("--limit", type=int, default=100)
    window = argparse.ArgumentParser(add_help=False)
    window.add_argument("--last", help="time window ending at --at: e.g. 24h, 7d, 90m")
    window.add_argument("--since", help="window start (ISO-8601)")
    window.add_argument("--until", help="window end (ISO-8601)")
    window.add_argument("--at", help="'now' for --last (ISO-8601; default: the twin's as-of)")

    n = qsub.add_parser("neighbours", parents=[common, window], help="twins one edge away")
    n.add_argument("node", help="node id, e.g. Patient/123")
    n.add_argument("--rel")
    n.add_argument("--direction", choices=["out", "in", "both"], default="both")
    n.set_defaults(func=cmd_neighbours)
    k = qsub.add_parser("khop", parents=[common], help="twins within k hops (recursive CTE)")
    k.add_argument("node")
    k.add_argument("-k", type=int, default=2)
    k.add_argument("--rel", action="append", help="only these relationships (repeatable)")
    k.add_argument("--directed", action="store_true")
    k.set_defaults(func=cmd_khop)
    p = qsub.add_parser("path", parents=[common], help="simple paths between two twins")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--max-hops", type=int, default=4)
    p.add_argument("--rel", action="append")
    p.add_argument("--directed", action="store_true")
    p.set_defaults(func=cmd_path)
    f = qsub.add_parser("filter", parents=[common], help="twins of a type matching properties")
    f.add_argument("type", help="interface name, or * for any")
    f.add_argument("--where", action="append", default=[], help="prop=value or prop~substring")
    f.set_defaults(func=cmd_filter)
    m = qsub.add_parser(
        "match",
        parents=[common, window],
        help="chain pattern, e.g. 'Device -attached_to-> Patient <-subject- Encounter "
        "-located_at-> * -part_of*0..2-> CareUnit{name~Intensive}'",
    )
    m.add_argument("pattern")
    m.set_defaults(func=cmd_match)

    sim = sub.add_parser(
        "simulate",
        help="what-if simulation of imaging and bed capacity (operational estimates only)",
    )
    sim.add_argument("scenario", help="scenario YAML (a path, or a name in assets/scenarios/)")
    sim.add_argument("--json", action="store_true", help="print the result document as JSON")
    sim.add_argument("--replications", type=int, default=0)
    sim.add_argument("--seed", type=int, default=-1)
    sim.add_argument("--chart", type=Path, help="write the PNG chart here")
    sim.add_argument("--wait", action="store_true", help="wait for a running pipeline")
    sim.set_defaults(func=cmd_simulate)


# -- helpers --------------------------------------------------------------------------------
def _open_ro() -> Store:
    return Store.open(Settings.from_env(), read_only=True)


def _ts(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise TwinPipelineError(f"not an ISO-8601 time: {text!r}") from None


def _duration(text: str) -> timedelta:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if not m:
        raise TwinPipelineError(f"window must look like 90m, 24h or 7d, not {text!r}")
    n = float(m[1])
    return {"m": timedelta(minutes=n), "h": timedelta(hours=n), "d": timedelta(days=n)}[m[2]]


def _window(store: Store, args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    from twin_pipeline.twin.query import as_of

    since, until = _ts(args.since), _ts(args.until)
    if args.last:
        now = _ts(args.at) or until or as_of(store)
        if now is None:
            return None, None
        since, until = now - _duration(args.last), now
    return since, until


def _print_rows(
    rows: list[dict[str, Any]], as_json: bool, meta: dict[str, Any] | None = None
) -> None:
    if as_json:
        print(json.dumps({**(meta or {}), "rows": rows, "count": len(rows)}, indent=2, default=str))
        return
    if meta:
        for k, v in meta.items():
            print(f"# {k}: {v}")
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0])
    print("\t".join(cols))
    for r in rows:
        print("\t".join("" if r[c] is None else str(r[c]) for c in cols))


# -- graph ----------------------------------------------------------------------------------
def cmd_graph_build(args: argparse.Namespace) -> int:
    from twin_pipeline.defs.runner import run_pipeline

    settings = Settings.from_env().ensure()
    landing = settings.home / "landing"
    landing.mkdir(exist_ok=True)
    summary = run_pipeline(landing, settings, selection=GRAPH_ASSETS)
    mats = {k: v for k, v in summary.materializations.items() if k.startswith("twin/")}
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": summary.run_id,
                    "success": summary.success,
                    "failures": summary.failures,
                    "materializations": mats,
                },
                indent=2,
                default=str,
            )
        )
    else:
        for k, v in mats.items():
            print(f"{k}: {v.get('rows', v.get(k.replace('/', '.') + '.rows', ''))} rows")
        for f in summary.failures:
            print(f"failed: {f}", file=sys.stderr)
    return 0 if summary.success else 1


def cmd_graph_stats(args: argparse.Namespace) -> int:
    with _open_ro() as store:
        _need_graph(store)
        nodes = dict(
            store.con.execute(
                "SELECT twin_type, count(*) FROM twin.twin.node GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
        edges = dict(
            store.con.execute(
                "SELECT src_type || '.' || rel, count(*) FROM twin.twin.edge GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )
    if args.json:
        print(json.dumps({"nodes": nodes, "edges": edges}, indent=2))
    else:
        for k, v in nodes.items():
            print(f"node {k:20s} {v:>10,}")
        for k, v in edges.items():
            print(f"edge {k:30s} {v:>10,}")
    return 0


def _need_graph(store: Store) -> None:
    if not store.table_exists("twin.node") or not store.table_exists("twin.edge"):
        raise TwinPipelineError("no twin graph yet: run `twin graph build` (or `twin run`)")


def cmd_neighbours(args: argparse.Namespace) -> int:
    from twin_pipeline.twin.query import neighbours

    with _open_ro() as store:
        _need_graph(store)
        since, until = _window(store, args)
        rows = neighbours(
            store, args.node, rel=args.rel, direction=args.direction, since=since, until=until
        )[: args.limit]
    _print_rows(rows, args.json, {"node": args.node, "since": since, "until": until})
    return 0


def cmd_khop(args: argparse.Namespace) -> int:
    from twin_pipeline.twin.query import k_hop

    with _open_ro() as store:
        _need_graph(store)
        rows = k_hop(store, args.node, args.k, rels=args.rel, directed=args.directed)[: args.limit]
    _print_rows(rows, args.json, {"node": args.node, "k": args.k})
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from twin_pipeline.twin.query import paths

    with _open_ro() as store:
        _need_graph(store)
        rows = paths(
            store,
            args.src,
            args.dst,
            max_hops=args.max_hops,
            rels=args.rel,
            directed=args.directed,
            limit=args.limit,
        )
    if not args.json:
        for r in rows:
            steps = [r["nodes"][0]]
            for rel, node in zip(r["rels"], r["nodes"][1:], strict=True):
                steps.append(f"-{rel}- {node}")
            print(" ".join(steps))
        if not rows:
            print("(no path)")
        return 0
    _print_rows(rows, True, {"src": args.src, "dst": args.dst})
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from twin_pipeline.twin.query import filter_nodes

    with _open_ro() as store:
        _need_graph(store)
        rows = filter_nodes(
            store, None if args.type == "*" else args.type, where=args.where, limit=args.limit
        )
    _print_rows(rows, args.json)
    return 0


def cmd_match(args: argparse.Namespace) -> int:
    from twin_pipeline.twin.query import match

    with _open_ro() as store:
        _need_graph(store)
        since, until = _window(store, args)
        res = match(store, args.pattern, since=since, until=until, limit=args.limit)
    rows = [dict(zip(res.columns, r, strict=True)) for r in res.rows]
    _print_rows(rows, args.json, {"pattern": args.pattern, "since": since, "until": until})
    return 0


# -- simulate -------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.twin.scenario import load_scenario
    from twin_pipeline.twin.simulate import NOTICE, load_result

    _, path, _ = load_scenario(args.scenario)  # validate before starting Dagster
    settings = Settings.from_env().ensure()
    landing = settings.home / "landing"
    landing.mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "scenario": str(path),
        "replications": args.replications,
        "seed": args.seed,
    }
    if args.chart:
        cfg["chart"] = str(args.chart.resolve())
    summary = run_pipeline(
        landing,
        settings,
        selection=["twin/simulation_result"],
        wait=args.wait,
        extra_config={"ops": {"twin__simulation_result": {"config": cfg}}},
    )
    if not summary.success:
        for f in summary.failures:
            print(f"twin: simulation failed: {f}", file=sys.stderr)
        return 1
    sid = summary.materializations.get("twin/simulation_result", {}).get("sim_id")
    with Store.open(settings, read_only=True) as store:
        result = load_result(store, str(sid)) if sid else None
    if result is None:
        raise TwinPipelineError("simulation ran but its result was not found in the store")
    result["run_id"] = summary.run_id
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    _print_simulation(result)
    print(f"\n{NOTICE}")
    return 0


def _fmt(v: Any, digits: int = 4) -> str:
    """Significant digits, so tiny rates (0.0475 studies/day) stay readable."""
    return "n/a" if v is None else f"{v:,.{digits}g}"


def _ci(pair: list[float] | None) -> str:
    return "n/a" if not pair else f"{_fmt(pair[0])} to {_fmt(pair[1])}"


def _print_simulation(r: dict[str, Any]) -> None:
    print(f"scenario {r['scenario']}: {r.get('description', '')}")
    print(
        f"  {r['replications']} replications, seed {r['seed']}, horizon {_fmt(r['horizon_days'])} days"
    )
    if r.get("status") != "ok":
        print("  nothing simulated: " + "; ".join(r.get("notes", [])))
        return
    unit = r.get("throughput_unit", "")
    print(f"  historical throughput  {_fmt(r['historical_throughput'])} {unit}")
    print(
        f"  baseline throughput    {_fmt(r['baseline_throughput'])} {unit} "
        f"(95% CI {_ci(r['baseline_throughput_ci95'])}); error vs history {_fmt(r['baseline_error_pct'], 3)}%"
    )
    print(
        f"  scenario throughput    {_fmt(r['scenario_throughput'])} {unit} "
        f"(95% CI {_ci(r['scenario_throughput_ci95'])})"
    )
    print(
        f"  mean wait (min)        baseline {_fmt(r['baseline_wait_min'])}  scenario {_fmt(r['scenario_wait_min'])}"
    )
    print(
        f"  utilization            baseline {_fmt(r['baseline_utilization'], 3)}  scenario {_fmt(r['scenario_utilization'], 3)}"
    )
    for arm in ("baseline", "scenario"):
        left = r.get(f"{arm}_unserved") or 0
        if left > 0:
            print(
                f"  note: {arm}: {_fmt(left)} patients per replication still waiting at the "
                "horizon; mean waits leave them out, so they understate the queue"
            )
    print("  per station (baseline -> scenario):")
    for name, st in r.get("stations", {}).items():
        b, s = st["baseline"], st.get("scenario") or {}
        line = (
            f"    {name:8s} servers {st['baseline_setup']['servers']}->"
            f"{(st.get('scenario_setup') or {}).get('servers')}  "
            f"thr {_fmt(b['throughput_per_day']['mean'])}->{_fmt(s.get('throughput_per_day', {}).get('mean'))}  "
            f"wait {_fmt(b['mean_wait_min']['mean'])}->{_fmt(s.get('mean_wait_min', {}).get('mean'))} min  "
            f"util {_fmt(b['utilization']['mean'], 3)}->{_fmt(s.get('utilization', {}).get('mean'), 3)}"
        )
        if st.get("analytic_mmc_wait_min") is not None:
            line += f"  (Erlang C wait {_fmt(st['analytic_mmc_wait_min'])} min)"
        print(line)
    print(f"  {r.get('events', 0):,} events simulated")
    if r.get("chart"):
        print(f"  chart: {r['chart']}")
