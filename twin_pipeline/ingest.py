"""Landing folder → raw tables, one transaction per source kind. No Dagster import."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from twin_pipeline.sources import (
    LoadStats,
    SourceFile,
    SourceReader,
    discover,
    load_readers,
    new_files,
    scan,
)
from twin_pipeline.store import QuarantineRow, Store


@dataclass
class IngestResult:
    kind: str
    files_seen: int
    files_new: int
    stats: LoadStats

    def metadata(self) -> dict[str, int]:
        return {
            "files_seen": self.files_seen,
            "files_new": self.files_new,
            "records_in": self.stats.records_in,
            "records_loaded": self.stats.loaded,
            "records_quarantined": self.stats.quarantined,
        }


def files_of_kind(landing: Path, kind: str) -> list[SourceFile]:
    readers = load_readers()
    files, _ = discover(landing, readers)
    return [f for f in files if f.kind == kind]


def ingest_files(store: Store, reader: SourceReader, files: Sequence[SourceFile]) -> IngestResult:
    """Load the files not yet registered; register them with their record counts. Atomic."""
    todo = new_files(store, files)
    with store.transaction():
        reader.ensure_tables(store)
        for table in reader.raw_tables:
            if todo and store.table_exists(table):
                # A changed file replaces what an earlier version of it loaded.
                store.con.execute(
                    f"DELETE FROM {table} WHERE list_contains(?, source_file)",
                    [[f.rel for f in todo]],
                )
        if todo:
            store.con.execute(
                "DELETE FROM governance.quarantine WHERE stage = 'read' "
                "AND list_contains(?, source_file)",
                [[f.rel for f in todo]],
            )
        stats = reader.load(todo, store) if todo else LoadStats(reader.kind)
        now = datetime.now(UTC)
        for f in todo:
            fs = stats.file(f.rel)
            store.con.execute(
                "INSERT OR REPLACE INTO governance.source_file VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    f.rel,
                    str(f.path),
                    f.kind,
                    f.sha256,
                    f.size,
                    fs.records_in,
                    fs.loaded,
                    fs.quarantined,
                    now,
                    store.run_id,
                ],
            )
    return IngestResult(reader.kind, len(files), len(todo), stats)


def quarantine_unclaimed(store: Store, landing: Path) -> int:
    """Files no reader claims, or that cannot be read, are quarantined whole with a reason,
    so nothing landed is silently ignored. Re-evaluated every run (a fixed file drops out)."""
    s = scan(landing, load_readers())
    rows = [
        QuarantineRow(
            stage="read",
            table_name="raw.unclaimed",
            source_kind="unknown",
            source_file=rel,
            position="file",
            rule="unknown_file_kind",
            reason=f"{rel}: no reader handles this kind of file",
            payload=json.dumps({"size": (landing / rel).stat().st_size}),
        )
        for rel in s.unclaimed
    ]
    rows += [
        QuarantineRow(
            stage="read",
            table_name="raw.unreadable",
            source_kind="unknown",
            source_file=rel,
            position="file",
            rule="unreadable_file",
            reason=f"{rel}: {why}",
        )
        for rel, why in s.unreadable.items()
    ]
    with store.transaction():
        store.con.execute(
            "DELETE FROM governance.quarantine WHERE rule IN ('unknown_file_kind', 'unreadable_file')"
        )
        store.quarantine(rows)
    return len(rows)
