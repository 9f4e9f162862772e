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
    ensure(store)
    with store.transaction() as con:
        # max/arg_max: one pass over two columns, several times cheaper than ORDER BY ... LIMIT 1
        last = con.execute("SELECT max(seq), arg_max(hash, seq) FROM governance.ledger").fetchone()
        seq, prev = (
            (int(last[0]) + 1, str(last[1])) if last and last[0] is not None else (1, GENESIS)
        )
        created = datetime.now(UTC).isoformat(timespec="microseconds")
        body = canonical_json(payload)
        rid = run_id or store.run_id
        h = entry_hash(seq, kind, rid, created, body, prev)
        con.execute(
            "INSERT INTO governance.ledger VALUES (?,?,?,?,?,?,?)",
            [seq, kind, rid, created, body, prev, h],
        )
    return seq


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
