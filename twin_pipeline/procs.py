"""Worker processes forked from a pipeline step.

A step runs inside Dagster, which installs its own SIGTERM/SIGINT handlers (they raise
``DagsterExecutionInterruptedError``). Forked workers inherit them: when a pool is
terminated, a worker then raises inside ``multiprocessing``'s own code instead of exiting,
can die holding a queue lock, and the parent's ``join`` waits forever (seen on a 10k-patient
run). Every pool we start runs :func:`worker_init` first.
"""

from __future__ import annotations

import gc
import os
import signal


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def worker_init() -> None:
    """Default signal behaviour in a worker: SIGTERM ends it at once; Ctrl-C is the parent's
    to handle (it stops the pool)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# While a pool of forked workers is alive, the parent's objects are moved to the collector's
# permanent generation (gc.freeze). Otherwise a worker's first full collection writes to the
# header of every object it inherited, and the kernel copies each page it touches: a worker
# forked from the 10k-patient run process (~1 GB of Python objects) then holds its own copy of
# most of them. Frozen, the inherited pages stay shared; the parent's collector leaves them
# alone too until the pool is gone (issue #11).
_FROZEN = 0


def freeze_for_fork() -> None:
    """Call right before forking workers; pair with :func:`unfreeze_after_pool`."""
    global _FROZEN
    _FROZEN += 1
    gc.freeze()


def unfreeze_after_pool() -> None:
    """Call once the pool's workers have exited: the parent's objects are collectable again
    (the last of nested pools unfreezes)."""
    global _FROZEN
    if _FROZEN <= 0:
        return
    _FROZEN -= 1
    if _FROZEN == 0:
        gc.unfreeze()
