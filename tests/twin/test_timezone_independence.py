"""The same landing gives the same twin on any machine: the host's time zone changes nothing.

DuckDB takes each session's time zone from the process (``TZ``). Before store connections were
pinned to UTC, a run on a machine at UTC+14 wrote another ``twin.state_scanner`` (its as-of
day) and other ImagingStudy twins (series times, local DICOM times read as instants in the
host's zone) than the same run at UTC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from twin_pipeline.generate import generate_hospital
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow  # two whole pipeline runs: scheduled first (conftest)

DATA_SCHEMAS = ("raw.", "harmonized.", "deid.", "twin.")
# Simulation results are a history of what-if runs (their run ids and times differ run to run);
# their reproducibility for a seed is tested in tests/twin/test_simulation.py.
HISTORY_TABLES = ("twin.simulation_run", "twin.simulation_metric")


def _run(home: Path, landing: Path, tz: str) -> dict[str, dict[str, object]]:
    env = {**os.environ, "TWIN_HOME": str(home), "TZ": tz}
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "run", "--landing", str(landing), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    tables: dict[str, dict[str, object]] = json.loads(out.stdout)["status"]["tables"]
    return {
        t: v for t, v in tables.items() if t.startswith(DATA_SCHEMAS) and t not in HISTORY_TABLES
    }


def test_a_run_at_utc_plus_14_writes_what_a_run_at_utc_writes(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    generate_hospital(landing, patients=8, seed=11)
    utc, far = tmp_path / "utc", tmp_path / "kiritimati"
    KeyRing(Settings.from_env(utc).ensure().keys_dir).init()
    far.mkdir()
    shutil.copytree(utc / "keys", far / "keys")  # the same keys: the same pseudonyms

    at_utc = _run(utc, landing, "UTC")
    at_far = _run(far, landing, "Pacific/Kiritimati")  # UTC+14: another calendar day
    assert len(at_utc) > 40 and "twin.state_scanner" in at_utc
    assert {t for t in at_utc if at_utc[t] != at_far.get(t)} == set()
    assert set(at_far) == set(at_utc)

    # A series' DICOM time is the scanner's local time: less its TimezoneOffsetFromUTC it is
    # the instant the EHR gives the study (the generated first series starts the study).
    with Store.open(Settings.from_env(far), read_only=True) as store:
        rows = store.con.execute(
            "SELECT props->>'started', props->>'series_first', props->>'series_last', "
            "props->>'timezone_offset' FROM twin.twin.node WHERE twin_type = 'ImagingStudy'"
        ).fetchall()
    assert rows and all(r[3] == "-0500" for r in rows)
    for started, first, last, _ in rows:
        assert datetime.fromisoformat(first) == datetime.fromisoformat(started)
        assert datetime.fromisoformat(first) <= datetime.fromisoformat(last)
