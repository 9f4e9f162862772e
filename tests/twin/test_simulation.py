"""Fitting from the twin's history, the SimPy models, reproducibility, and Erlang C."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from twin_pipeline.store import Store
from twin_pipeline.twin import simulate as simulate_module
from twin_pipeline.twin import synthetic
from twin_pipeline.twin.fit import fit_history
from twin_pipeline.twin.graph import GraphReport
from twin_pipeline.twin.scenario import SCENARIOS_DIR, FitConfig, Scenario, load_scenario
from twin_pipeline.twin.sim import erlang_c, erlang_c_wait, summarize, t_cdf, t_quantile
from twin_pipeline.twin.simulate import NOTICE, make_chart, run_simulation


def test_fit_recovers_the_generating_parameters(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    h = fit_history(store, FitConfig(), ["imaging", "beds"])
    assert h.days == 56 and h.first_day is not None and h.first_day.isoformat() == "2024-01-01"
    assert set(h.imaging) == {"CT", "MR"}
    ct, mr = h.imaging["CT"], h.imaging["MR"]
    # Scanners from distinct serials in the series; opening hours from start times.
    assert (ct.servers, mr.servers) == (2, 1)
    assert ct.open_hours == synthetic.OPEN_HOURS and mr.open_hours == synthetic.OPEN_HOURS
    # Weekday vs weekend rates: generated 14/day on weekdays, a third of that at weekends.
    weekday = ct.rates[:5].sum(axis=1).mean()
    weekend = ct.rates[5:].sum(axis=1).mean()
    assert weekday == pytest.approx(synthetic.STUDIES_PER_DAY["CT"], rel=0.12)
    assert weekend == pytest.approx(synthetic.STUDIES_PER_DAY["CT"] / 3, rel=0.35)
    assert ct.rates[:, : synthetic.OPEN_HOURS[0]].sum() == 0
    # Fitted rates reproduce the historical count exactly in expectation over the window.
    counts = store.con.execute(
        "SELECT modality, count(*) FROM harmonized.imaging_study GROUP BY 1"
    ).fetchall()
    for mod, n in counts:
        assert h.imaging[mod].historical_count == n
        assert h.imaging[mod].arrivals_per_day() * h.days == pytest.approx(n, rel=0.03)
    # Per-series time: generated uniform(4, 8) min for CT, uniform(10, 20) for MR.
    ct_study = ct.service.samples
    assert 4 <= np.median(ct_study) <= 4 + 3 * 8 and ct.service.mean > 6
    assert mr.service.mean > ct.service.mean
    # Beds: the 16 beds on the two inpatient units, length of stay around 72 h.
    assert h.beds is not None and h.beds.servers == 16
    assert 50 * 60 < np.median(h.beds.service.samples) < 100 * 60


def test_baseline_reproduces_historical_throughput_within_10pct(
    graph_store: tuple[Store, GraphReport],
) -> None:
    store, _ = graph_store
    sc = Scenario.model_validate(
        {"name": "t", "replications": 8, "imaging": {"add_scanners": {"CT": 1}}}
    )
    r = run_simulation(store, sc)
    assert r["status"] == "ok" and r["notice"] == NOTICE
    assert r["baseline_error_pct"] < 10
    for name, st in r["stations"].items():
        hist = st["historical_throughput_per_day"]
        assert st["baseline"]["throughput_per_day"]["mean"] == pytest.approx(hist, rel=0.1), name
    assert r["domains"]["beds"]["baseline_error_pct"] < 10
    for key in (
        "historical_throughput",
        "baseline_throughput",
        "scenario_throughput",
        "baseline_wait_min",
        "scenario_wait_min",
        "baseline_utilization",
        "scenario_utilization",
    ):
        assert isinstance(r[key], float), key
    # One more CT scanner: same demand, lower CT utilization, no longer waits.
    ct = r["stations"]["CT"]
    assert ct["scenario_setup"]["servers"] == 3
    assert ct["scenario"]["utilization"]["mean"] < ct["baseline"]["utilization"]["mean"]
    assert ct["scenario"]["mean_wait_min"]["mean"] <= ct["baseline"]["mean_wait_min"]["mean"] + 1e-9


def test_scenario_changes_are_applied(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    sc = Scenario.model_validate(
        {
            "name": "t",
            "replications": 4,
            "imaging": {
                "modality_demand": {"MR": 2.0},
                "opening_hours": {"MR": {"open": 12, "close": 19}},
            },
            "beds": {"add_beds": -12},
        }
    )
    r = run_simulation(store, sc)
    mr = r["stations"]["MR"]
    assert mr["scenario_setup"]["open_hours"] == [12, 19]
    assert (
        mr["scenario"]["throughput_per_day"]["mean"]
        > 1.6 * mr["baseline"]["throughput_per_day"]["mean"]
    )
    assert mr["scenario"]["mean_wait_min"]["mean"] > 5 * mr["baseline"]["mean_wait_min"]["mean"]
    assert r["baseline_unserved"] == 0 and r["scenario_unserved"] >= 0
    beds = r["stations"]["beds"]
    assert beds["scenario_setup"]["servers"] == 4
    assert beds["scenario"]["utilization"]["mean"] > beds["baseline"]["utilization"]["mean"]
    assert beds["scenario"]["mean_wait_min"]["mean"] > beds["baseline"]["mean_wait_min"]["mean"]


@pytest.mark.parametrize(
    ("lam_per_h", "mean_min", "c"),
    [(2.0, 45.0, 2), (1.5, 30.0, 1)],
)
def test_mmc_mean_wait_matches_erlang_c(lam_per_h: float, mean_min: float, c: int) -> None:
    sc = Scenario.model_validate(
        {
            "name": "mmc",
            "replications": 6,
            "horizon_days": 150,
            "warmup_days": 5,
            "explicit": {
                "q": {
                    "arrival_rate_per_hour": lam_per_h,
                    "service_mean_min": mean_min,
                    "servers": c,
                }
            },
        }
    )
    r = run_simulation(None, sc)
    analytic = erlang_c_wait(lam_per_h / 60, mean_min, c)
    assert r["stations"]["q"]["analytic_mmc_wait_min"] == pytest.approx(analytic, abs=1e-3)
    assert r["baseline_wait_min"] == pytest.approx(analytic, rel=0.15)
    rho = lam_per_h * mean_min / 60 / c
    assert r["baseline_utilization"] == pytest.approx(rho, rel=0.05)
    assert r["baseline_throughput"] == pytest.approx(lam_per_h * 24, rel=0.05)


def test_erlang_c_known_values() -> None:
    # M/M/1: Wq = rho / (mu - lambda).
    assert erlang_c_wait(0.5, 1.0, 1) == pytest.approx(0.5 / (1 - 0.5))
    # M/M/2 with a = 1.5: C = 0.642857 (tables), Wq = C / (2 mu - lambda).
    assert erlang_c(2, 1.5) == pytest.approx(0.6428571, rel=1e-6)
    assert erlang_c_wait(2.0, 0.75, 2) == pytest.approx(0.6428571 / (2 / 0.75 - 2), rel=1e-6)
    assert math.isinf(erlang_c_wait(3.0, 1.0, 2))


def test_same_seed_same_result_other_seed_differs(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    sc, _, _ = load_scenario("add_ct_scanner")
    strip = ("wall_s", "events_per_s")
    a = {
        k: v for k, v in run_simulation(store, sc, replications=3, seed=5).items() if k not in strip
    }
    b = {
        k: v for k, v in run_simulation(store, sc, replications=3, seed=5).items() if k not in strip
    }
    c = {
        k: v for k, v in run_simulation(store, sc, replications=3, seed=6).items() if k not in strip
    }
    assert a == b
    assert a["baseline_throughput"] != c["baseline_throughput"]


def test_no_history_is_reported_not_failed(twin_home) -> None:  # type: ignore[no-untyped-def]
    sc, _, _ = load_scenario("add_ct_scanner")
    with Store.open(twin_home) as store:
        from twin_pipeline.twin.graph import ensure_graph_tables

        ensure_graph_tables(store)
        r = run_simulation(store, sc, replications=2)
    assert r["status"] == "no_history" and r["baseline_throughput"] is None


def test_summary_ci_and_chart(tmp_path, graph_store: tuple[Store, GraphReport]) -> None:  # type: ignore[no-untyped-def]
    s = summarize([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.ci_low < 2.0 < s.ci_high
    assert s.ci_high - 2.0 == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    store, _ = graph_store
    r = run_simulation(store, Scenario.model_validate({"name": "t", "replications": 2}))
    out = make_chart(r, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_t_quantile_matches_scipy() -> None:
    from scipy import stats

    for df in [*range(1, 121), 150, 250, 999, 5000]:
        for p in (0.6, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 1e-5):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    assert t_quantile(0.5, 7) == 0.0
    # The inverse of the CDF, also in the far tail and near the centre.
    for df, p in ((3, 0.999999), (12, 0.5001), (40, 0.8)):
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, rel=1e-12)
        assert t_cdf(-t_quantile(p, df), df) == pytest.approx(1 - p, rel=1e-9)
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)


def test_summaries_do_not_import_scipy_stats() -> None:
    """The simulation step's confidence intervals no longer pay for importing scipy.stats."""
    import subprocess
    import sys

    code = (
        "import sys; from twin_pipeline.twin.sim import summarize; "
        "s = summarize([1.0, 2.0, 4.0]); assert s.ci_high > s.mean; "
        "print('scipy.stats' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_modalities_in_a_scenario_are_reported(
    graph_store: tuple[Store, GraphReport],
) -> None:
    store, _ = graph_store
    sc = Scenario.model_validate(
        {
            "name": "t",
            "replications": 2,
            "domains": ["imaging"],
            "imaging": {"add_scanners": {"PET": 1, "CT": 1}},
        }
    )
    r = run_simulation(store, sc)
    assert any("imaging.add_scanners.PET" in n and "ignored" in n for n in r["notes"])
    assert not any(".CT:" in n for n in r["notes"])
    assert "beds" not in r["stations"]


