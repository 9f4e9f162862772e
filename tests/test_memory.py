"""Memory given back between pipeline steps (issue #11): DuckDB's allocator purges what a query
freed, glibc's heap is trimmed after each governed step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline import memory
from twin_pipeline.paths import Settings
from twin_pipeline.store import _SHARED, Store


def _anon_mb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no Anonymous line in smaps_rollup")


class _Recorder:
    def __init__(self) -> None:
        self.sql: list[str] = []

    def execute(self, sql: str, *args: Any) -> None:
        self.sql.append(sql)


def test_store_connection_turns_on_duckdb_background_purge(twin_home: Settings) -> None:
    _SHARED._evict_idle(keep=0)  # the shared connection is configured when it is made
    for private in (False, True):
        with Store.open(twin_home, private=private) as store:
            row = store.con.execute(
                "SELECT current_setting('allocator_background_threads')"
            ).fetchone()
            assert row is not None and row[0] is True
    _SHARED._evict_idle(keep=0)


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_duckdb_purge_env(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    if value is None:
        monkeypatch.delenv("TWIN_DUCKDB_PURGE", raising=False)
    else:
        monkeypatch.setenv("TWIN_DUCKDB_PURGE", value)
    rec = _Recorder()
    memory.configure_duckdb(rec)
    assert rec.sql == (["SET allocator_background_threads = true"] if on else [])


def test_release_trims_glibc_heap_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TWIN_MALLOC_TRIM", raising=False)
    assert memory.release() is (memory._libc() is not None)
    monkeypatch.setenv("TWIN_MALLOC_TRIM", "0")
    assert memory.release() is False


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc only")
def test_memory_a_query_freed_goes_back_to_the_os(twin_home: Settings) -> None:
    """~400 MB built and dropped inside the store: the process's anonymous memory comes back
    down once the store is released (it stayed up, ~850 MB after raw/fhir at 10k patients,
    before the purge was turned on)."""
    _SHARED._evict_idle(keep=0)
    before = _anon_mb()
    with Store.open(twin_home) as store:
        store.con.execute(
            "CREATE TEMP TABLE big AS SELECT repeat(md5(i::VARCHAR), 12) AS s FROM range(1000000) t(i)"
        )
        peak = _anon_mb()
        store.con.execute("DROP TABLE big")
    assert peak - before > 200  # the table really was resident
    deadline = time.monotonic() + 30  # the purge thread works on jemalloc's decay clock
    while _anon_mb() - before > 100 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _anon_mb() - before <= 100
    _SHARED._evict_idle(keep=0)
