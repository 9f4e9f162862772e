"""Ingest a landing folder through the readers (no Dagster) for telemetry and PACS tests."""

from __future__ import annotations

from pathlib import Path

from twin_pipeline.ingest import IngestResult, ingest_files
from twin_pipeline.paths import Settings
from twin_pipeline.sources import discover, load_readers
from twin_pipeline.store import Store


def ingest(settings: Settings, landing: Path) -> dict[str, IngestResult]:
    readers = load_readers()
    files, _ = discover(landing, readers)
    out = {}
    with Store.open(settings) as store:
        for kind in sorted({f.kind for f in files}):
            out[kind] = ingest_files(store, readers[kind], [f for f in files if f.kind == kind])
    return out


def query(settings: Settings, sql: str, params: list[object] | None = None) -> list[tuple]:
    with Store.open(settings) as store:
        return store.con.execute(sql, params or []).fetchall()
