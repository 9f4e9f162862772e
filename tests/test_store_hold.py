"""A pipeline run keeps the store attached between its steps (``hold_between_steps``), and
lets go when another process waits for it, and at its end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import duckdb
import pytest

from twin_pipeline import store as store_module
from twin_pipeline.paths import Settings
from twin_pipeline.store import (
    _SHARED,
    Store,
    _someone_waiting,
    hold_between_steps,
    waiting_dir,
)


@pytest.fixture
def fresh(twin_home: Settings) -> Iterator[Settings]:
    _SHARED._evict_idle(keep=0)
    with Store.open(twin_home):  # made, then let go
        pass
    yield twin_home
    _SHARED._evict_idle(keep=0)


def test_kept_between_stores_while_held_and_let_go_at_the_end(fresh: Settings) -> None:
    path = fresh.store_path
    with Store.open(fresh):
        pass
    assert not _SHARED.attached(path)  # not held: detached when the last Store closes
    with hold_between_steps(fresh):
        with Store.open(fresh) as store:
            store.con.execute("CREATE TABLE raw.held_t AS SELECT 1 AS i")
        assert _SHARED.attached(path)
        with Store.open(fresh, read_only=True) as store:  # reuses the attachment
            assert store.row_count("raw.held_t") == 1
        assert _SHARED.attached(path)
    assert not _SHARED.attached(path)
    # Another DuckDB (another process, as far as the file lock goes) can open it now.
    con = duckdb.connect()
    try:
        from twin_pipeline.store import _attach, _keyring_store_key

        _attach(con, path, _keyring_store_key(fresh), True)
        assert con.execute("SELECT count(*) FROM twin.raw.held_t").fetchone() == (1,)
    finally:
        con.close()


def test_kept_read_only_attachment_is_reopened_for_a_writer(fresh: Settings) -> None:
    with hold_between_steps(fresh):
        with Store.open(fresh, read_only=True):
            pass
        with Store.open(fresh) as store:  # read-write: detached and attached again
            store.con.execute("CREATE TABLE raw.rw_t AS SELECT 2 AS i")
            assert store.row_count("raw.rw_t") == 1


def test_a_waiting_process_makes_the_run_let_go(fresh: Settings) -> None:
    path = fresh.store_path
    folder = waiting_dir(path)
    folder.mkdir(exist_ok=True)
    waiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with hold_between_steps(fresh):
            with Store.open(fresh):
                pass
            assert _SHARED.attached(path)
            marker = folder / f"{waiter.pid}-1"
            marker.touch()
            assert _someone_waiting(path)
            with Store.open(fresh):
                pass
            assert not _SHARED.attached(path)  # let go at the step boundary
            marker.unlink()
            with Store.open(fresh):
                pass
            assert _SHARED.attached(path)
    finally:
        waiter.kill()
        waiter.wait()


def test_a_dead_waiters_marker_is_removed_and_ignored(fresh: Settings) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = waiting_dir(fresh.store_path)
    folder.mkdir(exist_ok=True)
    stale = folder / f"{dead.pid}-7"
    stale.touch()
    assert not _someone_waiting(fresh.store_path)
    assert not stale.exists()


def test_what_a_step_read_does_not_stay_cached(
    fresh: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept attached, the buffer pool is trimmed when the last Store closes: a big table read by
    one step does not stay resident through the next ones (detaching used to drop it all)."""

    def used_mb(store: Store) -> float:
        row = store.con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()
        return float(row[0] or 0) / 2**20 if row else 0.0

    cap = 16
    monkeypatch.setattr(store_module, "HELD_CACHE_MB", cap)
    with hold_between_steps(fresh):
        with Store.open(fresh) as store:
            limit = store.con.execute("SELECT current_setting('memory_limit')").fetchone()
            store.con.execute(
                "CREATE TABLE raw.big AS SELECT i, md5(i::VARCHAR) AS s FROM range(3000000) t(i)"
            )
        with Store.open(fresh) as store:
            store.con.execute("SELECT sum(length(s)), max(s) FROM raw.big").fetchall()
            assert used_mb(store) > 2 * cap  # the table's blocks were read in
        with Store.open(fresh) as store:
            assert used_mb(store) <= cap + 4
            now = store.con.execute("SELECT current_setting('memory_limit')").fetchone()
            assert now == limit  # set back at once
