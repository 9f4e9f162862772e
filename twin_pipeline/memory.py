"""Giving memory back to the operating system between pipeline steps (issue #11).

A ``twin run`` is one long process whose steps each build something big and drop it. Freed
memory is not returned by itself:

* DuckDB allocates through its own statically linked jemalloc. Without jemalloc's background
  threads, pages freed by a query stay resident until later allocations happen to purge them:
  after the 10k-patient ``raw/fhir`` step the process kept ~850 MB although ``duckdb_memory()``
  reported ~4 MB in use (closing the connection gave them back). With the background threads
  on, jemalloc purges freed pages within a second or two, for a background thread's few CPU
  milliseconds. ``TWIN_DUCKDB_PURGE=0`` turns them off.
* glibc's ``malloc`` (Python's large objects, pydantic, spaCy) keeps freed memory at the top of
  its heaps and in arenas; ``malloc_trim(0)`` hands it back (~200 MB after ``raw/fhir``).
  :func:`release` runs it after each step (``TWIN_MALLOC_TRIM=0`` turns it off).
* pyarrow's default pool (mimalloc) keeps what Arrow tables freed: the FHIR reader's insert
  batches left ~770 MB there by the end of ``raw/fhir`` at 10k patients. :func:`release` also
  asks it to give unused memory back (same switch), and the FHIR reader calls it per chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any


def _enabled(var: str) -> bool:
    return os.environ.get(var, "1").strip().lower() not in ("0", "false", "no", "off")


def duckdb_purge() -> bool:
    """Whether store connections turn on DuckDB's allocator background threads."""
    return _enabled("TWIN_DUCKDB_PURGE")


def configure_duckdb(con: Any) -> None:
    """Per-connection part: jemalloc's background purge (a process-wide setting of DuckDB's
    allocator; setting it again is a no-op)."""
    if duckdb_purge():
        con.execute("SET allocator_background_threads = true")


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def release() -> bool:
    """Return free heap memory to the OS (pyarrow's pool if pyarrow is loaded, then glibc
    ``malloc_trim``); True if glibc's ran. Costs microseconds to a few milliseconds; a no-op
    with ``TWIN_MALLOC_TRIM=0``."""
    if not _enabled("TWIN_MALLOC_TRIM"):
        return False
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
