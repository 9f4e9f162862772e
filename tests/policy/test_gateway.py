"""Allowed queries return the right rows, with each role's row filters and column masks."""

from __future__ import annotations

import contextlib

import pytest

from twin_pipeline import ledger
from twin_pipeline.errors import AccessDenied
from twin_pipeline.policy import Gateway, QueryFailed

from .conftest import FAMILY_P1, SSN_P2, last_audit


def rows(gw: Gateway, user: str, sql: str) -> list[tuple[object, ...]]:
    return gw.query(user, sql).rows


# -- researcher: de-identified data of consenting patients only ------------------------------
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT patient_id FROM deid.patient ORDER BY 1", [("d1",), ("d3",)]),
        ("SELECT patient_id FROM patient ORDER BY 1", [("d1",), ("d3",)]),  # unqualified
        ("FROM deid.patient SELECT count(*)", [(2,)]),
        (
            "SELECT observation_id FROM deid.observation ORDER BY 1",
            [("x1",), ("x2",), ("x4",)],
        ),
        ("SELECT count(*) FROM deid.observation WHERE patient_id = 'd2'", [(0,)]),
        (
            "SELECT p.patient_id, count(*) FROM deid.patient p JOIN deid.observation o "
            "ON o.patient_id = p.patient_id GROUP BY ALL ORDER BY 1",
            [("d1", 2), ("d3", 1)],
        ),
        ("WITH p AS (SELECT * FROM deid.patient) SELECT count(*) FROM p", [(2,)]),
        (
            "WITH patient AS (SELECT patient_id FROM deid.patient) SELECT count(*) FROM patient",
            [(2,)],
        ),
        (
            "SELECT (SELECT count(*) FROM deid.observation) + (SELECT count(*) FROM deid.patient)",
            [(5,)],
        ),
        (
            "SELECT patient_id FROM deid.patient UNION SELECT patient_id FROM deid.observation "
            "ORDER BY 1",
            [("d1",), ("d3",)],
        ),
        ("SELECT sop_instance_uid FROM deid.imaging_instance ORDER BY 1", [("i1",), ("i2",)]),
        ("SELECT name FROM deid.location ORDER BY 1", [("ICU",), ("Ward 4B",)]),  # no filter
        ("SELECT deid.patient.gender FROM deid.patient ORDER BY 1", [("female",), ("male",)]),
        ("SELECT count(*) FROM twin.deid.observation", [(3,)]),
        ("SELECT 'a;b' AS s", [("a;b",)]),
        ("SELECT sum(x) FROM range(4) t(x)", [(6,)]),
    ],
)
def test_researcher_rows(gateway: Gateway, sql: str, expected: list[tuple[object, ...]]) -> None:
    assert rows(gateway, "researcher", sql) == expected


def test_researcher_masks(gateway: Gateway) -> None:
    res = gateway.query("researcher", "SELECT patient_id, birth_date FROM deid.patient ORDER BY 1")
    assert [str(r[1]) for r in res.rows] == ["1950-01-01", "1977-01-01"]
    assert res.masks["deid.patient"] == {"birth_date": "year_only"}
    assert res.row_filters["deid.patient"] == ["research-consent"]
    dev = gateway.query("researcher", "SELECT serial_number FROM deid.device").rows
    assert len(dev) == 1
    serial = str(dev[0][0])
    assert serial.startswith("h:") and "SN-" not in serial


def test_errors_do_not_leak_filtered_values(gateway: Gateway) -> None:
    # the cast may be evaluated before the consent filter; the value must not reach the message
    with pytest.raises(QueryFailed) as info:
        gateway.query(
            "researcher", "SELECT * FROM deid.observation WHERE CAST(patient_id || 'q' AS INT) = 1"
        )
    assert "d2q" not in str(info.value) and "Conversion" in str(info.value)
    entry = last_audit(gateway)
    assert entry["decision"] == "allow" and entry["status"] == "error"


