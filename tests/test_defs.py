"""The Dagster code location loads, every asset is described, and the graph materializes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg

from twin_pipeline.definitions import ALL_JOB, defs
from twin_pipeline.paths import Settings


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
