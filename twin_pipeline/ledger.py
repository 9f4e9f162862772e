"""The tamper-evident ledger: one hash-chained, append-only log for lineage and audit records.

Each entry's hash covers its sequence number, kind, run id, time, canonical JSON payload and the
previous entry's hash, so changing, deleting, inserting or reordering any entry breaks the chain
from that entry on. :func:`verify` names the first entry that does not verify.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb

from twin_pipeline.store import Store

GENESIS = "0" * 64
DDL = """
CREATE TABLE IF NOT EXISTS governance.ledger (
    seq BIGINT PRIMARY KEY,
    kind VARCHAR,          -- audit | prov | run | signature | ...
    run_id VARCHAR,
    created_at VARCHAR,    -- ISO-8601 UTC, part of the hash
    payload VARCHAR,       -- canonical JSON
    prev_hash VARCHAR,
    hash VARCHAR
)
"""


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def entry_hash(seq: int, kind: str, run_id: str, created_at: str, payload: str, prev: str) -> str:
    material = "\x1f".join([str(seq), kind, run_id, created_at, payload, prev])
    return hashlib.sha256(material.encode()).hexdigest()


def ensure(store: Store) -> None:
    store.con.execute(DDL)


def append(store: Store, kind: str, payload: Any, *, run_id: str | None = None) -> int:
    """Append one entry (inside the caller's transaction if there is one). Returns its seq."""
    return append_entry(store, kind, payload, run_id=run_id)[0]


def append_entry(
    store: Store, kind: str, payload: Any, *, run_id: str | None = None
) -> tuple[int, str]:
    """Append one entry; returns its ``(seq, hash)``, the new head of the chain.

    Outside a transaction the entry goes in as one autocommitted INSERT chained to the head this
    handle committed last, without looking the head up again: ``seq`` is the primary key, so if
    anyone else appended meanwhile the INSERT fails, the head is read from the table and the
    entry is chained again. Inside a caller's transaction (which may still roll back) the head
    is always read from the table and not remembered.
    """
    created = datetime.now(UTC).isoformat(timespec="microseconds")
    body = canonical_json(payload)
    rid = run_id or store.run_id
    cached = store._ledger_head
    if cached is not None and not store._tx_depth:
        seq, prev = cached[0] + 1, cached[1]
        h = entry_hash(seq, kind, rid, created, body, prev)
        try:
            store.con.execute(
                "INSERT INTO governance.ledger VALUES (?,?,?,?,?,?,?)",
                [seq, kind, rid, created, body, prev, h],
            )
        except duckdb.Error:
            store._ledger_head = None  # someone else appended (or the table went): look it up
        else:
            store._ledger_head = (seq, h)
            return seq, h
    ensure(store)
    outer = bool(store._tx_depth)
    with store.transaction() as con:
        # max/arg_max: one pass over two columns, several times cheaper than ORDER BY ... LIMIT 1
        last = con.execute("SELECT max(seq), arg_max(hash, seq) FROM governance.ledger").fetchone()
        seq, prev = (
            (int(last[0]) + 1, str(last[1])) if last and last[0] is not None else (1, GENESIS)
        )
        h = entry_hash(seq, kind, rid, created, body, prev)
        con.execute(
            "INSERT INTO governance.ledger VALUES (?,?,?,?,?,?,?)",
            [seq, kind, rid, created, body, prev, h],
        )
    store._ledger_head = None if outer else (seq, h)
    return seq, h


def head(store: Store) -> tuple[int, str]:
    """``(seq, hash)`` of the last committed entry (``(0, GENESIS)`` for an empty ledger)."""
    if store._ledger_head is not None and not store._tx_depth:
        nxt = store.con.execute(
            "SELECT count(*) FROM governance.ledger WHERE seq = ?", [store._ledger_head[0] + 1]
        ).fetchone()
        if not (nxt and nxt[0]):
            return store._ledger_head
    if not store.table_exists("governance.ledger"):
        return 0, GENESIS
    row = store.con.execute("SELECT max(seq), arg_max(hash, seq) FROM governance.ledger").fetchone()
    return (int(row[0]), str(row[1])) if row and row[0] is not None else (0, GENESIS)


@dataclass
class ChainReport:
    entries: int
    ok: bool
    first_bad_seq: int | None = None
    problem: str | None = None


def verify(store: Store) -> ChainReport:
    """Recompute the chain; report the first entry that was changed, removed, added or moved."""
    if not store.table_exists("governance.ledger"):
        return ChainReport(0, True)
    rows = store.con.execute(
        "SELECT seq, kind, run_id, created_at, payload, prev_hash, hash FROM governance.ledger "
        "ORDER BY rowid"
    ).fetchall()
    prev = GENESIS
    expected_seq = 1
    for seq, kind, rid, created, body, prev_hash, h in rows:
        if seq != expected_seq:
            return ChainReport(
                len(rows),
                False,
                seq,
                f"sequence gap or reorder: expected {expected_seq}, found {seq}",
            )
        if prev_hash != prev:
            return ChainReport(len(rows), False, seq, "previous-hash link broken")
        if entry_hash(seq, kind, rid, created, body, prev_hash) != h:
            return ChainReport(len(rows), False, seq, "entry content does not match its hash")
        prev = h
        expected_seq += 1
    return ChainReport(len(rows), True)
