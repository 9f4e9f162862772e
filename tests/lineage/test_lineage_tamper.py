"""Tamper evidence: every kind of change to the ledger or the signed bundles is detected and the
first bad record is named, by the library and by ``twin audit verify``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.lineage.conftest import Built
from twin_pipeline import ledger
from twin_pipeline.audit import verify_all
from twin_pipeline.cli import main
from twin_pipeline.store import Store

Cols = "seq, kind, run_id, created_at, payload, prev_hash, hash"


def _rows(store: Store) -> list[tuple]:
    return store.con.execute(f"SELECT {Cols} FROM governance.ledger ORDER BY seq").fetchall()


def _rewrite(store: Store, rows: list[tuple]) -> None:
    store.con.execute("DELETE FROM governance.ledger")
    store.con.executemany("INSERT INTO governance.ledger VALUES (?,?,?,?,?,?,?)", rows)


def _activity_seq(store: Store) -> int:
    row = store.con.execute(
        "SELECT min(seq) FROM governance.ledger WHERE kind = 'activity' AND seq > 2"
    ).fetchone()
    return int(row[0])


def change_row(store: Store) -> tuple[int, str]:
    k = _activity_seq(store)
    payload = json.loads(
        store.con.execute("SELECT payload FROM governance.ledger WHERE seq = ?", [k]).fetchone()[0]
    )
    payload["user"] = "mallory"
    store.con.execute(
        "UPDATE governance.ledger SET payload = ? WHERE seq = ?",
        [ledger.canonical_json(payload), k],
    )
    return k, "content does not match"


def delete_row(store: Store) -> tuple[int, str]:
    k = _activity_seq(store)
    store.con.execute("DELETE FROM governance.ledger WHERE seq = ?", [k])
    return k + 1, "sequence gap"


def reorder_rows(store: Store) -> tuple[int, str]:
    k = _activity_seq(store)
    rows = _rows(store)
    i = next(i for i, r in enumerate(rows) if r[0] == k)
    rows[i], rows[i + 1] = rows[i + 1], rows[i]
    _rewrite(store, rows)
    return k + 1, "reorder"


def insert_row(store: Store) -> tuple[int, str]:
    """A forged entry, correctly hashed onto its predecessor, slipped in the middle."""
    k = _activity_seq(store)
    rows = _rows(store)
    i = next(i for i, r in enumerate(rows) if r[0] == k)
    prev = rows[i - 1][6]
    body = ledger.canonical_json({"action": "query", "user": "mallory", "decision": "allow"})
    forged = (
        k,
        "audit",
        "x",
        "2026-01-01T00:00:00+00:00",
        body,
        prev,
        ledger.entry_hash(k, "audit", "x", "2026-01-01T00:00:00+00:00", body, prev),
    )
    shifted = [(r[0] + 1, *r[1:]) for r in rows[i:]]
    _rewrite(store, [*rows[:i], forged, *shifted])
    return k + 1, "previous-hash link broken"


def rewrite_chain(store: Store) -> tuple[int, str]:
    """Change an entry and recompute every later hash: only the signed anchors catch it."""
    k = _activity_seq(store)
    rows = _rows(store)
    out, prev = [], ledger.GENESIS
    for seq, kind, rid, created, body, _, _ in rows:
        if seq == k:
            doc = json.loads(body)
            doc["user"] = "mallory"
            body = ledger.canonical_json(doc)
        h = ledger.entry_hash(seq, kind, rid, created, body, prev)
        out.append((seq, kind, rid, created, body, prev, h))
        prev = h
    _rewrite(store, out)
    assert ledger.verify(store).ok  # the chain alone no longer shows it
    return -1, "signed ledger anchor"


def swap_signature(store: Store) -> tuple[int, str]:
    a, b = store.con.execute(
        "SELECT run_id, signature FROM governance.prov_bundle ORDER BY created_at"
    ).fetchall()
    store.con.execute(
        "UPDATE governance.prov_bundle SET signature = ? WHERE run_id = ?", [b[1], a[0]]
    )
    store.con.execute(
        "UPDATE governance.prov_bundle SET signature = ? WHERE run_id = ?", [a[1], b[0]]
    )
    return -1, "signature does not verify"


def change_bundle(store: Store) -> tuple[int, str]:
    (rid, text), *_ = store.con.execute(
        "SELECT run_id, prov_json FROM governance.prov_bundle ORDER BY created_at"
    ).fetchall()
    store.con.execute(
        "UPDATE governance.prov_bundle SET prov_json = ? WHERE run_id = ?",
        [text.replace("engineer", "mallory"), rid],
    )
    return -1, "does not match its recorded sha256"


def delete_bundle(store: Store) -> tuple[int, str]:
    (rid,), *_ = store.con.execute(
        "SELECT run_id FROM governance.prov_bundle ORDER BY created_at"
    ).fetchall()
    store.con.execute("DELETE FROM governance.prov_bundle WHERE run_id = ?", [rid])
    return -1, "announced in the ledger but missing"


def truncate_tail(store: Store) -> tuple[int, str]:
    """Queries audited after the last run, then cut off the end of the log: the chain and the
    run bundles cannot show it, the signed seal of the ledger head does."""
    from twin_pipeline.audit import record_access

    first = record_access(store, user="mallory", role="researcher", sql="SELECT 1", rows=1)
    last = record_access(store, user="mallory", role="researcher", sql="SELECT 2", rows=1)
    assert verify_all(store).ok
    store.con.execute("DELETE FROM governance.ledger WHERE seq >= ?", [first])
    assert ledger.verify(store).ok
    return last, "sealed ledger head is missing"


CASES: list[Callable[[Store], tuple[int, str]]] = [
    truncate_tail,
    change_row,
    delete_row,
    reorder_rows,
    insert_row,
    rewrite_chain,
    swap_signature,
    change_bundle,
    delete_bundle,
]


def test_untouched_store_verifies(built: Built) -> None:
    with Store.open(built.settings, read_only=True) as store:
        report = verify_all(store)
        thorough = verify_all(store, deep=True, tables=True)
    assert report.ok, report.to_dict()
    assert thorough.ok, thorough.to_dict()
    assert report.bundles == 2
    assert report.ledger_entries >= 12


@pytest.mark.parametrize("tamper", CASES, ids=lambda f: f.__name__)
def test_tampering_is_detected_and_named(
    built_copy: Built,
    tamper: Callable[[Store], tuple[int, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Store.open(built_copy.settings) as store:
        bad_seq, words = tamper(store)
        report = verify_all(store)
    assert not report.ok
    first = report.first_bad
    assert first is not None
    assert words in first.problem, report.to_dict()
    if bad_seq > 0:
        assert first.record == f"governance.ledger seq {bad_seq}"
    else:
        assert first.record.startswith("governance.prov_bundle run ")
    assert main(["audit", "verify"]) == 1
    assert f"first bad record: {first.record}" in capsys.readouterr().out


def test_cli_verify_ok(built_copy: Built) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "audit", "verify", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] and doc["bundles"] == 2 and doc["first_bad"] is None


def test_bundle_signed_by_another_key_fails(built_copy: Built) -> None:
    from twin_pipeline.keys import KeyRing

    ring = KeyRing(built_copy.settings.keys_dir)
    ring.rotate("signing")  # v2 exists; bundles still name v1 and verify with v1
    with Store.open(built_copy.settings) as store:
        assert verify_all(store).ok
        store.con.execute("UPDATE governance.prov_bundle SET key_version = 2")
        report = verify_all(store)
    assert not report.ok and "signature does not verify" in report.first_bad.problem


def test_table_changed_outside_the_pipeline_is_named(
    built_copy: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", "--tables"]) == 0
    with Store.open(built_copy.settings) as store:
        store.con.execute("DELETE FROM deid.lt_observation WHERE observation_id = 'obs-2'")
        assert verify_all(store).ok  # the records themselves are intact
        report = verify_all(store, tables=True)
    assert not report.ok
    assert report.first_bad is not None and report.first_bad.record == "deid.lt_observation"
    assert main(["audit", "verify", "--tables"]) == 1
    assert "first bad record: deid.lt_observation" in capsys.readouterr().out


def test_fragment_changed_before_signing_is_found_by_deep_verify(
    built_copy: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.lineage import runs, storage

    rid = built_copy.run_ids[0]
    with Store.open(built_copy.settings) as store:
        store.con.execute(
            "UPDATE governance.prov_activity SET prov_json = replace(prov_json, 'engineer', 'mallory') "
            "WHERE run_id = ?",
            [rid],
        )
        storage.store_bundle(
            store, rid, runs.run_json(store, rid), KeyRing(built_copy.settings.keys_dir)
        )
        storage.seal(store)
        assert verify_all(store).ok  # validly signed, but not what the ledger says
        report = verify_all(store, deep=True)
    assert not report.ok
    assert report.first_bad is not None
    assert report.first_bad.record == f"governance.prov_bundle run {rid}"
    assert "differs from the run's ledger activity records" in report.first_bad.problem
    assert main(["audit", "verify", "--deep"]) == 1
    capsys.readouterr()
