"""Property: any single change to any field of any ledger entry is detected at that entry."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline import audit, ledger
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

N = 12
FIELDS = ["kind", "run_id", "created_at", "payload", "prev_hash", "hash"]


class _Rollback(Exception):
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    home: Path = tmp_path_factory.mktemp("chain") / "home"
    s = Settings.from_env(home).ensure()
    KeyRing(s.keys_dir).init()
    st_ = Store.open(s)
    for i in range(N):
        audit.record_access(
            st_, user=f"u{i}", role="researcher", sql=f"SELECT {i}", relations=["deid.patient"]
        )
    return st_


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seq=st.integers(min_value=1, max_value=N),
    field=st.sampled_from(FIELDS),
    junk=st.text(min_size=1, max_size=8),
)
def test_any_single_field_change_is_detected(store: Store, seq: int, field: str, junk: str) -> None:
    assert ledger.verify(store).ok
    try:
        with store.transaction() as con:
            old = con.execute(
                f"SELECT {field} FROM governance.ledger WHERE seq = ?", [seq]
            ).fetchone()[0]
            new = str(old) + junk
            con.execute(f"UPDATE governance.ledger SET {field} = ? WHERE seq = ?", [new, seq])
            report = ledger.verify(store)
            assert not report.ok
            # a changed hash shows at the next entry's link (or at the entry itself)
            assert report.first_bad_seq in (seq, seq + 1), (field, report)
            raise _Rollback
    except _Rollback:
        pass
    assert ledger.verify(store).ok
