"""Bypass attempts are denied with a message naming what was refused, and audited as denials.

Every role, admin included, gets every attempt in ``attacks.UNIVERSAL``; roles with a narrower
grant also get the reads outside it, reached directly or through CTEs, subqueries, unions,
joins, quoting, catalog prefixes and catalog views.
"""

from __future__ import annotations

import pytest

from twin_pipeline.errors import AccessDenied
from twin_pipeline.policy import Gateway, QueryDenied

from .attacks import IDENTIFIED_FOR_RESEARCHER, OUTSIDE_AUDITOR, UNIVERSAL
from .conftest import last_audit

USERS = {
    "engineer": "data_engineer",
    "auditor": "compliance_auditor",
    "researcher": "researcher",
    "admin": "admin",
}

CASES = [
    pytest.param(user, sql, want, id=f"{user}-{cid}")
    for user in USERS
    for cid, sql, want in UNIVERSAL
]
CASES += [
    pytest.param("researcher", sql, want, id=f"researcher-{cid}")
    for cid, sql, want in IDENTIFIED_FOR_RESEARCHER
]
CASES += [
    pytest.param("auditor", sql, want, id=f"auditor-{cid}") for cid, sql, want in OUTSIDE_AUDITOR
]


def test_at_least_forty_attempts_per_role() -> None:
    per_role = {u: sum(1 for c in CASES if c.values[0] == u) for u in USERS}
    assert min(per_role.values()) >= 40, per_role


@pytest.mark.parametrize(("user", "sql", "want"), CASES)
def test_denied_and_audited(gateway: Gateway, user: str, sql: str, want: str) -> None:
    before = last_audit(gateway)["seq"] if _has_audit(gateway) else 0
    with pytest.raises(QueryDenied) as info:
        gateway.query(user, sql)
    message = str(info.value)
    assert want.lower() in message.lower(), message
    entry = last_audit(gateway)
    assert entry["seq"] > before
    assert entry["decision"] == "deny"
    assert entry["user"] == user and entry["role"] == USERS[user]
    assert entry["sql"] == sql
    assert entry["rows"] == 0
    assert entry["reason"] == message


def _has_audit(gw: Gateway) -> bool:
    row = gw.store.con.execute(
        "SELECT count(*) FROM governance.ledger WHERE kind = 'audit'"
    ).fetchone()
    return bool(row and row[0])


def test_unknown_user_is_denied_and_audited(gateway: Gateway) -> None:
    with pytest.raises(AccessDenied, match="unknown user 'mallory'"):
        gateway.query("mallory", "SELECT 1")
    entry = last_audit(gateway)
    assert (entry["user"], entry["role"], entry["decision"]) == ("mallory", "unknown", "deny")


def test_the_connection_itself_cannot_escape(gateway: Gateway) -> None:
    """Defence in depth: even SQL that skipped the checks could not read files or unlock."""
    import duckdb

    con = gateway.store.con
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "ATTACH '/tmp/twin-evil.duckdb' AS evil",
        "COPY (SELECT 1) TO '/tmp/twin-evil.csv'",
        "INSTALL httpfs",
    ):
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql)
    for sql in (
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "SET autoload_known_extensions = true",
        "RESET enable_external_access",
    ):
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(sql)
    assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)


def test_duckdb_parse_of_the_rewrite_is_checked(gateway: Gateway) -> None:
    """If the rewrite ever let an unreadable relation through, DuckDB's own parse catches it."""
    from twin_pipeline.policy.sqlcheck import Rewritten

    role_name, role = gateway.policies.role_of("researcher")
    sneaky = Rewritten(
        sql="SELECT * FROM twin.harmonized.patient", relations=["deid.patient"], cte_names=[]
    )
    with pytest.raises(QueryDenied, match=r"twin\.harmonized\.patient"):
        gateway._duckdb_agrees("SELECT * FROM deid.patient", sneaky, role_name, role)
    unwrapped = Rewritten(
        sql="SELECT * FROM twin.deid.patient", relations=["deid.patient"], cte_names=[]
    )
    with pytest.raises(QueryDenied, match=r"twin\.deid\.patient"):  # readable, but unfiltered
        gateway._duckdb_agrees("SELECT * FROM deid.patient", unwrapped, role_name, role)
    table_fn = Rewritten(sql="SELECT * FROM glob('/x')", relations=[], cte_names=[])
    with pytest.raises(QueryDenied, match=r"glob\(\)"):
        gateway._duckdb_agrees("SELECT 1", table_fn, role_name, role)
    unknown_cte = Rewritten(sql="SELECT * FROM patient", relations=[], cte_names=["__cte1_x"])
    with pytest.raises(QueryDenied, match="patient"):
        gateway._duckdb_agrees("SELECT 1", unknown_cte, role_name, role)
