"""What every asset run records about itself: the raw material of PROV lineage.

An :class:`ActivityRecord` names the run, the asset, who launched it, what it read (tables and
source files), what it wrote (table versions: rows and content hash), and the code, policy and
key versions in force. :func:`record_activity` appends it to the tamper-evident ledger in the
asset's own transaction, so nothing materializes without its record.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twin_pipeline import __version__, ledger
from twin_pipeline.paths import PROJECT_ROOT
from twin_pipeline.sources import sha256_file
from twin_pipeline.store import Store


@dataclass
class TableVersion:
    table: str
    rows: int
    content_hash: str


@dataclass
class ActivityRecord:
    activity_id: str
    run_id: str
    asset_key: str
    started_at: str
    ended_at: str
    user: str
    role: str
    inputs: list[str] = field(default_factory=list)  # tables read (schema.table)
    input_versions: list[TableVersion] = field(default_factory=list)
    outputs: list[TableVersion] = field(default_factory=list)
    source_files: list[dict[str, Any]] = field(default_factory=list)  # {path, sha256, size}
    params: dict[str, Any] = field(default_factory=dict)
    code_version: dict[str, str] = field(default_factory=dict)
    policy_versions: dict[str, str] = field(default_factory=dict)  # file -> sha256
    key_versions: dict[str, str] = field(default_factory=dict)  # kind -> "v1:<fingerprint>"
    informed_by: list[str] = field(default_factory=list)  # upstream asset keys of this run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def code_version() -> dict[str, str]:
    """The package version and git commit of the code doing the work."""
    commit = "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": f"twin-pipeline {__version__}", "git_commit": commit}


VERSION_DDL = """
CREATE TABLE IF NOT EXISTS governance.table_version (
    table_name VARCHAR PRIMARY KEY, row_count BIGINT, content_hash VARCHAR, run_id VARCHAR
)
"""


def recorded_versions(
    store: Store, tables: Collection[str] | None = None
) -> dict[str, tuple[int, str]]:
    """table -> (rows, content hash) last recorded in ``governance.table_version`` (of
    ``tables``, or of every table recorded)."""
    if not store.table_exists("governance.table_version"):
        return {}
    sql = "SELECT table_name, row_count, content_hash FROM governance.table_version"
    if tables is not None:
        sql += " WHERE list_contains(?, table_name)"
    return {
        str(r[0]): (int(r[1]), str(r[2]))
        for r in store.con.execute(sql, [] if tables is None else [list(tables)]).fetchall()
    }


def table_versions(
    store: Store, tables: Sequence[str], *, unchanged: Collection[str] = ()
) -> list[TableVersion]:
    """Compute the current version (rows, content hash) of tables an asset wrote, and remember
    it in ``governance.table_version`` (as this run's) so readers of these tables need not hash
    them again. Tables in ``unchanged`` (the asset left them as they were) take the version
    recorded by their last writer when the row count still matches, instead of a new hash."""
    known = recorded_versions(store, unchanged) if unchanged else {}
    out: list[TableVersion] = []
    for t in tables:
        if not store.table_exists(t):
            continue
        rows = store.row_count(t)
        prior = known.get(t)
        digest = prior[1] if prior and prior[0] == rows else store.content_hash(t)
        out.append(TableVersion(t, rows, digest))
    if out:
        store.con.execute(VERSION_DDL)
        # one row per table (the last version of a table named twice), in one statement
        latest = {tv.table: (tv.table, tv.rows, tv.content_hash, store.run_id) for tv in out}
        store.insert_values("governance.table_version", list(latest.values()), or_replace=True)
    return out


def input_versions(store: Store, tables: Sequence[str]) -> list[TableVersion]:
    """Versions of tables an asset reads: the version recorded when they were last written
    (checked against the row count), else computed."""
    known = recorded_versions(store, tables)
    out: list[TableVersion] = []
    for t in tables:
        if not store.table_exists(t):
            continue
        rows = store.row_count(t)
        if t in known and known[t][0] == rows:
            out.append(TableVersion(t, rows, known[t][1]))
        else:
            out.extend(table_versions(store, [t]))
    return out


def record_activity(store: Store, record: ActivityRecord) -> int:
    """Append the activity to the ledger (kind ``activity``) and its PROV fragment, atomically
    (in the caller's transaction if there is one). Policy and key versions in force are filled
    in when the caller left them empty. Returns the ledger sequence."""
    from twin_pipeline.lineage.runs import record_prov

    if not record.policy_versions:
        record.policy_versions = policy_versions()
    if not record.key_versions:
        record.key_versions = key_versions(store.settings.keys_dir)
    with store.transaction():
        seq = ledger.append(store, "activity", record.to_dict(), run_id=record.run_id)
        record_prov(store, record)
    return seq


def activities(store: Store, run_id: str | None = None) -> list[dict[str, Any]]:
    """Activity records from the ledger, oldest first (optionally one run's)."""
    import json

    if not store.table_exists("governance.ledger"):
        return []
    sql = "SELECT payload FROM governance.ledger WHERE kind = 'activity'"
    params: list[Any] = []
    if run_id:
        sql += " AND run_id = ?"
        params.append(run_id)
    rows = store.con.execute(sql + " ORDER BY seq", params).fetchall()
    out: list[dict[str, Any]] = [json.loads(r[0]) for r in rows]
    return out


def policy_versions(policies_dir: Any = None) -> dict[str, str]:
    """sha256 of every policy file in force (``policies/**.yaml|yml|json``), by relative path."""
    from pathlib import Path

    from twin_pipeline.paths import POLICIES_DIR

    root = Path(policies_dir or POLICIES_DIR)
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root.parent).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".yaml", ".yml", ".json"}
    }


def key_versions(keys_dir: Any) -> dict[str, str]:
    """Versions and fingerprints (never the keys) of the keys in force: ``kind -> "v1:<fp>"``."""
    from twin_pipeline.errors import KeyMaterialError
    from twin_pipeline.keys import KeyRing

    ring = KeyRing(keys_dir)
    out: dict[str, str] = {}
    for kind in ("pseudonym", "signing"):
        try:
            v = ring.version(kind)  # type: ignore[arg-type]
        except (KeyMaterialError, KeyError):
            continue
        out[kind] = f"v{v.version}:{v.fingerprint}"
    return out


def params_of(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if isinstance(v, str | int | float | bool)}
