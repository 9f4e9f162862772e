"""What ``twin run`` does around the steps, made cheaper without changing what it records:
one pooled connection per Dagster event-log shard (not an engine per event), and the end-of-run
status from the table versions the run recorded (not every table hashed again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from twin_pipeline.defs.runner import dagster_instance, run_pipeline, run_status, step_spans
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.procs import usable_cores
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow  # runs the whole pipeline: scheduled first (conftest)


def test_runs_recorded_through_pooled_connections_read_back_whole(
    twin_home: Settings, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "notes.docx").write_bytes(b"PK\x03\x04 not ours")
    first = run_pipeline(landing, twin_home, data_docs=False)
    second = run_pipeline(landing, twin_home, data_docs=False)
    assert first.success and second.success

    # Where each run's time went: its phases, Dagster's share between the steps' spans.
    for summary in (first, second):
        ph = summary.phases_s
        assert {"setup", "execute", "finalize", "compact", "between_steps"} <= set(ph)
        assert all(v >= 0 for v in ph.values())
        assert ph["execute"] == pytest.approx(summary.wall_s, abs=0.05)
        assert ph["between_steps"] == pytest.approx(
            ph["execute"] - sum(summary.steps_s.values()), abs=0.01
        )
        # and the CPU each governed step cost: asset steps only, never more than every core
        # busy for the whole run
        cpu = summary.steps_cpu_s
        assert len(cpu) > 20 and set(cpu) <= set(summary.steps_s)
        assert all(v >= 0 for v in cpu.values()) and "raw/fhir" in cpu
        assert sum(cpu.values()) <= summary.wall_s * usable_cores() + 2

    # A step's commit used to be checkpointed when the step let go of the store, leaving a row
    # group (and a 256 KB block) per step in the keyed governance tables. A run now keeps the
    # store between its steps and checkpoints once at its end: one row group per run (merged by
    # Store.compact once there are 32), so the store does not grow ~0.5 MB a step.
    with Store.open(twin_home, read_only=True) as store:
        for table in ("governance.ledger", "governance.prov_activity"):
            assert store.row_count(table) >= len(first.steps_s) + len(second.steps_s)
            assert store._row_groups(table) <= 2

    instance = dagster_instance(twin_home)
    assert "_connect" in vars(instance.event_log_storage)  # the pooled connect is installed
    instance.dispose()

    # A plain instance (what the Dagster UI opens) reads both runs completely.
    plain = dg.DagsterInstance.from_config(str(twin_home.dagster_home))
    try:
        for summary in (first, second):
            run = plain.get_run_by_id(summary.run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
            spans = step_spans(plain, summary.run_id)
            assert set(spans) == set(summary.steps_s) and len(spans) > 20
        mat = plain.get_latest_materialization_event(dg.AssetKey(["governance", "unclaimed_files"]))
        assert mat is not None and mat.run_id == second.run_id
    finally:
        plain.dispose()


def test_run_status_equals_a_full_status_after_runs(
    twin_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twin_pipeline.generate import generate_hospital

    landing = tmp_path / "landing"
    generate_hospital(landing, patients=6, seed=5)
    first = run_pipeline(landing, twin_home, data_docs=False)
    with Store.open(twin_home, read_only=True) as store:
        notes_hash = store.content_hash("deid.document_reference")
    second = run_pipeline(landing, twin_home, data_docs=False)  # raw unchanged: older versions
    assert first.success and second.success

    # The second run kept every released deid table: same inputs, policies, key and code.
    released = [k.split("/")[1] for k in second.steps_s if k.startswith("deid/")]
    for table in released:
        md = _metadata_by_run(twin_home, ["deid", table])
        if md[first.run_id]["status"].value != "written":  # withheld, or no input
            continue
        assert md[second.run_id]["reused"].value is True, table
        assert md[second.run_id]["reused_from_run"].value == first.run_id, table
        assert md[first.run_id]["reused"].value is False
    md = _metadata_by_run(twin_home, ["deid", "document_reference"])
    assert "texts_analyzed" not in md[second.run_id]  # nothing was de-identified again
    # So did the twin graph, reporting what it reported when it was built.
    graph = _metadata_by_run(twin_home, ["twin", "node"])
    assert graph[first.run_id]["reused"].value is False
    assert graph[second.run_id]["reused"].value is True
    nodes = graph[first.run_id]["nodes_by_type"].value
    assert isinstance(nodes, dict) and sum(nodes.values()) > 10
    assert graph[second.run_id]["nodes_by_type"].value == nodes
    sim = _metadata_by_run(twin_home, ["twin", "simulation_result"])
    assert sim[first.run_id]["reused"].value is False
    assert sim[second.run_id]["reused"].value is True
    assert sim[second.run_id]["sim_id"].value == sim[first.run_id]["sim_id"].value
    with Store.open(twin_home) as store:
        assert store.content_hash("deid.document_reference") == notes_hash
        full = store.status()
        assert second.status == full
        assert run_status(store) == full
        recorded = dict(
            store.con.execute("SELECT table_name, run_id FROM governance.table_version").fetchall()
        )
    # Both kinds were there: tables with this run's recorded version, and tables without one.
    assert recorded["harmonized.patient"] == second.run_id
    assert "governance.ledger" not in recorded and "governance.ledger" in full["tables"]

    # Without reuse, every note's redaction comes from the text cache: same table, no engine.
    monkeypatch.setenv("TWIN_REUSE", "0")
    again = run_pipeline(landing, twin_home, data_docs=False, selection=["deid/document_reference"])
    monkeypatch.delenv("TWIN_REUSE")
    md = _metadata_by_run(twin_home, ["deid", "document_reference"])
    analyzed = md[first.run_id]["texts_analyzed"].value
    assert isinstance(analyzed, int) and analyzed > 10
    assert md[first.run_id]["texts_cached"].value == 0
    assert md[again.run_id]["texts_cached"].value == analyzed
    assert md[again.run_id]["reused"].value is False
    # A chart that is gone is drawn again: the simulation runs again.
    charts = sorted(twin_home.reports_dir.glob("simulation-*.png"))
    assert len(charts) == 1
    charts[0].unlink()
    redo = run_pipeline(landing, twin_home, data_docs=False, selection=["twin/simulation_result"])
    assert redo.success and charts[0].is_file()
    sim = _metadata_by_run(twin_home, ["twin", "simulation_result"])
    assert sim[redo.run_id]["reused"].value is False
    assert sim[redo.run_id]["sim_id"].value == sim[first.run_id]["sim_id"].value

    # A new pseudonym key is a new result: the step runs again and the pseudonyms change.
    with Store.open(twin_home, read_only=True) as store:
        before = store.content_hash("deid.patient")
    KeyRing(twin_home.keys_dir).rotate("pseudonym")
    rotated = run_pipeline(landing, twin_home, data_docs=False, selection=["deid/patient"])
    assert (
        rotated.success
        and _metadata_by_run(twin_home, ["deid", "patient"])[rotated.run_id]["reused"].value
        is False
    )
    with Store.open(twin_home, read_only=True) as store:
        assert store.content_hash("deid.patient") != before

    # A run of a few steps (a watch round) reports the same full status, and hashes only the
    # tables no step records (governance's), not every table the run did not write.
    lane = ["raw/telemetry", "harmonized/telemetry_reading"]
    third = run_pipeline(landing, twin_home, data_docs=False, selection=lane)
    assert third.success and set(lane) <= set(third.steps_s) and len(third.steps_s) < 5
    hashed: list[str] = []
    real = Store.content_hash

    def spy(self: Store, table: str) -> str:
        hashed.append(table)
        return real(self, table)

    with Store.open(twin_home) as store:
        assert third.status == store.status()
        versioned = {
            t
            for (t,) in store.con.execute(
                "SELECT table_name FROM governance.table_version"
            ).fetchall()
        }
        monkeypatch.setattr(Store, "content_hash", spy)
        assert run_status(store) == third.status
    assert "deid.document_reference" in versioned and "governance.ledger" not in versioned
    assert sorted(hashed) == sorted(set(third.status["tables"]) - versioned)


def _metadata_by_run(home: Settings, key: list[str]) -> dict[str, Any]:
    """run id -> materialization metadata of asset ``key`` (its last 20 materializations)."""
    instance = dagster_instance(home)
    try:
        records = instance.fetch_materializations(dg.AssetKey(key), limit=20).records
        return {ev.run_id: ev.asset_materialization.metadata for ev in records}  # type: ignore[union-attr]
    finally:
        instance.dispose()


def test_building_the_cli_imports_no_heavy_library() -> None:
    """Every ``twin`` command builds the whole parser first: a sub-command's heavy imports
    (pydicom for ``generate``, Dagster for ``run``, GX, Presidio) belong in its handler, or
    ``twin status`` pays for all of them (it took 3.4 s when ``generate`` imported pydicom)."""
    import subprocess
    import sys

    heavy = ("pydicom", "dagster", "great_expectations", "presidio_analyzer", "spacy", "pandas")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from twin_pipeline.cli import build_parser; build_parser(); "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == ""
