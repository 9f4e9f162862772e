"""A worker pool's processes end when the process that started them is killed (SIGKILL never
lets it shut its pools down): a killed `twin run` used to leave its Data Docs renderer and any
live step pool waiting forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = """
import os, sys, time, multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from twin_pipeline.procs import worker_init

if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "renderer":  # the Data Docs renderer, as twin run starts it
        from twin_pipeline.quality import docs
        pool = docs._renderer()
    else:
        pool = ProcessPoolExecutor(1, mp_context=mp.get_context(kind), initializer=worker_init)
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie (exited, not yet reaped by whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux /proc only")
@pytest.mark.parametrize("kind", ["fork", "spawn", "renderer"])
def test_workers_end_when_their_parent_is_killed(kind: str, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), kind], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert worker != parent.pid and not _gone(worker)
        time.sleep(1.5)
        assert not _gone(worker)  # alive while its parent is
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not _gone(worker):
        os.kill(worker, signal.SIGKILL)  # do not leave it behind either way
        pytest.fail(f"{kind} worker {worker} outlived its killed parent")
