"""Run a what-if scenario: fit the baseline from the twin, apply the scenario, replicate both,
compare, chart, and store the result in ``twin.simulation_run`` / ``twin.simulation_metric``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from twin_pipeline.store import Store
from twin_pipeline.twin.fit import History, ServiceDist, StationParams, fit_history
from twin_pipeline.twin.scenario import DemandShift, ExplicitStation, Scenario
from twin_pipeline.twin.sim import StationRun, erlang_c_wait, run_station, stream, summarize

NOTICE = (
    "Operational estimates from a discrete-event simulation fitted to the twin's history, for "
    "capacity planning only; they are not clinical recommendations."
)
RUN_TABLE = "twin.twin.simulation_run"
T = TypeVar("T")
METRIC_TABLE = "twin.twin.simulation_metric"


@dataclass(frozen=True)
class Setup:
    """A station as one arm runs it."""

    domain: str  # imaging | beds | explicit
    params: StationParams
    servers: int
    open_hours: tuple[int, int]
    demand: float = 1.0
    service_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "servers": self.servers,
            "open_hours": list(self.open_hours),
            "demand_multiplier": self.demand,
            "service_time_multiplier": self.service_scale,
            "arrivals_per_day": round(self.params.arrivals_per_day() * self.demand, 4),
            "service_mean_min": round(self.params.service.mean * self.service_scale, 3),
        }


def _explicit_params(name: str, st: ExplicitStation) -> StationParams:
    if st.distribution == "lognormal":
        mu = math.log(st.service_mean_min) - st.lognormal_sigma**2 / 2
        svc = ServiceDist("lognormal", st.service_mean_min, mu=mu, sigma=st.lognormal_sigma)
    else:
        svc = ServiceDist(st.distribution, st.service_mean_min)
    return StationParams(
        name=name,
        rates=np.full((7, 24), st.arrival_rate_per_hour),
        service=svc,
        servers=st.servers,
        open_hours=(0, 24),
        servers_source="scenario (explicit)",
    )


def _pick(changes: Mapping[str, T], station: str, default: T) -> T:
    """A scenario value for a station: keyed by its name (``CR+DX``) or one of its modalities."""
    if station in changes:
        return changes[station]
    for mod in station.split("+"):
        if mod in changes:
            return changes[mod]
    return default


def unmatched_changes(sc: Scenario, stations: list[str]) -> list[str]:
    """Scenario keys that name no fitted station or modality (they change nothing)."""
    known = set(stations) | {m for st in stations for m in st.split("+")} | {"*"}
    ic = sc.imaging
    out: list[str] = []
    for field_name in (
        "add_scanners",
        "set_scanners",
        "technologists",
        "opening_hours",
        "modality_demand",
        "service_time_multiplier",
        "shift_demand",
    ):
        keys = (
            [d.modality for d in ic.shift_demand]
            if field_name == "shift_demand"
            else list(getattr(ic, field_name))
        )
        for key in keys:
            if key not in known:
                out.append(
                    f"imaging.{field_name}.{key}: no such modality in the twin's history "
                    f"(have {', '.join(sorted(stations)) or 'none'}); ignored"
                )
    return out


def _shifted(p: StationParams, shifts: list[DemandShift]) -> StationParams:
    """``p`` with demand moved between hours of the day (total demand unchanged)."""
    if not shifts:
        return p
    rates = p.rates.copy()
    for sh in shifts:
        src = list(range(sh.from_hours.open, sh.from_hours.close))
        dst = list(range(sh.to_hours.open, sh.to_hours.close))
        moved = rates[:, src] * sh.fraction  # per weekday and source hour
        rates[:, src] -= moved
        rates[:, dst] += moved.sum(axis=1, keepdims=True) / len(dst)
    return dataclasses.replace(p, rates=rates)


def plan(history: History | None, sc: Scenario) -> tuple[dict[str, Setup], dict[str, Setup]]:
    """Baseline and scenario station setups."""
    base: dict[str, Setup] = {}
    what: dict[str, Setup] = {}
    if sc.explicit is not None:
        for name, st in sc.explicit.items():
            p = _explicit_params(name, st)
            base[name] = Setup("explicit", p, p.servers, p.open_hours)
        for name, st in (sc.explicit_scenario or sc.explicit).items():
            p = _explicit_params(name, st)
            what[name] = Setup("explicit", p, p.servers, p.open_hours)
        return base, what
    assert history is not None
    ic = sc.imaging
    for name, p in history.imaging.items():
        base[name] = Setup("imaging", p, p.servers, p.open_hours)
        servers = _pick(ic.set_scanners, name, p.servers) + _pick(ic.add_scanners, name, 0)
        techs = _pick(ic.technologists, name, None)
        if techs is not None:
            servers = min(servers, techs)
        hours = _pick(ic.opening_hours, name, None) or ic.opening_hours.get("*")
        what[name] = Setup(
            "imaging",
            _shifted(p, [d for d in ic.shift_demand if _pick({d.modality: 1}, name, 0)]),
            max(servers, 1),
            (hours.open, hours.close) if hours else p.open_hours,
            ic.demand_multiplier * _pick(ic.modality_demand, name, 1.0),
            _pick(ic.service_time_multiplier, name, 1.0),
        )
    if history.beds is not None:
        b = history.beds
        base["beds"] = Setup("beds", b, b.servers, b.open_hours)
        n = (sc.beds.set_beds or b.servers) + sc.beds.add_beds
        what["beds"] = Setup(
            "beds", b, max(n, 1), b.open_hours, sc.beds.demand_multiplier, sc.beds.los_multiplier
        )
    return base, what


def _run_arm(
    setups: dict[str, Setup], rep: int, seed: int, horizon: float, warmup: float, weekday: int
) -> dict[str, StationRun]:
    return {
        name: run_station(
            s.params,
            horizon_days=horizon,
            warmup_days=warmup,
            start_weekday=weekday,
            rng=stream(seed, rep, name),
            demand=s.demand,
            service_scale=s.service_scale,
            servers=s.servers,
            open_hours=s.open_hours,
        )
        for name, s in setups.items()
    }


#: Replications (arms) a worker process is worth from: below, the fork costs more than it saves.
PARALLEL_MIN_TASKS = 8


def _sim_workers(n_tasks: int) -> int:
    """Worker processes for ``n_tasks`` replication arms: ``TWIN_SIM_WORKERS`` if set (0 or 1:
    this process), else the usable cores when there are enough tasks."""
    import os

    raw = os.environ.get("TWIN_SIM_WORKERS", "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            return 1
    if n_tasks < PARALLEL_MIN_TASKS:
        return 1
    from twin_pipeline.procs import usable_cores

    return min(usable_cores(), n_tasks)


def _replicate(
    arms: dict[str, dict[str, Setup]],
    tasks: list[tuple[int, str]],
    seed: int,
    horizon: float,
    warmup: float,
    weekday: int,
) -> list[dict[str, StationRun]]:
    """The station runs of each (replication, arm) task, in task order. Each task draws from
    its own seeded streams (``stream(seed, rep, station)``), so the runs, and every figure
    computed from them, are the same in one process or in forked workers (a simulation of
    the 10k-patient twin spent ~17 s in this loop)."""
    workers = _sim_workers(len(tasks))
    if workers < 2:
        return [_run_arm(arms[arm], rep, seed, horizon, warmup, weekday) for rep, arm in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from twin_pipeline.procs import freeze_for_fork, unfreeze_after_pool, worker_init

    freeze_for_fork()
    try:
        # fork, as the other pools: spawn would re-import the __main__ of Dagster or pytest
        with ProcessPoolExecutor(
            workers, mp_context=mp.get_context("fork"), initializer=worker_init
        ) as pool:
            futures = [
                pool.submit(_run_arm, arms[arm], rep, seed, horizon, warmup, weekday)
                for rep, arm in tasks
            ]
            return [f.result() for f in futures]
    finally:
        unfreeze_after_pool()


def _domain_totals(
    runs: dict[str, StationRun], setups: dict[str, Setup], domain: str
) -> dict[str, float] | None:
    rs = [r for n, r in runs.items() if setups[n].domain == domain]
    if not rs:
        return None
    waits = np.concatenate([r.waits for r in rs]) if rs else np.empty(0)
    cap = sum(r.capacity_minutes for r in rs)
    return {
        "throughput_per_day": sum(r.throughput_per_day for r in rs),
        "mean_wait_min": float(waits.mean()) if len(waits) else 0.0,
        "utilization": sum(r.busy_minutes for r in rs) / cap if cap else 0.0,
        "unserved": float(sum(r.unserved for r in rs)),
    }


def _pct(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(abs(a - b) / b * 100.0, 3)


def run_simulation(
    store: Store | None,
    sc: Scenario,
    *,
    scenario_path: str = "",
    scenario_sha256: str = "",
    replications: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Fit (unless explicit), replicate baseline and scenario, and summarize. Pure: no writes."""
    reps = replications or sc.replications
    seed = sc.seed if seed is None else seed
    history: History | None = None
    notes: list[str] = []
    if sc.explicit is None:
        if store is None:
            raise ValueError("a fitted scenario needs the twin store")
        history = fit_history(store, sc.fit, list(sc.domains))
        notes += history.notes
    base, what = plan(history, sc)
    if history is not None:
        notes += unmatched_changes(sc, list(history.imaging))
    horizon = sc.horizon_days or (history.days if history else 0)
    weekday = history.start_weekday if history else 0
    result: dict[str, Any] = {
        "notice": NOTICE,
        "scenario": sc.name,
        "description": sc.description,
        "scenario_file": scenario_path,
        "scenario_sha256": scenario_sha256,
        "seed": seed,
        "replications": reps,
        "horizon_days": horizon,
        "warmup_days": sc.warmup_days,
        "notes": notes,
    }
    if history is not None:
        result["history"] = {
            "first_day": history.first_day.isoformat() if history.first_day else None,
            "days": history.days,
            "timezone": history.timezone,
            "fitted": {
                **{m: p.to_dict() for m, p in history.imaging.items()},
                **({"beds": history.beds.to_dict()} if history.beds else {}),
            },
        }
    if not base or not horizon:
        result.update(
            status="no_history",
            historical_throughput=None,
            baseline_throughput=None,
            baseline_error_pct=None,
            scenario_throughput=None,
            baseline_wait_min=None,
            scenario_wait_min=None,
            baseline_utilization=None,
            scenario_utilization=None,
            events=0,
            events_per_s=0.0,
        )
        result["notes"].append("nothing to simulate: the twin has no usable history")
        return result

    t0 = time.perf_counter()
    events = 0
    per: dict[str, dict[str, dict[str, list[float]]]] = {"baseline": {}, "scenario": {}}
    tot: dict[str, dict[str, dict[str, list[float]]]] = {"baseline": {}, "scenario": {}}
    arms = {"baseline": base, "scenario": what}
    tasks = [(rep, arm) for rep in range(reps) for arm in arms]
    all_runs = _replicate(arms, tasks, seed, horizon, sc.warmup_days, weekday)
    for (_rep, arm), runs in zip(tasks, all_runs, strict=True):
        setups = arms[arm]
        for name, r in runs.items():
            events += r.events
            m = per[arm].setdefault(name, {})
            for k, v in (
                ("throughput_per_day", r.throughput_per_day),
                ("mean_wait_min", r.mean_wait),
                ("p90_wait_min", r.p90_wait),
                ("utilization", r.utilization),
                ("unserved", float(r.unserved)),
            ):
                m.setdefault(k, []).append(v)
        for domain in ("imaging", "beds", "explicit"):
            t = _domain_totals(runs, setups, domain)
            if t:
                d = tot[arm].setdefault(domain, {})
                for k, v in t.items():
                    d.setdefault(k, []).append(v)
    wall = time.perf_counter() - t0

    stations: dict[str, Any] = {}
    for name in base:
        stations[name] = {
            "domain": base[name].domain,
            "baseline_setup": base[name].to_dict(),
            "scenario_setup": what[name].to_dict() if name in what else None,
            "baseline": {k: summarize(v).to_dict() for k, v in per["baseline"][name].items()},
            "scenario": (
                {k: summarize(v).to_dict() for k, v in per["scenario"][name].items()}
                if name in per["scenario"]
                else None
            ),
        }
        if history is not None:
            p = base[name].params
            stations[name]["historical_throughput_per_day"] = round(
                p.historical_count / history.days, 4
            )
        elif sc.explicit is not None:
            st = sc.explicit[name]
            wq = (
                erlang_c_wait(st.arrival_rate_per_hour / 60.0, st.service_mean_min, st.servers)
                if st.distribution == "exponential"
                else None
            )
            stations[name]["analytic_mmc_wait_min"] = None if wq is None else round(wq, 4)
    result["stations"] = stations
    domains: dict[str, Any] = {}
    for domain in ("imaging", "beds", "explicit"):
        if domain not in tot["baseline"]:
            continue
        b = {k: summarize(v) for k, v in tot["baseline"][domain].items()}
        s = {k: summarize(v) for k, v in tot["scenario"].get(domain, {}).items()}
        hist = None
        if history is not None:
            hist = (
                sum(st.params.historical_count for st in base.values() if st.domain == domain)
                / history.days
            )
        domains[domain] = {
            "historical_throughput": None if hist is None else round(hist, 4),
            "baseline": {k: v.to_dict() for k, v in b.items()},
            "scenario": {k: v.to_dict() for k, v in s.items()},
            "baseline_error_pct": _pct(b["throughput_per_day"].mean, hist),
        }
    result["domains"] = domains
    primary = next(d for d in ("imaging", "explicit", "beds") if d in domains)
    pd_ = domains[primary]
    result.update(
        status="ok",
        primary_domain=primary,
        throughput_unit="studies/day"
        if primary == "imaging"
        else ("admissions/day" if primary == "beds" else "completions/day"),
        historical_throughput=pd_["historical_throughput"],
        baseline_throughput=pd_["baseline"]["throughput_per_day"]["mean"],
        baseline_throughput_ci95=pd_["baseline"]["throughput_per_day"]["ci95"],
        baseline_error_pct=pd_["baseline_error_pct"],
        scenario_throughput=pd_["scenario"]["throughput_per_day"]["mean"],
        scenario_throughput_ci95=pd_["scenario"]["throughput_per_day"]["ci95"],
        baseline_wait_min=pd_["baseline"]["mean_wait_min"]["mean"],
        baseline_wait_min_ci95=pd_["baseline"]["mean_wait_min"]["ci95"],
        scenario_wait_min=pd_["scenario"]["mean_wait_min"]["mean"],
        scenario_wait_min_ci95=pd_["scenario"]["mean_wait_min"]["ci95"],
        baseline_utilization=pd_["baseline"]["utilization"]["mean"],
        scenario_utilization=pd_["scenario"]["utilization"]["mean"],
        # Patients still queued at the horizon: their waits are not in the means above.
        baseline_unserved=pd_["baseline"]["unserved"]["mean"],
        scenario_unserved=pd_["scenario"]["unserved"]["mean"],
        events=events,
        events_per_s=round(events / wall, 1) if wall > 0 else None,
        wall_s=round(wall, 3),
    )
    return result


