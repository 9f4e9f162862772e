"""The file-hash cache is saved in one statement, so a big landing folder fits a small budget."""

from __future__ import annotations

import pytest

from twin_pipeline.paths import Settings
from twin_pipeline.sources import StatCache
from twin_pipeline.store import _SHARED, Store


def test_twenty_thousand_files_saved_and_replaced_in_one_transaction(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One INSERT OR REPLACE per row (executemany) needed ~100 kB of DuckDB memory per file
    # inside one transaction: a 10k-patient hospital's 20k DICOM files ran out of 1 GB.
    monkeypatch.setenv("TWIN_MEMORY_LIMIT", "200MB")
    _SHARED._evict_idle(keep=0)
    cache = StatCache({})
    cache.fresh = {
        f"/landing/pacs/{i:08d}.dcm": (1000 + i, 10**18 + i, f"{i:064x}") for i in range(20_000)
    }
    with Store.open(twin_home) as store:
        with store.transaction():
            cache.save(store)
        assert not cache.fresh and len(cache.known) == 20_000
        cache.fresh = {f"/landing/pacs/{i:08d}.dcm": (7, 8, "f" * 64) for i in range(0, 20_000, 2)}
        with store.transaction():
            cache.save(store)
        loaded = StatCache.load(store)
    _SHARED._evict_idle(keep=0)
    assert len(loaded.known) == 20_000
    assert loaded.known["/landing/pacs/00000002.dcm"] == (7, 8, "f" * 64)
    assert loaded.known["/landing/pacs/00000003.dcm"] == (1003, 10**18 + 3, f"{3:064x}")
