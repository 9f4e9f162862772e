"""Simulation runs go through Dagster: a materialization, an activity record that names the twin
snapshot and the scenario file, and a `twin simulate --json` document."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from twin_pipeline.activity import activities
from twin_pipeline.cli import main
from twin_pipeline.defs.runner import run_pipeline
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.twin import synthetic
from twin_pipeline.twin.scenario import SCENARIOS_DIR


def _twin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_pipeline", *args], capture_output=True, text=True, check=False
    )


def _twin_in_process(
    capsys: pytest.CaptureFixture[str], *args: str
) -> subprocess.CompletedProcess[str]:
    """The same CLI entry point, in this process (saves interpreter start-up per call)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def test_simulate_is_a_governed_materialization_with_lineage(
    twin_home: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(twin_home) as store, store.transaction():
        synthetic.create_hospital(store, 80, seed=2, days=28)
    landing = twin_home.home / "landing"
    landing.mkdir()
    monkeypatch.setenv("TWIN_AS_OF", "2024-01-10T12:00:00+00:00")
    graph = run_pipeline(
        landing, twin_home, selection=["twin/node", "twin/edge", "twin/state_scanner"]
    )
    assert graph.success, graph.failures
    with Store.open(twin_home, read_only=True) as store:
        day_rows = store.con.execute(
            "SELECT DISTINCT day, as_of FROM twin.twin.state_scanner"
        ).fetchall()
        studies = store.con.execute(
            "SELECT count(*) FROM harmonized.imaging_study WHERE CAST(started AS DATE) = DATE '2024-01-10'"
        ).fetchone()
        today = store.con.execute(
            "SELECT sum(studies_today) FROM twin.twin.state_scanner"
        ).fetchone()
    assert [str(r[0]) for r in day_rows] == ["2024-01-10"]
    assert studies is not None and today is not None and today[0] == studies[0] > 0

    out = _twin("simulate", "add_ct_scanner", "--json", "--replications", "3")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    for key in (
        "historical_throughput",
        "baseline_throughput",
        "baseline_error_pct",
        "scenario_throughput",
        "baseline_wait_min",
        "scenario_wait_min",
        "baseline_utilization",
        "scenario_utilization",
    ):
        assert doc[key] is not None, key
    assert doc["baseline_error_pct"] < 10
    assert "not clinical recommendations" in doc["notice"]
    assert doc["replications"] == 3
    assert doc["chart"] and Path(doc["chart"]).read_bytes()[:4] == b"\x89PNG"

    scenario = SCENARIOS_DIR / "add_ct_scanner.yaml"
    sha = hashlib.sha256(scenario.read_bytes()).hexdigest()
    with Store.open(twin_home, read_only=True) as store:
        recs = [a for a in activities(store) if a["asset_key"] == "twin/simulation_result"]
        assert len(recs) == 1
        rec = recs[0]
        assert rec["run_id"] == doc["run_id"]
        assert rec["params"]["scenario_sha256"] == sha
        assert rec["params"]["scenario_file"] == str(scenario.resolve())
        assert rec["params"]["sim_id"] == doc["sim_id"]
        assert {f["sha256"] for f in rec["source_files"]} == {sha}
        used = {v["table"]: v["content_hash"] for v in rec["input_versions"]}
        assert used == {
            "twin.node": store.content_hash("twin.node"),
            "twin.edge": store.content_hash("twin.edge"),
        }
        assert {v["table"] for v in rec["outputs"]} == {
            "twin.simulation_run",
            "twin.simulation_metric",
        }
        row = store.con.execute(
            "SELECT scenario_sha256, twin_snapshot FROM twin.twin.simulation_run WHERE sim_id = ?",
            [doc["sim_id"]],
        ).fetchone()
        assert row is not None and row[0] == sha and used["twin.node"] in row[1]

        # The signed PROV bundle of the run: the simulation activity used the scenario file
        # and the twin tables' versions.
        from prov import model as pm

        from twin_pipeline.lineage import prov_build, storage

        prov = storage.stored_document(store, doc["run_id"])
        act = prov_build.activity_id(rec)
        usages = {
            tuple(str(v) for _, v in r.formal_attributes)[:2]
            for r in prov.get_records(pm.ProvUsage)
        }
        assert (act, prov_build.file_id(sha)) in usages
        assert (act, prov_build.table_version_id("twin.node", used["twin.node"])) in usages
        assert (act, prov_build.table_version_id("twin.edge", used["twin.edge"])) in usages

    # Human-readable output says plainly what the figures are.
    text = _twin_in_process(capsys, "simulate", "mmc_check", "--replications", "2")
    assert text.returncode == 0, text.stderr
    assert "not clinical recommendations" in text.stdout
    assert "Erlang C wait" in text.stdout

    q = _twin_in_process(
        capsys,
        "graph",
        "query",
        "match",
        "Device -located_in-> Bed -part_of-> CareUnit{name~Intensive}",
        "--json",
    )
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["count"] == 6
    stats = _twin_in_process(capsys, "graph", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    counts = json.loads(stats.stdout)
    assert counts["nodes"]["Patient"] == 80 and counts["edges"]["Bed.part_of"] == 16
    nb = _twin_in_process(
        capsys, "graph", "query", "neighbours", "Bed/loc-icu-01", "--direction", "out", "--json"
    )
    assert nb.returncode == 0, nb.stderr
    assert [r["node_id"] for r in json.loads(nb.stdout)["rows"]] == ["CareUnit/loc-icu"]
    path = _twin_in_process(
        capsys, "graph", "query", "path", "Device/mon-00", "CareUnit/loc-icu", "--max-hops", "2"
    )
    assert path.returncode == 0, path.stderr
    assert "Device/mon-00 -located_in- Bed/loc-icu-01 -part_of- CareUnit/loc-icu" in path.stdout
    bad = _twin_in_process(capsys, "graph", "query", "match", "Device <-x-> Patient")
    assert bad.returncode == 2 and "exactly one direction" in bad.stderr


def test_simulate_bad_scenario_exits_2(twin_home: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Bad Name\n")
    out = _twin("simulate", str(bad))
    assert out.returncode == 2
    assert "twin: error:" in out.stderr and "bad.yaml" in out.stderr
