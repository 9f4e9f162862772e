"""Access audit entries land in the hash-chained ledger and verify."""

from __future__ import annotations

import json

import pytest

from twin_pipeline import audit
from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def test_record_access_appends_chained_audit_entries(twin_home: Settings) -> None:
    with Store.open(twin_home) as store:
        s1 = audit.record_access(
            store,
            user="engineer",
            role="researcher",
            sql="SELECT * FROM deid.patient",
            relations=["deid.patient", "deid.patient"],
            rows=12,
            decision="allow",
        )
        s2 = audit.record_access(
            store,
            user="admin",
            role="researcher",
            sql="SELECT ssn FROM harmonized.patient",
            relations=["harmonized.patient"],
            decision="deny",
            reason="role researcher may not read harmonized.patient",
        )
        assert s2 == s1 + 1
        events = audit.access_events(store)
        assert [e["user"] for e in events] == ["engineer", "admin"]
        assert events[0]["relations"] == ["deid.patient"]
        assert events[1]["decision"] == "deny" and "harmonized" in events[1]["reason"]
        kinds = store.con.execute("SELECT DISTINCT kind FROM governance.ledger").fetchall()
        assert kinds == [("audit",)]
        report = audit.verify_all(store)
        assert report.ok, report.to_dict()
        assert report.ledger_entries == 2
        # changing the payload of the first audit entry is named
        payload = json.loads(
            store.con.execute(
                "SELECT payload FROM governance.ledger WHERE seq = ?", [s1]
            ).fetchone()[0]
        )
        payload["rows"] = 0
        store.con.execute(
            "UPDATE governance.ledger SET payload = ? WHERE seq = ?", [json.dumps(payload), s1]
        )
        bad = audit.verify_all(store)
        assert not bad.ok and bad.first_bad is not None
        assert f"seq {s1}" in bad.first_bad.record


def test_record_access_rejects_unknown_decision(twin_home: Settings) -> None:
    with Store.open(twin_home) as store, pytest.raises(TwinPipelineError):
        audit.record_access(store, user="a", role="r", sql="SELECT 1", decision="maybe")
