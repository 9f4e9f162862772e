"""Gateway audit durability: the chain head is cached, sealed off the query path, and a cut-off
end of the log is still detected once the session has sealed."""

from __future__ import annotations

import json
import time

import pytest

from twin_pipeline import ledger
from twin_pipeline.audit import record_access, verify_all
from twin_pipeline.lineage import storage
from twin_pipeline.paths import Settings
from twin_pipeline.policy import Gateway
from twin_pipeline.store import Store

from .conftest import build_store


@pytest.fixture
def home(twin_home: Settings) -> Settings:
    build_store(twin_home)
    return twin_home


def _seal_doc(settings: Settings) -> dict[str, object]:
    """The seal file's content; empty while no seal has been written yet."""
    path = settings.home / storage.SEAL_FILE
    if not path.exists():
        return {}
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


def _audit_seqs(store: Store) -> list[int]:
    rows = store.con.execute(
        "SELECT seq FROM governance.ledger WHERE kind = 'audit' ORDER BY seq"
    ).fetchall()
    return [int(r[0]) for r in rows]


def test_session_close_seals_last_audit_entry_and_cut_off_end_is_detected(
    home: Settings,
) -> None:
    with Gateway(home) as gw:
        for i in range(5):
            gw.query("researcher", f"SELECT count(*) FROM deid.patient -- {i}")
        with pytest.raises(Exception, match="not readable"):
            gw.query("researcher", "SELECT * FROM harmonized.patient")
        last = gw.store._ledger_head
    assert last is not None
    assert _seal_doc(home)["seq"] == last[0]  # the denied query's entry is sealed too
    with Store.open(home) as store:
        seqs = _audit_seqs(store)
        assert seqs[-1] == last[0]
        report = verify_all(store)
        assert report.ok, report.to_dict()
        assert report.unsealed_entries == 0
        store.con.execute("DELETE FROM governance.ledger WHERE seq >= ?", [seqs[-3]])
        assert ledger.verify(store).ok  # the chain alone cannot show a cut-off end
        report = verify_all(store)
    assert not report.ok
    assert report.first_bad is not None
    assert report.first_bad.record == f"governance.ledger seq {last[0]}"
    assert "sealed ledger head is missing" in report.first_bad.problem


def test_open_session_seals_in_the_background(home: Settings) -> None:
    with Gateway(home) as gw:
        res = gw.query("researcher", "SELECT gender FROM deid.patient")
        deadline = time.monotonic() + 10
        while _seal_doc(home).get("seq") != res.audit_seq and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _seal_doc(home)["seq"] == res.audit_seq
    # an entry written without a seal is counted as unsealed, not as tampering
    with Store.open(home) as store:
        seqs = _audit_seqs(store)
        record_access(store, user="x", role="researcher", sql="SELECT 1", seal=False)
        report = verify_all(store)
    assert report.ok
    assert report.unsealed_entries == 1
    assert res.audit_seq in seqs


def test_cached_head_survives_other_writers_and_rollbacks(home: Settings) -> None:
    """Two handles on one store append in turn, one inside a transaction that rolls back: the
    chain stays unbroken and gap-free."""
    with Store.open(home) as a, Store.open(home) as b:
        s1 = ledger.append(a, "audit", {"n": 1})
        s2 = ledger.append(b, "audit", {"n": 2})  # a's cached head is now stale
        s3 = ledger.append(a, "audit", {"n": 3})
        with pytest.raises(RuntimeError), a.transaction():
            ledger.append(a, "audit", {"n": "rolled back"})
            raise RuntimeError("abort")
        s4 = ledger.append(a, "audit", {"n": 4})
        s5, h5 = ledger.append_entry(b, "audit", {"n": 5})
        assert [s1, s2, s3, s4, s5] == list(range(s1, s1 + 5))
        assert ledger.head(a) == (s5, h5)  # a's cache is stale: looked up again
        report = ledger.verify(a)
    assert report.ok, report
