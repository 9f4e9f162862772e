"""Worker processes forked from a pipeline step.

A step runs inside Dagster, which installs its own SIGTERM/SIGINT handlers (they raise
``DagsterExecutionInterruptedError``). Forked workers inherit them: when a pool is
terminated, a worker then raises inside ``multiprocessing``'s own code instead of exiting,
can die holding a queue lock, and the parent's ``join`` waits forever (seen on a 10k-patient
run). Every pool we start runs :func:`worker_init` first.
"""

from __future__ import annotations

import signal


def worker_init() -> None:
    """Default signal behaviour in a worker: SIGTERM ends it at once; Ctrl-C is the parent's
    to handle (it stops the pool)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
