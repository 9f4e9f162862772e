"""``twin status`` reports the version a table's last governed write recorded (rows checked);
``twin status --verify`` hashes every table's rows."""

from __future__ import annotations

import json

import pytest

from tests.lineage.conftest import Built
from twin_pipeline.cli import main
from twin_pipeline.store import Store


def _tables(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, dict[str, object]]:
    capsys.readouterr()
    assert main(["status", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)["tables"]


def test_status_takes_recorded_versions_and_verify_hashes_the_rows(
    built_copy: Built, capsys: pytest.CaptureFixture[str]
) -> None:
    table = "deid.lt_observation"
    recorded = _tables(capsys)
    assert recorded == _tables(capsys, "--verify")  # only governed steps wrote the store
    with Store.open(built_copy.settings) as store:
        # a write outside any governed step, row count unchanged
        store.con.execute(f"UPDATE {table} SET value = value + 1")
    plain, verified = _tables(capsys), _tables(capsys, "--verify")
    assert plain[table] == recorded[table]  # what the lineage names
    assert verified[table]["hash"] != recorded[table]["hash"]
    assert verified[table]["rows"] == recorded[table]["rows"]
    assert {k: v for k, v in plain.items() if k != table} == {
        k: v for k, v in verified.items() if k != table
    }
    with Store.open(built_copy.settings) as store:  # the row count changed: hashed again
        store.con.execute(f"DELETE FROM {table} WHERE rowid = (SELECT min(rowid) FROM {table})")
    after = _tables(capsys)
    assert after[table] == _tables(capsys, "--verify")[table]
    assert after[table]["rows"] == int(str(recorded[table]["rows"])) - 1
