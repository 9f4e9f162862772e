"""Worker processes forked from a pipeline step.

A step runs inside Dagster, which installs its own SIGTERM/SIGINT handlers (they raise
``DagsterExecutionInterruptedError``). Forked workers inherit them: when a pool is
terminated, a worker then raises inside ``multiprocessing``'s own code instead of exiting,
can die holding a queue lock, and the parent's ``join`` waits forever (seen on a 10k-patient
run). Every pool we start runs :func:`worker_init` first.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; the CPU count where there is none)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's child processes that have ended and been
    waited for (a pool's workers once the pool is shut down, and theirs in turn)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def cpu_seconds() -> float:
    """CPU seconds of this process, all its threads (DuckDB's included), plus
    :func:`children_cpu_seconds`."""
    return time.process_time() + children_cpu_seconds()


# How often a worker checks that the process that started it is still there (seconds).
PARENT_CHECK_S = 1.0


def worker_init() -> None:
    """Default signal behaviour in a worker: SIGTERM ends it at once; Ctrl-C is the parent's
    to handle (it stops the pool). And the worker ends when its parent is gone
    (:func:`exit_with_parent`)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()


def exit_with_parent() -> None:
    """End this worker process when the process that started it is gone.

    A pool worker waits on its task queue. Killed with SIGKILL (or by the OOM killer), the
    parent never shuts its pools down, and a forked worker also holds the queue's write end
    itself, so it never sees the queue close: it waited forever. Each killed `twin run` left
    its Data Docs renderer (~300 MB, Great Expectations imported) behind that way. A daemon
    thread checks the parent pid every :data:`PARENT_CHECK_S` seconds and ends the process
    once it has changed (the orphan was re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="twin-exit-with-parent", daemon=True).start()


# While a pool of forked workers is alive, the parent's objects are moved to the collector's
# permanent generation (gc.freeze). Otherwise a worker's first full collection writes to the
# header of every object it inherited, and the kernel copies each page it touches: a worker
# forked from the 10k-patient run process (~1 GB of Python objects) then holds its own copy of
# most of them. Frozen, the inherited pages stay shared; the parent's collector leaves them
# alone too until the pool is gone (issue #11).
_FROZEN = 0


def freeze_for_fork() -> None:
    """Call right before forking workers; pair with :func:`unfreeze_after_pool`. Background
    work (:func:`in_background`) is finished first: a thread running while the process forks
    may hold a lock the child then never sees released."""
    global _FROZEN
    _join_background()
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


# -- work off the critical path -------------------------------------------------------------
# A step may hand presentation work (a chart) to a thread of its own while the run goes on,
# inside the pipeline runner (run_pipeline), which waits for it before it returns and reports
# its failures. Anywhere else (a step run by the Dagster UI in a process of its own, a test
# calling the asset) the work is done there and then, and a failure is raised as before.
# The threads are not daemons: the process never exits before they are done.

_BACKGROUND: list[tuple[str, threading.Thread, list[BaseException]]] = []
_BG_LOCK = threading.Lock()
_BG_ALLOWED = 0


@contextlib.contextmanager
def background_allowed() -> Iterator[None]:
    """Within this block :func:`in_background` uses a thread (the runner waits for it)."""
    global _BG_ALLOWED
    _BG_ALLOWED += 1
    try:
        yield
    finally:
        _BG_ALLOWED -= 1


def in_background(what: str, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in a thread of its own when the caller's runner waits for it
    (:func:`background_allowed`), else now; ``what`` names it in a failure report."""
    if not _BG_ALLOWED:
        fn(*args)
        return
    errors: list[BaseException] = []

    def work() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # reported by wait_background
            errors.append(exc)

    th = threading.Thread(target=work, name=f"twin-background: {what}")
    with _BG_LOCK:
        _BACKGROUND.append((what, th, errors))
    th.start()


def _join_background() -> list[tuple[str, list[BaseException]]]:
    with _BG_LOCK:
        pending = list(_BACKGROUND)
        _BACKGROUND.clear()
    for _, th, _ in pending:
        th.join()
    return [(what, errors) for what, _, errors in pending]


def wait_background() -> list[str]:
    """Wait for all background work; one message per piece that failed."""
    return [
        f"{what} failed ({type(exc).__name__}: {exc})"
        for what, errors in _join_background()
        for exc in errors
    ]