def sim_id(result: dict[str, Any], snapshot: str) -> str:
    """Same scenario bytes, seed, replications and twin snapshot: same id."""
    material = "|".join(
        [
            str(result.get("scenario_sha256")),
            str(result.get("seed")),
            str(result.get("replications")),
            snapshot,
        ]
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _stable(result: dict[str, Any]) -> dict[str, Any]:
    """The result without run-varying fields (timings), for storage and hashing."""
    return {k: v for k, v in result.items() if k not in ("wall_s", "events_per_s", "chart")}


def save_result(store: Store, result: dict[str, Any], *, snapshot: str, chart: str | None) -> str:
    """Write the run and its metrics (replacing an earlier run with the same id)."""
    con = store.con
    con.execute("CREATE SCHEMA IF NOT EXISTS twin.twin")
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {RUN_TABLE} (
            sim_id VARCHAR, scenario VARCHAR, scenario_file VARCHAR, scenario_sha256 VARCHAR,
            seed BIGINT, replications BIGINT, twin_snapshot VARCHAR, status VARCHAR,
            result JSON, chart_path VARCHAR, run_id VARCHAR, created_at TIMESTAMPTZ)"""
    )
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {METRIC_TABLE} (
            sim_id VARCHAR, arm VARCHAR, station VARCHAR, metric VARCHAR,
            mean DOUBLE, ci_low DOUBLE, ci_high DOUBLE, n BIGINT)"""
    )
    sid = sim_id(result, snapshot)
    if chart:
        # stored relative to TWIN_HOME: the same twin gives the same row wherever it lives
        with contextlib.suppress(ValueError):
            chart = Path(chart).resolve().relative_to(store.settings.home).as_posix()
    con.execute(f"DELETE FROM {RUN_TABLE} WHERE sim_id = ?", [sid])
    con.execute(f"DELETE FROM {METRIC_TABLE} WHERE sim_id = ?", [sid])
    con.execute(
        f"INSERT INTO {RUN_TABLE} VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        [
            sid,
            result["scenario"],
            Path(result["scenario_file"]).name if result.get("scenario_file") else "",
            result.get("scenario_sha256"),
            result["seed"],
            result["replications"],
            snapshot,
            result.get("status"),
            json.dumps(_stable(result), sort_keys=True, default=str),
            chart,
            store.run_id,
            datetime.now(UTC),
        ],
    )
    rows = []
    for station, info in (result.get("stations") or {}).items():
        for arm in ("baseline", "scenario"):
            for metric, s in (info.get(arm) or {}).items():
                rows.append(
                    (sid, arm, station, metric, s["mean"], s["ci95"][0], s["ci95"][1], s["n"])
                )
    store.insert_values(METRIC_TABLE, rows)
    return sid