# -- compliance auditor: governance + harmonized rows with identifiers masked -------------------
def test_auditor_traces_lineage_into_masked_harmonized_rows(gateway: Gateway) -> None:
    res = gateway.query(
        "auditor",
        "SELECT patient_id, mrn, ssn, family_name, birth_date, phone, gender, lineage_key "
        "FROM harmonized.patient WHERE lineage_key = 'lk-p2'",
    )
    (row,) = res.records()
    assert row["ssn"] == "***6789" and SSN_P2 not in str(res.rows)
    assert row["family_name"] == "[REDACTED]"
    assert str(row["birth_date"]) == "1961-01-01"
    assert row["phone"] == "***0102"
    assert str(row["mrn"]).startswith("h:") and "MRN002" not in str(row["mrn"])
    assert (row["patient_id"], row["gender"]) == ("p2", "male")
    # the keyed hash is stable, so masked values still join
    again = gateway.query("auditor", "SELECT mrn FROM harmonized.patient WHERE patient_id = 'p2'")
    assert again.rows == [(row["mrn"],)]
    # all four patients are visible to the auditor (no consent filter)
    assert rows(gateway, "auditor", "SELECT count(*) FROM harmonized.patient") == [(4,)]
    # masked columns cannot be un-masked by filtering on them
    assert rows(
        gateway, "auditor", f"SELECT count(*) FROM harmonized.patient WHERE ssn = '{SSN_P2}'"
    ) == [(0,)]


def test_auditor_reads_governance_with_payload_redacted(gateway: Gateway) -> None:
    res = gateway.query("auditor", "SELECT reason, payload FROM governance.quarantine")
    assert res.rows == [("ehr/bundles/b1.json [entry:3]: Patient without id", "[REDACTED]")]
    assert FAMILY_P1 not in str(res.rows)
    assert rows(gateway, "auditor", "SELECT success FROM governance.validation_result") == [(True,)]
    audit_rows = rows(
        gateway, "auditor", "SELECT count(*) FROM governance.ledger WHERE kind = 'audit'"
    )
    assert audit_rows[0][0] >= 1  # type: ignore[operator]


# -- engineer and admin: everything, unmasked ----------------------------------------------------
@pytest.mark.parametrize("user", ["engineer", "admin"])
def test_engineer_and_admin_read_identified_data(gateway: Gateway, user: str) -> None:
    assert rows(gateway, user, "SELECT ssn FROM harmonized.patient WHERE patient_id = 'p2'") == [
        (SSN_P2,)
    ]
    assert rows(gateway, user, "SELECT count(*) FROM deid.patient") == [(4,)]
    assert rows(gateway, user, "SELECT count(*) FROM raw.fhir_resource") == [(1,)]
    assert rows(gateway, user, "SELECT kind FROM twin.twin.node") == [("ward",)]
    names = rows(
        gateway,
        user,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'deid' ORDER BY 1",
    )
    assert ("patient",) in names


def test_ambiguous_unqualified_name_must_be_qualified(gateway: Gateway) -> None:
    from twin_pipeline.policy import QueryDenied

    with pytest.raises(QueryDenied, match=r"ambiguous \(deid\.patient, harmonized\.patient\)"):
        gateway.query("engineer", "SELECT * FROM patient")


# -- caps, audit of allowed queries, chain integrity -------------------------------------------
def test_row_cap_and_allowed_audit_entry(gateway: Gateway) -> None:
    sql = "SELECT observation_id FROM deid.observation ORDER BY 1"
    res = gateway.query("researcher", sql, limit=2)
    assert res.rows == [("x1",), ("x2",)] and res.truncated
    entry = last_audit(gateway)
    assert entry["seq"] == res.audit_seq
    assert entry["decision"] == "allow" and entry["rows"] == 2 and entry["truncated"] is True
    assert entry["relations"] == ["deid.observation"]
    assert entry["user"] == "researcher" and entry["role"] == "researcher"
    assert entry["sql"] == sql
    # the consent filter's own read of deid.patient is not a relation the user touched
    full = gateway.query("researcher", sql)
    assert not full.truncated and len(full.rows) == 3


def test_ledger_chain_verifies_after_many_queries(gateway: Gateway) -> None:
    for sql in ("SELECT 1", "SELECT * FROM harmonized.patient", "SELECT count(*) FROM patient"):
        with contextlib.suppress(AccessDenied):
            gateway.query("researcher", sql)
    report = ledger.verify(gateway.store)
    assert report.ok and report.entries >= 4


def test_time_limit_interrupts_a_runaway_query(gateway: Gateway) -> None:
    saved = gateway.timeout_s
    gateway.timeout_s = 0.3
    try:
        with pytest.raises(QueryFailed, match="time limit"):
            gateway.query("researcher", "SELECT count(*) FROM range(100000000000) a")
    finally:
        gateway.timeout_s = saved
    assert last_audit(gateway)["status"] == "error"
    assert gateway.query("researcher", "SELECT 1").rows == [(1,)]  # still usable


