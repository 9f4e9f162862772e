"""The Dagster code location loads, every asset is described, and the graph materializes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest

from twin_pipeline.definitions import ALL_JOB, defs
from twin_pipeline.paths import Settings

pytestmark = pytest.mark.slow  # runs the whole pipeline: scheduled first (conftest)


def test_definitions_resolve() -> None:
    job = defs.resolve_job_def(ALL_JOB)
    assert job is not None
    specs = list(defs.resolve_all_asset_specs())
    assert specs, "no assets defined"
    for spec in specs:
        assert spec.group_name, spec.key
        assert spec.description, spec.key
        assert spec.key.path[0] in {"raw", "harmonized", "deid", "governance", "twin"}, spec.key
    defs.resolve_all_job_defs()
    dg.Definitions.validate_loadable(defs)


def test_unclaimed_file_is_quarantined_not_ignored(twin_home: Settings, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "notes.docx").write_bytes(b"PK\x03\x04 not ours")
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "run", "--landing", str(landing), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)["status"]
    assert status["quarantine"]["by_table"]["raw.unclaimed"] == 1
    st = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(st.stdout)
    assert set(doc) >= {"tables", "quarantine"}
    for info in doc["tables"].values():
        assert isinstance(info["rows"], int)
        assert isinstance(info["hash"], str)


def test_second_run_while_locked_fails_clearly(twin_home: Settings, tmp_path: Path) -> None:
    from twin_pipeline.defs.runner import run_lock

    landing = tmp_path / "l"
    landing.mkdir()
    with run_lock(twin_home):
        out = subprocess.run(
            [sys.executable, "-m", "twin_pipeline", "run", "--landing", str(landing)],
            capture_output=True,
            text=True,
            check=False,
        )
    assert out.returncode == 2
    assert "another twin run is in progress" in out.stderr


def test_whole_graph_on_a_generated_hospital(
    twin_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole asset graph materializes; every twin table the demo reports has rows, and
    records in = records loaded + records quarantined for every landed file."""
    from twin_pipeline.defs import runner
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.generate import generate_hospital
    from twin_pipeline.harmonize.fhir import conservation
    from twin_pipeline.quality import docs
    from twin_pipeline.store import Store

    landing = tmp_path / "landing"
    generate_hospital(landing, patients=8, seed=3, dirty_rate=0.05)
    # The runner hears of every step that succeeds (as its event is stored), in order, and
    # starts the Data Docs renderer once, when the run reaches the twin stage.
    seen: list[str] = []
    prewarmed: list[list[str]] = []
    real_prewarm = docs.prewarm
    monkeypatch.setattr(docs, "prewarm", lambda: (prewarmed.append(list(seen)), real_prewarm())[-1])
    make = runner._docs_prewarmer

    def recording() -> Callable[[str], None]:
        inner = make()
        return lambda key: (seen.append(key), inner(key))[-1]

    monkeypatch.setattr(runner, "_docs_prewarmer", recording)
    summary = run_pipeline(landing, twin_home, ephemeral=True)
    assert summary.success, summary.failures
    assert sorted(seen) == sorted(summary.steps_s)
    assert summary.materializations["raw/fhir"]["workers"] >= 1  # the pool it chose
    assert len(prewarmed) == 1
    before = prewarmed[0]
    assert before[-1].startswith("twin/") and not any(k.startswith("twin/") for k in before[:-1])
    assert all(k in before for k in summary.steps_s if k.startswith("expectation_suites"))
    tables = summary.status["tables"]
    for name in (
        "harmonized.patient",
        "harmonized.encounter",
        "harmonized.observation",
        "harmonized.document_reference",
        "harmonized.imaging_study",
        "harmonized.imaging_series",
        "harmonized.imaging_instance",
        "harmonized.device",
        "harmonized.telemetry_reading",
        "deid.patient",
        "deid.document_reference",
        "twin.node",
    ):
        assert tables[name]["rows"] > 0, name
    assert summary.status["quarantine"]["total"] > 0  # the planted defects
    with Store.open(twin_home, read_only=True) as store:
        files = store.con.execute(
            "SELECT path, records_in, records_loaded, records_quarantined "
            "FROM governance.source_file"
        ).fetchall()
        assert len(files) > 10
        for path, n_in, loaded, quarantined in files:
            assert n_in == loaded + quarantined, path
        for row in conservation(store):
            assert row["balanced"], row
        # The run ends by rendering GX Data Docs of the checks it ran (outside the asset steps).
        from twin_pipeline.quality.docs import status

        assert status(store, twin_home.data_docs_dir) == "current"
    assert "patient" in (twin_home.data_docs_dir / "index.html").read_text()


def _ledger_rows(settings: Settings) -> int:
    from twin_pipeline.store import Store

    with Store.open(settings) as store:
        if not store.table_exists("governance.ledger"):
            return 0
        row = store.con.execute(
            "SELECT count(*) FROM governance.ledger WHERE kind = 'activity'"
        ).fetchone()
        return int(row[0]) if row else 0