def load_result(store: Store, sid: str) -> dict[str, Any] | None:
    row = store.con.execute(
        f"SELECT result, chart_path FROM {RUN_TABLE} WHERE sim_id = ?", [sid]
    ).fetchone()
    if not row:
        return None
    doc: dict[str, Any] = json.loads(row[0])
    doc["sim_id"] = sid
    chart = row[1]
    if chart and not Path(chart).is_absolute():
        chart = str(store.settings.home / chart)
    doc["chart"] = chart
    return doc


def make_chart(result: dict[str, Any], path: Path) -> Path:
    """Baseline vs scenario per station: throughput, mean wait and utilization with 95% CIs;
    one row per domain (imaging stations, beds), since their units differ."""
    # The object-oriented API, not pyplot: no global figure state, so a chart can be drawn in
    # a thread while the run goes on (the simulation step does so).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stations = result.get("stations") or {}
    domains: dict[str, list[str]] = {}
    for name, st in stations.items():
        domains.setdefault(st.get("domain", ""), []).append(name)
    rows = max(len(domains), 1)
    fig = Figure(figsize=(13, 3.8 * rows + 0.6))
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, 3, squeeze=False)
    units = {"imaging": "studies", "beds": "admissions", "explicit": "completions"}
    for (domain, names), axes in zip(domains.items(), grid, strict=False):
        wait_scale, wait_unit = (60.0, "h") if domain == "beds" else (1.0, "min")
        metrics = (
            ("throughput_per_day", f"{domain}: {units.get(domain, 'patients')} / day", 1.0),
            ("mean_wait_min", f"{domain}: mean wait ({wait_unit})", wait_scale),
            ("utilization", f"{domain}: utilization", 1.0),
        )
        x = np.arange(len(names))
        for ax, (metric, label, scale) in zip(axes, metrics, strict=True):
            for off, arm, color in ((-0.2, "baseline", "#4c72b0"), (0.2, "scenario", "#dd8452")):
                means, errs = [], []
                for n in names:
                    s = (stations[n].get(arm) or {}).get(metric)
                    m = s["mean"] / scale if s else 0.0
                    means.append(m)
                    errs.append(
                        [m - s["ci95"][0] / scale, s["ci95"][1] / scale - m] if s else [0.0, 0.0]
                    )
                ax.bar(
                    x + off, means, 0.4, yerr=np.array(errs).T, capsize=3, label=arm, color=color
                )
            if metric == "throughput_per_day":
                hist = [stations[n].get("historical_throughput_per_day") for n in names]
                if any(h is not None for h in hist):
                    ax.scatter(
                        x,
                        [h if h is not None else np.nan for h in hist],
                        marker="_",
                        s=400,
                        color="black",
                        label="historical",
                        zorder=3,
                    )
            ax.set_xticks(x, names)
            ax.set_title(label, fontsize=10)
            ax.set_ylim(bottom=0)
        axes[0].legend(fontsize=8)
    fig.suptitle(
        f"what-if: {result.get('scenario')} ({result.get('replications')} replications, seed "
        f"{result.get('seed')})"
    )
    fig.text(0.5, 0.01, NOTICE, ha="center", fontsize=7, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
