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


# -- forked worker pools share the parent's pages ---------------------------------------------


def test_freeze_nests_and_unfreezes_once() -> None:
    import gc

    from twin_pipeline.procs import freeze_for_fork, unfreeze_after_pool

    assert gc.get_freeze_count() == 0
    freeze_for_fork()
    freeze_for_fork()
    assert gc.get_freeze_count() > 0
    unfreeze_after_pool()
    assert gc.get_freeze_count() > 0  # the outer pool still lives
    unfreeze_after_pool()
    assert gc.get_freeze_count() == 0
    unfreeze_after_pool()  # unpaired: no-op
    assert gc.get_freeze_count() == 0


def _private_after_collect() -> int:
    import gc

    gc.collect()  # a full collection in the worker: touches every object it may
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) // 1024
    return -1


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc only")
def test_fhir_pool_workers_do_not_copy_the_parents_objects() -> None:
    """~250 MB of parent objects: a worker's full collection used to copy every page holding
    one (each worker ended up with its own copy); frozen, they stay shared."""
    import gc

    from twin_pipeline.sources import fhir

    held = [{"k": str(i), "v": [i, i]} for i in range(1_000_000)]
    try:
        fhir._pool(2)
        assert gc.get_freeze_count() >= len(held)
        futures = [fhir._pool(2).submit(_private_after_collect) for _ in range(2)]
        private = [f.result() for f in futures]
    finally:
        fhir.shutdown_pool()
    assert gc.get_freeze_count() == 0
    assert all(0 <= p < 80 for p in private), private
    del held


def test_dicom_pool_frozen_while_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from twin_pipeline.sources import SourceFile
    from twin_pipeline.sources import dicom as D

    files = []
    for i in range(6):
        p = tmp_path / f"f{i}.dcm"
        p.write_bytes(b"not dicom" * 10)
        files.append(SourceFile(p, f"pacs/{p.name}", "dicom", "0" * 64, p.stat().st_size))
    monkeypatch.setenv("TWIN_DICOM_WORKERS", "2")
    monkeypatch.setattr(D, "POOL_MIN_FILES", 2)
    it = D.DicomReader()._iter_read(files)
    first = next(it)
    assert gc.get_freeze_count() > 0
    rest = list(it)
    assert len([first, *rest]) == len(files)
    assert gc.get_freeze_count() == 0


def test_text_pool_frozen_while_alive() -> None:
    import gc

    from twin_pipeline.deid.pool import TextPool
    from twin_pipeline.deid.text import NoteContext

    notes = [(f"Call 617-555-{i:04d}.", NoteContext(f"p{i}")) for i in range(8)]
    with TextPool(b"k" * 32, workers=2, use_ner=False) as pool:
        assert gc.get_freeze_count() > 0
        out = list(pool.map(notes, batch_size=4))
    assert gc.get_freeze_count() == 0
    assert len(out) == 8 and all("617-555-0" not in t for t in out)
    with pytest.raises(ValueError), TextPool(b"k" * 32, workers=2, use_ner=False) as pool:
        next(iter(pool.map(notes, batch_size=4)))
        raise ValueError("stop")
    assert gc.get_freeze_count() == 0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc only")
def test_release_gives_back_what_arrow_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's pool kept ~770 MB of freed insert batches by the end of raw/fhir at 10k."""
    import pyarrow as pa

    monkeypatch.delenv("TWIN_MALLOC_TRIM", raising=False)
    pa.default_memory_pool().release_unused()
    before = _anon_mb()
    tables = [pa.table({"s": pa.array([f"{i:08d}" * 16] * 20_000)}) for i in range(100)]
    assert _anon_mb() - before > 150
    del tables
    memory.release()
    assert _anon_mb() - before < 60


def test_arrow_batches_are_not_held_until_the_transaction_ends(twin_home: Settings) -> None:
    """A batch appended inside a long transaction is freed as soon as the caller drops it. A
    view registered and unregistered in the transaction would keep the batch (DuckDB versions
    its catalog) until COMMIT: the FHIR reader held ~680 MB that way at 10k patients."""
    import gc

    import pyarrow as pa

    from twin_pipeline.sources import fhir

    rows = 20_000
    with Store.open(twin_home) as store, store.transaction() as con:
        store.con.execute(fhir.DDL)
        con.execute("CREATE TABLE raw.t (a VARCHAR, b BIGINT)")
        gc.collect()
        before = pa.total_allocated_bytes()
        for i in range(5):
            batch = pa.table(
                {"a": pa.array([f"{i}-{j}-" + "x" * 200 for j in range(rows)]), "b": range(rows)}
            )
            assert batch.nbytes > 4_000_000
            store.insert_arrow("raw.t", batch)
            del batch
        # the FHIR reader's own insert path
        fhir._insert(
            store,
            [
                (
                    f"lk{j}",
                    "f.ndjson",
                    f"line:{j}",
                    j,
                    "h",
                    "Patient",
                    f"p{j}",
                    "1",
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    '{"resourceType": "Patient", "x": "' + "y" * 300 + '"}',
                )
                for j in range(rows)
            ],
        )
        gc.collect()
        held = pa.total_allocated_bytes() - before
        assert held < 1_000_000, f"{held / 2**20:.1f} MB of Arrow batches still alive"
        assert store.row_count("raw.t") == 5 * rows
        assert store.row_count(fhir.RAW_TABLE) == rows


def test_execute_over_works_without_replacement_scans() -> None:
    """The query gateway's connections have external access off, which turns off DuckDB's
    replacement scans: the batch is registered there instead."""
    import duckdb
    import pyarrow as pa

    from twin_pipeline.store import BATCH, execute_over

    con = duckdb.connect(config={"enable_external_access": False})
    con.execute("CREATE TABLE t (a INTEGER)")
    execute_over(con, f"INSERT INTO t SELECT a FROM {BATCH}", pa.table({"a": [1, 2, 3]}))
    assert con.execute("SELECT sum(a) FROM t").fetchone() == (6,)
    with pytest.raises(duckdb.CatalogException, match="nowhere"):
        execute_over(con, f"INSERT INTO nowhere SELECT a FROM {BATCH}", pa.table({"a": [1]}))
