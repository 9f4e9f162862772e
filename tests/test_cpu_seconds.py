"""CPU accounting: what a step costs, its threads and the workers it waited for included."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from twin_pipeline.procs import cpu_seconds


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_counts_threads_and_waited_for_workers() -> None:
    c0 = cpu_seconds()
    th = threading.Thread(target=_burn, args=(0.3,))
    th.start()
    th.join()
    after_thread = cpu_seconds()
    assert after_thread - c0 >= 0.25  # a thread's CPU is the process's

    proc = mp.get_context("fork").Process(target=_burn, args=(0.4,))
    proc.start()
    while proc.is_alive():  # a worker still running is not counted yet
        time.sleep(0.01)
    proc.join()  # waited for: its CPU is now the caller's children's
    assert cpu_seconds() - after_thread >= 0.35


def test_an_idle_wait_costs_nothing() -> None:
    c0 = cpu_seconds()
    time.sleep(0.3)
    assert cpu_seconds() - c0 < 0.1
