"""Work handed off the critical path (``procs.in_background``): done before the runner returns,
failures reported, never alive across a fork."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from twin_pipeline import procs


def test_outside_a_runner_the_work_is_done_at_once_and_raises() -> None:
    seen: list[str] = []
    procs.in_background("x", lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]
    with pytest.raises(ZeroDivisionError):
        procs.in_background("boom", lambda: 1 / 0)
    assert procs.wait_background() == []


def test_inside_a_runner_it_runs_in_a_thread_and_failures_are_reported() -> None:
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> None:
        started.set()
        release.wait(10)
        done.append(threading.current_thread().name)

    with procs.background_allowed():
        procs.in_background("slow", slow)
        procs.in_background("bad chart", lambda: 1 / 0)
        assert started.wait(10)
        assert done == []  # the caller went on while the work waits
    release.set()
    problems = procs.wait_background()
    assert done == ["twin-background: slow"]
    assert problems == ["bad chart failed (ZeroDivisionError: division by zero)"]
    assert procs.wait_background() == []  # each piece is reported once


def test_work_is_finished_before_a_fork() -> None:
    done: list[int] = []

    def slow() -> None:
        time.sleep(0.3)
        done.append(1)

    with procs.background_allowed():
        procs.in_background("slow", slow)
    procs.freeze_for_fork()
    try:
        assert done == [1]
    finally:
        procs.unfreeze_after_pool()


def test_a_chart_drawn_in_threads_is_a_png(tmp_path: Path) -> None:
    """make_chart uses no pyplot state: two charts drawn at once are both whole PNGs."""
    from twin_pipeline.twin.simulate import make_chart

    arm = {"mean": 3.0, "ci95": [2.0, 4.0]}
    station = {"domain": "imaging", "baseline": {}, "scenario": {}}
    for metric in ("throughput_per_day", "mean_wait_min", "utilization"):
        station["baseline"][metric] = station["scenario"][metric] = arm  # type: ignore[index]
    result = {"scenario": "s", "replications": 2, "seed": 1, "stations": {"CT": station}}
    with procs.background_allowed():
        for k in range(2):
            procs.in_background(f"chart {k}", make_chart, result, tmp_path / f"c{k}.png")
    assert procs.wait_background() == []
    for k in range(2):
        assert (tmp_path / f"c{k}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
