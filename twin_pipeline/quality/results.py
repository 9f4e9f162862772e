"""``governance.validation_result``: one row per expectation per suite run, and the report.

Each row also keeps the Great Expectations configuration of its expectation (type, kwargs as
evaluated, meta), so Data Docs can be rendered from the store, by GX, for any run, later and
in another process than the one that validated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from twin_pipeline.store import Store

TABLE = "governance.validation_result"
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    run_id VARCHAR,
    suite VARCHAR,
    table_name VARCHAR,
    expectation VARCHAR,
    expectation_type VARCHAR,
    severity VARCHAR,            -- error | warning
    row_level BOOLEAN,
    passed BOOLEAN,              -- as evaluated, before quarantine
    evaluated_rows BIGINT,
    failed_rows BIGINT,          -- failing rows (table-level checks: failing items)
    quarantined_rows BIGINT,     -- rows moved to governance.quarantine (stage quality)
    action VARCHAR,              -- none | quarantined | would_quarantine | recorded | blocked
    observed VARCHAR,
    created_at TIMESTAMPTZ,
    gx_config VARCHAR,           -- GX expectation as JSON: type, kwargs, meta; NULL for twin.*
    error VARCHAR                -- why the expectation could not be evaluated, if it could not
)
"""
#: Columns added after the first release, for stores created before them.
_ADDED = (("gx_config", "VARCHAR"), ("error", "VARCHAR"))
_COLUMNS = (
    "run_id",
    "suite",
    "table_name",
    "expectation",
    "expectation_type",
    "severity",
    "row_level",
    "passed",
    "evaluated_rows",
    "failed_rows",
    "quarantined_rows",
    "action",
    "observed",
    "created_at",
    "gx_config",
    "error",
)


@dataclass
class ExpectationResult:
    suite: str
    table_name: str
    expectation: str
    expectation_type: str
    severity: str
    row_level: bool
    passed: bool
    evaluated_rows: int
    failed_rows: int
    quarantined_rows: int
    action: str
    observed: str | None
    gx_config: dict[str, Any] | None = None
    error: str | None = None

    @property
    def blocking(self) -> bool:
        """A failure that quarantine did not resolve and that must stop downstream assets."""
        return self.action == "blocked"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure(store: Store) -> None:
    store.con.execute(DDL)
    have = {c for c, _ in store.columns(TABLE)}
    for column, dtype in _ADDED:
        if column not in have:  # a store from before the column existed
            store.con.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} {dtype}")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    raise TypeError(f"cannot store {type(value).__name__} in gx_config")


def _json_hook(obj: dict[str, Any]) -> Any:
    if set(obj) == {"$datetime"}:
        return datetime.fromisoformat(obj["$datetime"])
    return obj


def encode_config(config: dict[str, Any] | None) -> str | None:
    """The GX configuration as JSON (datetimes tagged, so they come back as datetimes)."""
    return None if config is None else json.dumps(config, default=_json_default, sort_keys=True)


def decode_config(text: str | None) -> dict[str, Any] | None:
    return None if text is None else dict(json.loads(text, object_hook=_json_hook))


def write(store: Store, run_id: str, results: Sequence[ExpectationResult]) -> None:
    """Record a suite run (replacing an earlier record of the same run and suite)."""
    ensure(store)
    if not results:
        return
    now = datetime.now(UTC)
    with store.transaction():
        store.con.execute(
            f"DELETE FROM {TABLE} WHERE run_id = ? AND suite = ?", [run_id, results[0].suite]
        )
        rows = [
            (
                run_id,
                r.suite,
                r.table_name,
                r.expectation,
                r.expectation_type,
                r.severity,
                r.row_level,
                r.passed,
                r.evaluated_rows,
                r.failed_rows,
                r.quarantined_rows,
                r.action,
                r.observed,
                now,
                encode_config(r.gx_config),
                r.error,
            )
            for r in results
        ]
        store.insert_values(TABLE, rows, columns=_COLUMNS)


def latest(store: Store) -> list[dict[str, Any]]:
    """The latest run of every suite, one dict per expectation (suite, expectation order)."""
    if not store.table_exists(TABLE):
        return []
    names = {c for c, _ in store.columns(TABLE)}
    select = ", ".join(f"v.{c}" if c in names else f"NULL AS {c}" for c in _COLUMNS)
    rows = store.con.execute(
        f"""
        WITH last AS (
            SELECT suite, arg_max(run_id, created_at) AS run_id FROM {TABLE} GROUP BY suite
        )
        SELECT {select}
        FROM {TABLE} v JOIN last USING (suite, run_id)
        ORDER BY v.suite, v.rowid
        """
    ).fetchall()
    return [dict(zip(_COLUMNS, r, strict=True)) for r in rows]


def report_json(store: Store) -> dict[str, Any]:
    """``twin quality report --json``: ``{"checks": [{suite, expectation, severity, passed,
    failed_rows}, ...]}`` plus the run ids and quarantine totals for context."""
    rows = latest(store)
    return {
        "checks": [
            {
                "suite": r["suite"],
                "expectation": r["expectation"],
                "severity": r["severity"],
                "passed": bool(r["passed"]),
                "failed_rows": int(r["failed_rows"]),
                "quarantined_rows": int(r["quarantined_rows"]),
                "action": r["action"],
                "run_id": r["run_id"],
            }
            for r in rows
        ]
    }
