"""Free text over worker processes: :class:`TextPool` runs the engine's batches in parallel.

Each forked worker loads the engine once (or inherits it from the parent). How batches are
scheduled does not change what the engine writes (a test holds the output byte-identical to
one process), so this module is not part of the engine's fingerprint
(:func:`twin_pipeline.deid.structured.engine_fingerprint`): changing it keeps the redactions
cached in ``governance.deid_text_cache``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from twin_pipeline.deid.text import (
    MODEL,
    NoteContext,
    TextEngine,
    _batches,
    deidentify_batches,
    engine,
)

_log = logging.getLogger(__name__)


_WORKER: dict[str, Any] = {}


def _init_worker(key: bytes, staff: tuple[str, ...], model: str, use_ner: bool) -> None:
    from twin_pipeline.procs import worker_init

    worker_init()
    eng = engine(model, use_ner)
    eng.set_staff(staff)
    _WORKER["engine"] = eng
    _WORKER["key"] = key


def _work(batch: list[tuple[str, NoteContext]]) -> list[str]:
    eng: TextEngine = _WORKER["engine"]
    texts = [t for t, _ in batch]
    ctxs = [c for _, c in batch]
    return eng.deidentify_batch(texts, ctxs, _WORKER["key"])


class TextPool:
    """Worker processes that each load the engine once; ``map`` keeps input order.

    Use as a context manager and reuse it for many batches (loading spaCy costs seconds).

    A ``ProcessPoolExecutor``, not ``multiprocessing.Pool``: a Pool whose worker is killed
    (the OOM killer, a stray SIGKILL) starts a replacement and waits for the lost batch
    forever, and a killed worker that held the task queue's lock stalls the replacements too.
    The executor notices the dead process and fails every pending batch with
    ``BrokenProcessPool``: :meth:`map` then either reports it as :class:`TextPoolError` or,
    with ``fallback``, de-identifies the lost batches and the rest in this process (the same
    batches through the same engine: the output is identical), as the DICOM reader does.
    """

    def __init__(
        self,
        key: bytes,
        *,
        workers: int = 2,
        staff: Sequence[str] = (),
        model: str = MODEL,
        use_ner: bool = True,
    ):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from twin_pipeline.procs import freeze_for_fork

        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        self.workers = workers
        self.fell_back = False  # a worker died and map went on in this process
        self._args = (key, tuple(staff), model, use_ner)
        freeze_for_fork()  # until close: the workers share the parent's pages (spaCy included)
        try:
            self._ex = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=self._args
            )
        except BaseException:
            _unfreeze()
            raise

    def map(
        self,
        items: Iterable[tuple[str, NoteContext]],
        batch_size: int = 64,
        *,
        fallback: bool = False,
    ) -> Iterator[str]:
        """De-identify ``items`` in order. At most two batches per worker are in flight, so a
        stream (``twin deid text --jsonl`` reading stdin) is read as it is processed. A worker
        that dies raises :class:`TextPoolError`, or with ``fallback`` the batches not yet
        returned are de-identified here."""
        from collections import deque
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        Batch = list[tuple[str, NoteContext]]
        window: deque[tuple[Batch, Future[list[str]]]] = deque()
        batches = _batches(items, batch_size)
        lost: list[Batch] = []
        ahead = 2 * self.workers
        try:
            for batch in batches:
                lost = [batch]  # until the pool holds it
                window.append((batch, self._ex.submit(_work, batch)))
                lost = []
                if len(window) >= ahead:
                    yield from window[0][1].result()
                    window.popleft()
            while window:
                yield from window[0][1].result()
                window.popleft()
            return
        except BrokenProcessPool as exc:
            if not fallback:
                raise TextPoolError(
                    "a de-identification worker process died (killed, or out of memory); "
                    "no output was written for its batch"
                ) from exc
            _log.warning(
                "a de-identification worker process died (%s); going on in this process", exc
            )
        finally:
            for _, fut in window:
                fut.cancel()
        self.fell_back = True
        key, staff, model, use_ner = self._args
        yield from deidentify_batches(
            itertools.chain((b for b, _ in window), lost, batches),
            key,
            staff=staff,
            model=model,
            use_ner=use_ner,
        )

    def close(self) -> None:
        try:
            self._ex.shutdown(wait=True)
        finally:
            _unfreeze()

    def __enter__(self) -> TextPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:  # done: let the workers finish and exit on their own
            self.close()
            return
        try:  # an error: drop the batches not started, wait for the ones running
            self._ex.shutdown(wait=True, cancel_futures=True)
        finally:
            _unfreeze()


class TextPoolError(RuntimeError):
    """A worker process of a :class:`TextPool` ended before its batch was done."""


def _unfreeze() -> None:
    from twin_pipeline.procs import unfreeze_after_pool

    unfreeze_after_pool()
