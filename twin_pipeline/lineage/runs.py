"""PROV written by the asset graph: one fragment per materialization, one signed bundle per run.

:func:`record_prov` is called by ``governed_run`` inside each asset's own transaction, right after
the activity record is appended to the ledger, so no table version is committed without its PROV
fragment (``governance.prov_activity``). :func:`finalize_run` is called when a run ends (by
``twin run``, and by a Dagster run-status sensor for runs launched from the UI): it merges the
run's fragments into one PROV document, signs and stores it (:mod:`.storage`), and emits the
run's OpenLineage events. Runs left open by a crash are closed by the next finalization.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import prov.model as pm

from twin_pipeline.activity import ActivityRecord, activities
from twin_pipeline.keys import KeyRing
from twin_pipeline.lineage import prov_build, storage
from twin_pipeline.store import Store

log = logging.getLogger(__name__)

DDL = """
CREATE TABLE IF NOT EXISTS governance.prov_activity (
    activity_id VARCHAR PRIMARY KEY,   -- the ActivityRecord id
    prov_id VARCHAR,                   -- its PROV identifier (twin:activity/...)
    run_id VARCHAR,
    asset_key VARCHAR,
    created_at VARCHAR,
    prov_json VARCHAR                  -- PROV-JSON fragment of this one materialization
)
"""


def ensure(store: Store) -> None:
    store.con.execute(DDL)


def record_prov(store: Store, record: ActivityRecord | Mapping[str, Any]) -> str:
    """Build and store the PROV fragment of one materialization (caller's transaction).

    Kept to what the activity itself knows, so the asset path makes one insert and no query;
    links between the run's activities (``wasInformedBy``) are added when the run is signed.
    """
    rec = record.to_dict() if isinstance(record, ActivityRecord) else dict(record)
    ensure(store)
    act = prov_build.activity_id(rec)
    store.con.execute(
        "INSERT INTO governance.prov_activity VALUES (?,?,?,?,?,?)",
        [
            rec["activity_id"],
            act,
            rec["run_id"],
            rec["asset_key"],
            datetime.now(UTC).isoformat(timespec="microseconds"),
            prov_build.fragment_json(rec),
        ],
    )
    return act


def run_json(store: Store, run_id: str) -> str:
    """The run's PROV-JSON: its fragments merged, plus the links between its activities."""
    parts: list[dict[str, Any]] = []
    if store.table_exists("governance.prov_activity"):
        parts = [
            json.loads(r[0])
            for r in store.con.execute(
                "SELECT prov_json FROM governance.prov_activity WHERE run_id = ? "
                "ORDER BY created_at",
                [run_id],
            ).fetchall()
        ]
    links = prov_build.communications(activities(store, run_id))
    merged = prov_build.merge_json([*parts, json.loads(prov_build.to_json(links))])
    if not parts:
        merged["prefix"].setdefault(prov_build.NS_PREFIX, prov_build.NS_URI)
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


def run_document(store: Store, run_id: str) -> pm.ProvDocument:
    """The run's PROV document (empty if nothing materialized)."""
    return prov_build.from_json(run_json(store, run_id))


def open_runs(store: Store) -> list[str]:
    """Runs with PROV fragments but no signed bundle (e.g. a crash before the run ended)."""
    if not store.table_exists("governance.prov_activity"):
        return []
    storage.ensure(store)
    rows = store.con.execute(
        "SELECT run_id, min(created_at) AS t FROM governance.prov_activity "
        "WHERE run_id NOT IN (SELECT run_id FROM governance.prov_bundle) GROUP BY run_id ORDER BY t"
    ).fetchall()
    return [str(r[0]) for r in rows]


@dataclass
class FinalizeResult:
    run_id: str
    sha256: str
    key_version: int
    activities: int
    closed_earlier: list[str] = field(default_factory=list)
    openlineage_events: int = 0


def finalize_run(
    store: Store,
    run_id: str,
    *,
    keyring: KeyRing | None = None,
    failures: Mapping[str, str] | None = None,
    emit_openlineage: bool = True,
) -> FinalizeResult:
    """Sign and store the run's PROV bundle (and close earlier open runs); emit OpenLineage."""
    keyring = keyring or KeyRing(store.settings.keys_dir)
    ensure(store)
    storage.ensure(store)
    earlier = [r for r in open_runs(store) if r != run_id]
    with store.transaction():
        for rid in earlier:
            storage.store_bundle(store, rid, run_json(store, rid), keyring)
        text = run_json(store, run_id)
        row = storage.store_bundle(store, run_id, text, keyring)
    if not store._tx_depth:  # only a committed head may be sealed
        storage.seal(store, keyring)
    n_acts = len(json.loads(text).get("activity") or {})
    events = 0
    if emit_openlineage:
        from twin_pipeline.lineage import openlineage

        # The signed bundle is the record; OpenLineage files are a courtesy export, so a full
        # disk here is logged, not allowed to fail a run that already committed.
        try:
            for rid in earlier:
                openlineage.emit_run(store, rid)
            events = openlineage.emit_run(store, run_id, failures=failures)
        except OSError as exc:
            log.warning("OpenLineage events of run %s not written: %s", run_id, exc)
            events = -1
    return FinalizeResult(run_id, row.sha256, row.key_version, n_acts, earlier, events)
