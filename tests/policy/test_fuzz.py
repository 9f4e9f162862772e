"""Token soup from a vocabulary of dangerous and ordinary SQL: whatever the gateway makes of it,
it never crashes, never returns identified data to a researcher, and always audits."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline.errors import AccessDenied
from twin_pipeline.policy import Gateway, QueryFailed

from .conftest import FAMILY_P1, SSN_P2, last_audit

TOKENS = [
    "SELECT",
    "*",
    "FROM",
    "WHERE",
    "WITH",
    "AS",
    "UNION",
    "ALL",
    "JOIN",
    "ON",
    "(",
    ")",
    ",",
    ";",
    "--",
    "/*",
    "*/",
    "'",
    '"',
    "=",
    "1",
    "x",
    "patient",
    "deid.patient",
    "deid.observation",
    "harmonized.patient",
    "twin.harmonized.patient",
    "raw.fhir_resource",
    "governance.quarantine",
    "read_csv('/etc/passwd')",
    "glob('/*')",
    "query('SELECT 1')",
    "ATTACH",
    "COPY",
    "TO",
    "'/tmp/x'",
    "PRAGMA",
    "SET",
    "lock_configuration",
    "=",
    "false",
    "information_schema.tables",
    "duckdb_tables()",
    "LATERAL",
    "EXISTS",
    "IN",
    "patient_id",
    "ssn",
    "family_name",
    "research_consent",
    "__src",
    "COLUMNS(*)",
    "LIMIT",
    "ORDER BY",
    "GROUP BY ALL",
    "count(*)",
    "FROM-first",
    "RECURSIVE",
    "VALUES",
    "(1)",
    "e'\\x27'",
    "\u0455elect",
    "r\u0435ad_csv('x')",
    "\n",
    "UNNEST([1])",
    "range(3)",
]


@pytest.mark.filterwarnings("ignore:The recursion limit will not be reset")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=14))
def test_token_soup_never_leaks(gateway: Gateway, tokens: list[str]) -> None:
    sql = " ".join(tokens)
    try:
        res = gateway.query("researcher", sql)
    except (AccessDenied, QueryFailed):
        entry = last_audit(gateway)
        assert entry["sql"] == sql and entry["user"] == "researcher"
        return
    text = res.to_csv()
    for marker in (SSN_P2, FAMILY_P1, "MRN00", "root:"):
        assert marker not in text, (sql, text)
    assert all(r.startswith("deid.") for r in res.relations), res.relations
    entry = last_audit(gateway)
    assert entry["decision"] == "allow" and entry["rows"] == len(res.rows)