def test_checked_rewrites_are_per_role_and_still_audited(gateway: Gateway) -> None:
    from twin_pipeline.policy import QueryDenied

    sql = "SELECT count(*) FROM harmonized.patient WHERE gender = 'female'"
    first = gateway.query("auditor", sql)
    second = gateway.query("auditor", sql)  # the checked rewrite is reused
    assert first.rows == second.rows == [(2,)]
    assert second.audit_seq == first.audit_seq + 1
    with pytest.raises(QueryDenied, match=r"harmonized\.patient"):
        gateway.query("researcher", sql)  # never served from the auditor's check
    assert last_audit(gateway)["decision"] == "deny"


def test_auditor_summarises_the_audit_log(gateway: Gateway) -> None:
    with pytest.raises(AccessDenied):
        gateway.query("researcher", "SELECT * FROM raw.fhir_resource")
    res = gateway.query(
        "auditor",
        "SELECT payload->>'reason' FROM governance.ledger WHERE kind = 'audit' "
        "AND payload->>'user' = 'researcher' AND payload->>'decision' = 'deny' "
        "ORDER BY seq DESC LIMIT 1",
    )
    assert res.rows == [("relation raw.fhir_resource is not readable by role researcher",)]


def test_describe_is_audited(gateway: Gateway) -> None:
    gateway.describe("researcher")
    entry = last_audit(gateway)
    assert (entry["action"], entry["user"], entry["decision"]) == (
        "describe",
        "researcher",
        "allow",
    )
    with pytest.raises(AccessDenied, match="unknown user"):
        gateway.describe("eve")
    assert (last_audit(gateway)["user"], last_audit(gateway)["decision"]) == ("eve", "deny")


def test_consent_filter_fails_closed_without_consent_data(twin_home: object) -> None:
    """If the de-identified data cannot say who consented, a researcher gets no rows at all."""
    from twin_pipeline.paths import Settings
    from twin_pipeline.policy import QueryDenied
    from twin_pipeline.store import Store

    assert isinstance(twin_home, Settings)
    with Store.open(twin_home) as store, store.transaction() as con:
        con.execute("CREATE TABLE deid.observation AS SELECT 'd1' AS patient_id, 1.0 AS value")
    # no deid.patient at all
    with Gateway(twin_home) as gw, pytest.raises(QueryDenied, match=r"needs deid\.patient"):
        gw.query("researcher", "SELECT * FROM deid.observation")
    with Store.open(twin_home) as store, store.transaction() as con:
        con.execute("CREATE TABLE deid.patient AS SELECT 'd1' AS patient_id")  # no consent column
    with Gateway(twin_home) as gw:
        with pytest.raises(QueryFailed, match="research_consent"):
            gw.query("researcher", "SELECT * FROM deid.observation")
        assert last_audit(gw)["rows"] == 0


def test_one_session_per_query_does_not_grow_the_ledger_a_block_each(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``twin query`` opens a gateway for one query: its audit entry is a commit of its own, a
    row group of its own in the ledger. Closing a session merges them once they add up, and
    the chain still verifies."""
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.paths import Settings
    from twin_pipeline.store import COMPACT_MIN_ROW_GROUPS, Store

    from .conftest import build_store

    settings = Settings.from_env(tmp_path_factory.mktemp("gw-growth") / "twin_home").ensure()
    KeyRing(settings.keys_dir).init()
    build_store(settings)
    sessions = COMPACT_MIN_ROW_GROUPS + 8
    most = 0
    for _ in range(sessions):
        with Gateway(settings, timeout_s=20) as gw:
            gw.query("engineer", "SELECT count(*) FROM harmonized.patient")
        with Store.open(settings, read_only=True) as store:
            most = max(most, store._row_groups("governance.ledger"))
    with Store.open(settings, read_only=True) as store:
        (audits,) = store.con.execute(
            "SELECT count(*) FROM governance.ledger WHERE kind = 'audit'"
        ).fetchone() or (0,)
        assert audits >= sessions
        assert most <= COMPACT_MIN_ROW_GROUPS  # merged as soon as the threshold is reached
        assert ledger.verify(store).ok
