"""Near real time: the landing sensor (new files only) and `twin watch` rounds."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from tests.telemetry.helpers import ingest, query
from twin_pipeline.defs.telemetry import landing_sensor
from twin_pipeline.harmonize import telemetry as T
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.watch import changed_files, landing_snapshot, selection_for, watch


def _reading(dev: str, minute: int) -> str:
    return (
        json.dumps(
            {
                "device_id": dev,
                "metric": "HR",
                "value": 70 + minute,
                "unit": "/min",
                "ts": f"2024-03-05T10:{minute:02d}:00Z",
            }
        )
        + "\n"
    )


def test_sensor_requests_runs_for_new_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    (landing / "telemetry" / "a.ndjson").write_text(_reading("d1", 0))
    monkeypatch.setenv("TWIN_LANDING", str(landing))
    first = landing_sensor(dg.build_sensor_context(cursor=None))
    assert isinstance(first, dg.SensorResult) and len(first.run_requests or []) == 1
    again = landing_sensor(dg.build_sensor_context(cursor=first.cursor))
    assert isinstance(again, dg.SkipReason)
    (landing / "telemetry" / "b.ndjson").write_text(_reading("d1", 1))
    second = landing_sensor(dg.build_sensor_context(cursor=first.cursor))
    assert isinstance(second, dg.SensorResult)
    assert second.run_requests[0].tags["twin/new_files"] == "1"  # type: ignore[index]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key  # type: ignore[index]
    assert first.run_requests[0].asset_selection is None  # type: ignore[index]  # catch-up
    keys = {k.to_user_string() for k in second.run_requests[0].asset_selection or []}  # type: ignore[index]
    assert {"raw/telemetry", "harmonized/telemetry_reading"} <= keys and "raw/fhir" not in keys
    cursor = json.loads(second.cursor or "{}")
    assert set(cursor) == {"telemetry/a.ndjson", "telemetry/b.ndjson"}
    assert all(len(v["sha256"]) == 64 for v in cursor.values())


def test_snapshot_detects_changed_content(tmp_path: Path) -> None:
    (tmp_path / "x.ndjson").write_text(_reading("d", 0))
    snap = landing_snapshot(tmp_path)
    assert changed_files(snap, landing_snapshot(tmp_path, snap)) == []
    (tmp_path / "x.ndjson").write_text(_reading("d", 1) + _reading("d", 2))
    assert changed_files(snap, landing_snapshot(tmp_path, snap)) == ["x.ndjson"]


def test_selection_follows_the_file_kind() -> None:
    tele = selection_for(["telemetry/new.ndjson"])
    assert {
        "raw/telemetry",
        "harmonized/telemetry_reading",
        "harmonized/telemetry_minute",
        "harmonized/device_gap",
    } <= set(tele)
    assert "raw/fhir" not in tele and "raw/dicom" not in tele
    assert not any(k.startswith(("deid/", "twin/")) for k in tele)
    full = selection_for(["telemetry/new.ndjson"], "all")
    assert set(tele) < set(full)
    pacs = selection_for(["pacs/1/2/3.dcm"])
    assert {"raw/dicom", "harmonized/imaging_series", "harmonized/imaging_instance"} <= set(pacs)
    assert selection_for(["notes.docx"]) == ["governance/unclaimed_files"]


@pytest.mark.slow
def test_watch_round_makes_new_file_queryable_without_rereading(
    twin_home: Settings, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    (landing / "telemetry" / "old.ndjson").write_text("".join(_reading("d1", m) for m in range(5)))
    ingest(twin_home, landing)
    with Store.open(twin_home) as store:
        T.harmonize_readings(store)
    known = landing_snapshot(landing)
    before = query(twin_home, "SELECT path, run_id, first_seen FROM governance.source_file")
    (landing / "telemetry" / "new.ndjson").write_text(_reading("d2", 7))
    rounds = watch(landing, twin_home, interval=0.1, max_rounds=1, known=known)
    assert len(rounds) == 1 and rounds[0].new_files == ["telemetry/new.ndjson"]
    assert "raw/telemetry" in rounds[0].selection
    assert query(
        twin_home, "SELECT count(*) FROM harmonized.telemetry_reading WHERE device_id = 'd2'"
    ) == [(1,)]
    # Only the new file was read: the old one keeps the registration of its first load.
    after = query(twin_home, "SELECT path, run_id, first_seen FROM governance.source_file")
    assert [r for r in after if r[0] == "telemetry/old.ndjson"] == before
    assert len(after) == 2
    (files,) = query(twin_home, "SELECT count(*) FROM governance.telemetry_state")
    assert files == (2,)


def test_twin_watch_cli_once_on_empty_landing(twin_home: Settings, tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "watch", str(tmp_path / "empty"), "--once"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "nothing new" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "watch", "--scope", "nope", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