def test_launch_checks_the_launching_user_not_the_resource(
    twin_home: Settings, tmp_path: Path
) -> None:
    """A run launched from the UI carries whatever tags the launcher gave it and the UI
    process's TWIN_USER: either naming a researcher stops the run at its first asset."""
    from twin_pipeline.defs.runner import _root_cause, run_pipeline

    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    (landing / "telemetry" / "m.ndjson").write_text(
        '{"device_id":"d1","metric":"MDC_ECG_HEART_RATE","value":70,"unit":"/min",'
        '"ts":"2024-01-01T00:00:00Z"}\n'
    )
    before = _ledger_rows(twin_home)
    # The run tags name a researcher although the resource config says engineer.
    job = defs.resolve_job_def(ALL_JOB)
    result = job.execute_in_process(
        run_config={
            "resources": {"twin": {"config": {"landing": str(landing), "user": "engineer"}}}
        },
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        asset_selection=[dg.AssetKey(["raw", "telemetry"])],
        tags={"twin/user": "researcher"},
    )
    assert not result.success
    errors = [
        _root_cause(ev.event_specific_data.error) for ev in result.all_events if ev.is_step_failure
    ]
    assert any("'researcher' (role researcher) may not launch pipeline runs" in e for e in errors)
    assert _ledger_rows(twin_home) == before

    # No tag: the resource's user (TWIN_USER of the UI process) is checked the same way.
    summary = run_pipeline(
        landing, twin_home, user="auditor", selection=["raw/telemetry"], ephemeral=True
    )
    assert not summary.success
    assert any("may not launch pipeline runs" in f for f in summary.failures)
    assert _ledger_rows(twin_home) == before

    # An engineer's run of the same selection goes through and is recorded as theirs.
    summary = run_pipeline(landing, twin_home, user="engineer", selection=["raw/telemetry"])
    assert summary.success, summary.failures
    from twin_pipeline.activity import activities
    from twin_pipeline.store import Store

    with Store.open(twin_home) as store:
        acts = activities(store, summary.run_id)
    assert acts
    assert {(a["user"], a["role"]) for a in acts} == {("engineer", "data_engineer")}


def test_raw_step_without_new_files_reuses_its_table_versions(
    twin_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw step that loads no new file leaves its tables as they were: the versions recorded
    by the run that wrote them are reused (no hashing again); a new file is hashed."""
    from twin_pipeline.activity import activities
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.store import Store

    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    line = '{{"device_id": "m1", "metric": "HR", "value": {v}, "unit": "/min", "ts": "{ts}"}}\n'
    (landing / "telemetry" / "a.ndjson").write_text(
        line.format(v=80, ts="2024-03-05T10:00:00Z") + line.format(v=81, ts="2024-03-05T10:00:01Z")
    )
    first = run_pipeline(landing, twin_home, selection=["raw/telemetry"], data_docs=False)
    assert first.success, first.failures

    hashed: list[str] = []
    real = Store.content_hash

    def counting(self: Store, qualified: str) -> str:
        hashed.append(qualified)
        return real(self, qualified)

    monkeypatch.setattr(Store, "content_hash", counting)
    second = run_pipeline(landing, twin_home, selection=["raw/telemetry"], data_docs=False)
    assert second.success, second.failures
    assert "raw.telemetry_reading" not in hashed
    with Store.open(twin_home) as store:
        (out1,) = [a["outputs"] for a in activities(store, first.run_id)]
        (out2,) = [a["outputs"] for a in activities(store, second.run_id)]
        assert out2 == out1  # same version, rows and hash, recorded again
        assert out1[0]["content_hash"] == real(store, "raw.telemetry_reading")

    (landing / "telemetry" / "b.ndjson").write_text(line.format(v=90, ts="2024-03-05T11:00:00Z"))
    third = run_pipeline(landing, twin_home, selection=["raw/telemetry"], data_docs=False)
    assert third.success, third.failures
    assert "raw.telemetry_reading" in hashed
    with Store.open(twin_home) as store:
        (out3,) = [a["outputs"] for a in activities(store, third.run_id)]
        assert out3[0]["rows"] == 3 and out3[0]["content_hash"] != out1[0]["content_hash"]


def test_the_docs_renderer_starts_once_at_the_twin_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from twin_pipeline.defs import runner
    from twin_pipeline.quality import docs

    calls: list[int] = []
    monkeypatch.setattr(docs, "prewarm", lambda: calls.append(1))
    on_step = runner._docs_prewarmer()
    for key in ("raw/fhir", "expectation_suites", "deid/patient"):
        on_step(key)
    assert calls == []
    for key in ("twin/node", "twin/edge", "twin/simulation_result"):
        on_step(key)
    assert calls == [1]
