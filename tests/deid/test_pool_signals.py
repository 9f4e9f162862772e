"""Worker pools end cleanly inside a Dagster step, whose SIGTERM handler raises.

Forked workers used to inherit that handler: terminating a pool made a worker raise inside
multiprocessing and die holding a queue lock, and the step's ``join`` hung for good (a
10k-patient run stopped there with every core idle)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import signal

    class Interrupted(Exception):
        pass

    def dagster_like(signum, frame):  # what dagster._utils.interrupts installs
        raise Interrupted()

    signal.signal(signal.SIGTERM, dagster_like)
    signal.signal(signal.SIGINT, dagster_like)

    from twin_pipeline.deid.text import NoteContext, TextPool

    key = b"k" * 32
    notes = [(f"Seen by Dr. Alan Smith on 03/04/2021, call 617-555-{i:04d}.", NoteContext(f"p{i}"))
             for i in range(40)]
    for round_ in range(3):
        with TextPool(key, workers=2, use_ner=False) as pool:  # normal end: close and join
            out = list(pool.map(notes, batch_size=8))
            got = [pool._pool.apply(signal.getsignal, (s,)) for s in (signal.SIGTERM, signal.SIGINT)]
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


def test_pools_end_cleanly_under_a_raising_sigterm_handler() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
