"""Crash safety and concurrent use: SIGKILL mid-run, rerun, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twin_pipeline.generate import generate_hospital
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import waiting_dir

pytestmark = pytest.mark.slow(weight=4)  # the longest module (~4 min): scheduled first

DATA_SCHEMAS = ("raw.", "harmonized.", "deid.", "twin.")
# Simulation results are a history of what-if runs (one row per scenario and twin snapshot), not
# twin state; their reproducibility for a seed is tested in tests/twin.
HISTORY_TABLES = ("twin.simulation_run", "twin.simulation_metric")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "TWIN_HOME": str(home)}


def _run(home: Path, landing: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "run", "--landing", str(landing), "--json"],
        capture_output=True,
        text=True,
        env=_env(home),
        timeout=900,
        check=False,
    )


def _home_like(tmp_path: Path, ref_home: Path) -> Path:
    """A new TWIN_HOME with the reference run's keys (so pseudonyms match)."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(ref_home / "keys", home / "keys")
    return home


def _start_run(home: Path, landing: Path, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """``twin run`` started in the background (stdout dropped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "twin_pipeline", "run", "--landing", str(landing)],
        env=_env(home),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def _status(home: Path) -> dict[str, dict[str, object]]:
    """Every table hashed from its rows (``--verify``), not the versions steps recorded."""
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "status", "--json", "--verify"],
        capture_output=True,
        text=True,
        env=_env(home),
        check=True,
    )
    tables = json.loads(out.stdout)["tables"]
    return {
        k: v for k, v in tables.items() if k.startswith(DATA_SCHEMAS) and k not in HISTORY_TABLES
    }


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    landing = tmp_path_factory.mktemp("crash") / "landing"
    generate_hospital(landing, patients=15, seed=11, dirty_rate=0.05)
    return landing


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, hospital: Path) -> tuple[Path, float]:
    """An uninterrupted run; its keys are reused so pseudonyms match."""
    home = tmp_path_factory.mktemp("ref") / "home"
    KeyRing(Settings.from_env(home).ensure().keys_dir).init()
    t0 = time.perf_counter()
    out = _run(home, hospital)
    assert out.returncode == 0, out.stderr[-3000:]
    return home, time.perf_counter() - t0


def test_sigkill_at_several_points_then_rerun_matches(
    tmp_path: Path, hospital: Path, reference: tuple[Path, float]
) -> None:
    ref_home, duration = reference
    home = _home_like(tmp_path, ref_home)
    for fraction in (0.25, 0.5, 0.8):
        proc = _start_run(home, hospital, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = _run(home, hospital)
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = _status(home), _status(ref_home)
    assert set(got) == set(want)
    diffs = {t: (got[t], want[t]) for t in want if got[t] != want[t]}
    assert not diffs, diffs


def test_rerun_on_same_files_changes_nothing(hospital: Path, reference: tuple[Path, float]) -> None:
    home, _ = reference
    before = _status(home)
    out = _run(home, hospital)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _status(home) == before


def test_second_run_waits_or_fails_clearly_and_store_stays_whole(
    tmp_path: Path, hospital: Path, reference: tuple[Path, float]
) -> None:
    ref_home, _ = reference
    home = _home_like(tmp_path, ref_home)
    first = _start_run(home, hospital)
    time.sleep(1.5)
    second = _run(home, hospital)
    assert first.wait(timeout=900) == 0
    if second.returncode != 0:
        assert "another twin run is in progress" in second.stderr
    # a query during/after the run sees a consistent, complete state
    assert _status(home) == _status(ref_home)


def _run_progress(settings: Settings) -> tuple[int, bool]:
    """(steps finished, whether the job is over) of the one run in ``settings``' Dagster home,
    read from its event-log shard with SQLite read-only (opening a Dagster instance here could
    race the run's own, which creates the instance's databases)."""
    import sqlite3

    shards = [
        p for p in (settings.dagster_home / "history" / "runs").glob("*.db") if p.stem != "index"
    ]
    if not shards:
        return 0, False
    try:
        con = sqlite3.connect(f"file:{shards[0]}?mode=ro", uri=True, timeout=5)
        try:
            counts = dict(
                con.execute(
                    "SELECT dagster_event_type, count(*) FROM event_logs GROUP BY 1"
                ).fetchall()
            )
        finally:
            con.close()
    except sqlite3.Error:  # the shard is being made
        return 0, False
    over = any(counts.get(k) for k in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "RUN_SUCCESS"))
    return int(counts.get("STEP_SUCCESS", 0)), over


def test_a_reader_gets_in_during_a_run(
    tmp_path: Path, hospital: Path, reference: tuple[Path, float]
) -> None:
    """A run keeps the store between its steps, but a reader that waits for it gets in at the
    next step boundary, not at the end of the run."""
    ref_home, _ = reference
    home = _home_like(tmp_path, ref_home)
    run = _start_run(home, hospital)
    try:
        settings = Settings.from_env(home)
        store = settings.store_path
        deadline = time.monotonic() + 300
        while _run_progress(settings)[0] < 3:  # the run is into its steps, holding the store
            if run.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"run ended first: {run.communicate()[1][-3000:]}")
            time.sleep(0.1)
        out = subprocess.run(
            [sys.executable, "-m", "twin_pipeline", "status", "--json"],
            capture_output=True,
            text=True,
            env={**_env(home), "TWIN_LOCK_TIMEOUT": "600"},
            timeout=600,
            check=False,
        )
        steps, over = _run_progress(settings)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "tables" in json.loads(out.stdout)
        assert not over, f"the reader only got in after the run's steps had ended ({steps})"
    finally:
        _, err = run.communicate(timeout=900)
    assert run.returncode == 0, err[-3000:]
    assert not list(waiting_dir(store).glob("*"))  # nobody left waiting
