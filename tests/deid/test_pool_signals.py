"""Worker pools end cleanly inside a Dagster step, whose SIGTERM handler raises.

Forked workers used to inherit that handler: terminating a pool made a worker raise inside
multiprocessing and die holding a queue lock, and the step's ``join`` hung for good (a
10k-patient run stopped there with every core idle)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import faulthandler, signal, sys

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's hang report; forked
                                                              # workers inherit it

    class Interrupted(Exception):
        pass

    def dagster_like(signum, frame):  # what dagster._utils.interrupts installs
        raise Interrupted()

    signal.signal(signal.SIGTERM, dagster_like)
    signal.signal(signal.SIGINT, dagster_like)

    from twin_pipeline.deid.pool import TextPool
    from twin_pipeline.deid.text import NoteContext

    key = b"k" * 32
    notes = [(f"Seen by Dr. Alan Smith on 03/04/2021, call 617-555-{i:04d}.", NoteContext(f"p{i}"))
             for i in range(40)]
    for round_ in range(3):
        with TextPool(key, workers=2, use_ner=False) as pool:  # normal end: close and join
            out = list(pool.map(notes, batch_size=8))
            got = [pool._ex.submit(signal.getsignal, s).result() for s in (signal.SIGTERM, signal.SIGINT)]
            assert got == [signal.SIG_DFL, signal.SIG_IGN], got
        assert len(out) == 40 and all("617-555" not in t for t in out), out[:2]
        try:
            with TextPool(key, workers=2, use_ner=False) as pool:  # error: terminate and join
                next(iter(pool.map(notes, batch_size=8)))
                raise ValueError("stop")
        except ValueError:
            pass

    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    from twin_pipeline.procs import worker_init

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=worker_init) as ex:
        handlers = list(ex.map(signal.getsignal, [signal.SIGTERM, signal.SIGINT]))
    assert handlers == [signal.SIG_DFL, signal.SIG_IGN], handlers
    print("ok")
    """
)


def run_reporting_hangs(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a session of its own. Past ``timeout`` every process in it gets
    SIGUSR1 (the script registers faulthandler for it: each prints its threads' stacks), then
    SIGKILL, and the test fails with those stacks."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"hung past {timeout} s; stacks:\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_pools_end_cleanly_under_a_raising_sigterm_handler() -> None:
    out = run_reporting_hangs(SCRIPT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


KILLED = textwrap.dedent(
    """
    import faulthandler, json, os, signal, time

    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from twin_pipeline.deid import pool as pool_mod
    from twin_pipeline.deid.pool import TextPool, TextPoolError
    from twin_pipeline.deid.text import NoteContext, deidentify_stream

    real_work = pool_mod._work

    def work_or_die(batch):
        if batch[0][1].patient == "p8":  # the third batch: its worker is killed
            os.kill(os.getpid(), signal.SIGKILL)
        return real_work(batch)

    pool_mod._work = work_or_die  # the forked workers inherit the patched module
    key = b"k" * 32
    notes = [(f"Call 617-555-{i:04d} about Alan Smith.", NoteContext(f"p{i}")) for i in range(40)]
    got = []
    try:
        with TextPool(key, workers=2, use_ner=False) as pool:
            for out in pool.map(notes, batch_size=4):
                got.append(out)
    except TextPoolError as exc:
        print("error:", exc)
    print("outputs", len(got))
    alone = list(deidentify_stream(notes, key, workers=1, batch_size=4, use_ner=False))
    with TextPool(key, workers=2, use_ner=False) as pool:
        kept = list(pool.map(notes, batch_size=4, fallback=True))
        fell_back = pool.fell_back
    print(json.dumps({"fell_back": fell_back, "same": kept == alone, "n": len(kept),
                      "first": got == alone[: len(got)]}))
    """
)


def test_a_killed_worker_fails_the_map_instead_of_hanging() -> None:
    """multiprocessing.Pool waited forever for the batch of a worker the OOM killer took.
    Now ``map`` raises, or with ``fallback`` (the pipeline's way) finishes in this process
    with the output a single process gives."""
    out = run_reporting_hangs(KILLED, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("error: a de-identification worker process died"), lines
    assert lines[1] == "outputs 8", lines  # the two batches before the lost one, and no more
    res = json.loads(lines[2])
    assert res == {"fell_back": True, "same": True, "n": 40, "first": True}, res
    assert "going on in this process" in out.stderr