def test_demand_shift_moves_arrivals_between_hours(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    from twin_pipeline.twin.simulate import plan

    sc = Scenario.model_validate(
        {
            "name": "t",
            "domains": ["imaging"],
            "imaging": {
                "opening_hours": {"MR": {"open": 7, "close": 22}},
                "shift_demand": [
                    {
                        "modality": "MR",
                        "fraction": 0.5,
                        "from_hours": {"open": 7, "close": 12},
                        "to_hours": {"open": 19, "close": 21},
                    }
                ],
            },
        }
    )
    h = fit_history(store, sc.fit, ["imaging"])
    base, what = plan(h, sc)
    b, w = base["MR"].params.rates, what["MR"].params.rates
    assert w.sum() == pytest.approx(b.sum())  # total demand unchanged
    assert w[:, 7:12].sum() == pytest.approx(b[:, 7:12].sum() / 2)
    assert w[:, 19:21].sum() == pytest.approx(b[:, 7:12].sum() / 2)
    assert b[:, 19:21].sum() == 0
    assert what["CT"].params.rates is base["CT"].params.rates  # other stations untouched
    r = run_simulation(store, sc, replications=3)
    mr = r["stations"]["MR"]
    assert mr["scenario"]["throughput_per_day"]["mean"] == pytest.approx(
        mr["baseline"]["throughput_per_day"]["mean"], rel=0.1
    )


@pytest.mark.parametrize("name", sorted(p.stem for p in SCENARIOS_DIR.glob("*.yaml")))
def test_every_shipped_scenario_runs(name: str, graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    sc, path, sha = load_scenario(name)
    r = run_simulation(store, sc, scenario_path=str(path), scenario_sha256=sha, replications=2)
    assert r["status"] == "ok" and r["scenario"] == name
    assert r["notes"] == [] or all("ignored" not in n for n in r["notes"]), r["notes"]
    if sc.explicit is None:
        assert r["baseline_error_pct"] < 10
    assert r["scenario_throughput"] > 0


def _arm_in(pid_dir: str, *args, **kwargs):  # type: ignore[no-untyped-def]
    """``_run_arm`` that leaves a file named after the process it ran in (module level: the
    pool pickles it by name)."""
    import os

    Path(pid_dir, str(os.getpid())).touch()
    return _RUN_ARM(*args, **kwargs)


_RUN_ARM = simulate_module._run_arm


def test_worker_processes_give_the_same_result(
    graph_store: tuple[Store, GraphReport], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Replications run in forked workers from PARALLEL_MIN_TASKS arms: every figure is the
    one a single process computes (each arm draws from its own seeded streams)."""
    import functools
    import os

    store, _ = graph_store
    sc, _, _ = load_scenario("add_ct_scanner")
    strip = ("wall_s", "events_per_s")
    results = {}
    for workers in ("1", "2"):
        pid_dir = tmp_path / workers
        pid_dir.mkdir()
        monkeypatch.setattr(simulate_module, "_run_arm", functools.partial(_arm_in, str(pid_dir)))
        monkeypatch.setenv("TWIN_SIM_WORKERS", workers)
        r = run_simulation(store, sc, replications=4, seed=11)
        results[workers] = {k: v for k, v in r.items() if k not in strip}
    assert results["1"] == results["2"]
    assert {p.name for p in (tmp_path / "1").iterdir()} == {str(os.getpid())}
    in_workers = {p.name for p in (tmp_path / "2").iterdir()}
    assert in_workers and str(os.getpid()) not in in_workers
    monkeypatch.delenv("TWIN_SIM_WORKERS")
    assert simulate_module._sim_workers(simulate_module.PARALLEL_MIN_TASKS - 1) == 1
