"""Access audit records and whole-store tamper verification.

Every access decision of the policy gateway is appended to the hash-chained ledger
(:mod:`twin_pipeline.ledger`) as an entry of kind ``audit``; :func:`verify_all` recomputes that
chain and checks every signed PROV bundle, naming the first record that does not verify. It backs
``twin audit verify``.

The store passed to :func:`record_access` must be writable. If the caller holds a transaction
that it is about to roll back (e.g. on a denied query), record the decision outside it, or the
audit entry is rolled back too. Outside a transaction, each entry is followed by a signed seal of
the ledger head (:func:`twin_pipeline.lineage.storage.seal`), so cutting entries off the end of
the log is detected too. The query gateway instead seals from a background thread at most every
half second and always when its session closes (:class:`twin_pipeline.lineage.storage.Sealer`):
only the entries of the last half second of a session killed before closing can be cut off
undetected; :func:`verify_all` counts entries after the sealed head as ``unsealed_entries``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twin_pipeline import ledger
from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.store import Store

AUDIT_KIND = "audit"
DECISIONS = frozenset({"allow", "deny"})


def audit(store: Store, event: dict[str, Any], *, seal: bool = True) -> int:
    """Append one audit event (any JSON-able mapping) to the ledger; returns its sequence.

    ``event`` should name at least ``user`` and ``action``; a UTC timestamp ``at`` is added if
    missing. ``seal=False`` leaves signing the new head to the caller (the gateway seals from a
    background thread and when it closes: :class:`twin_pipeline.lineage.storage.Sealer`).
    """
    body = dict(event)
    body.setdefault("at", datetime.now(UTC).isoformat(timespec="microseconds"))
    seq, head = ledger.append_entry(
        store, AUDIT_KIND, body, run_id=str(body.get("run_id") or store.run_id)
    )
    if seal and not store._tx_depth:  # committed: sign the new head so it cannot be cut off
        from twin_pipeline.lineage import storage

        storage.seal(store, head=(seq, head))
    return seq


def record_access(
    store: Store,
    *,
    user: str,
    role: str,
    sql: str,
    relations: Sequence[str] = (),
    rows: int | None = None,
    decision: str = "allow",
    reason: str | None = None,
    seal: bool = True,
    **extra: Any,
) -> int:
    """Record one query through the access gateway (allowed or denied) in the audit chain."""
    if decision not in DECISIONS:
        raise TwinPipelineError(f"audit decision must be one of {sorted(DECISIONS)}: {decision!r}")
    event: dict[str, Any] = {
        "action": "query",
        "user": user,
        "role": role,
        "sql": sql,
        "relations": sorted(set(relations)),
        "rows": rows,
        "decision": decision,
        "reason": reason,
    }
    event.update(extra)
    return audit(store, event, seal=seal)


def access_events(store: Store, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Audit events of kind ``audit``, oldest first, each with its ledger ``seq``."""
    import json

    if not store.table_exists("governance.ledger"):
        return []
    sql = "SELECT seq, created_at, payload FROM governance.ledger WHERE kind = ? ORDER BY seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    out = []
    for seq, created, payload in store.con.execute(sql, [AUDIT_KIND]).fetchall():
        doc = json.loads(payload)
        doc["seq"] = int(seq)
        doc.setdefault("at", created)
        out.append(doc)
    return out


@dataclass
class Problem:
    """One record that does not verify."""

    record: str  # e.g. "governance.ledger seq 17" or "governance.prov_bundle run 3f2a..."
    problem: str

    def __str__(self) -> str:
        return f"{self.record}: {self.problem}"


@dataclass
class VerifyReport:
    ledger_entries: int
    bundles: int
    problems: list[Problem] = field(default_factory=list)
    unsealed_entries: int = 0  # entries after the signed ledger head (not tampering)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "ledger_entries": self.ledger_entries,
            "bundles": self.bundles,
            "unsealed_entries": self.unsealed_entries,
            "first_bad": str(self.first_bad) if self.first_bad else None,
            "problems": [str(p) for p in self.problems],
        }


def verify_all(store: Store, *, tables: bool = False, deep: bool = False) -> VerifyReport:
    """Recompute the ledger hash chain and verify every signed PROV bundle.

    Problems are listed in order: the chain's first bad entry first, then bundle problems, then
    (with ``tables=True``) tables whose content no longer matches the version their last
    recorded materialization wrote (a change made outside the pipeline).
    """
    chain = ledger.verify(store)
    report = VerifyReport(ledger_entries=chain.entries, bundles=0)
    if not chain.ok:
        report.problems.append(
            Problem(f"governance.ledger seq {chain.first_bad_seq}", chain.problem or "bad entry")
        )
    from twin_pipeline.lineage import storage

    bundles, problems = storage.verify_bundles(store)
    report.bundles = bundles
    report.problems.extend(Problem(rec, msg) for rec, msg in problems)
    sealed = storage.sealed_seq(store)
    if sealed is not None and chain.entries:
        row = store.con.execute(
            "SELECT count(*) FROM governance.ledger WHERE seq > ?", [sealed]
        ).fetchone()
        report.unsealed_entries = int(row[0]) if row else 0
    if deep:
        report.problems.extend(bundle_drift(store))
    if tables:
        report.problems.extend(table_drift(store))
    return report


def bundle_drift(store: Store) -> list[Problem]:
    """Bundles whose PROV is not what the run's ledger activity records give (a fragment changed
    before the run was signed)."""
    from twin_pipeline.activity import activities
    from twin_pipeline.lineage import prov_build, storage

    out = []
    for b in storage.bundles(store):
        recs = activities(store, b.run_id)
        if not recs:
            continue
        stored = prov_build.canonical_records(prov_build.from_json(b.prov_json))
        rebuilt = prov_build.canonical_records(prov_build.build_document(recs))
        if stored != rebuilt:
            extra = rebuilt ^ stored
            out.append(
                Problem(
                    f"governance.prov_bundle run {b.run_id}",
                    f"PROV differs from the run's ledger activity records ({len(extra)} records)",
                )
            )
    return out


# Tables written by many stages between their recorded versions (not drift when they differ).
SHARED_TABLES = frozenset({"governance.quarantine", "governance.validation_result"})


def table_drift(store: Store) -> list[Problem]:
    """Tables whose current content hash differs from the last version recorded in the ledger."""
    from twin_pipeline.activity import activities

    last: dict[str, tuple[str, str]] = {}
    for rec in activities(store):
        for tv in rec.get("outputs") or []:
            last[str(tv["table"])] = (str(tv["content_hash"]), str(rec["activity_id"]))
    out = []
    for table, (recorded, activity_id) in sorted(last.items()):
        if table in SHARED_TABLES or not table.startswith(
            ("raw.", "harmonized.", "deid.", "twin.")
        ):
            continue
        if not store.table_exists(table):
            out.append(Problem(table, f"recorded by activity {activity_id} but missing"))
        elif store.content_hash(table, verify=True) != recorded:
            out.append(Problem(table, f"content changed since activity {activity_id} recorded it"))
    return out
