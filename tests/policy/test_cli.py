"""``twin query``: formats, denial exit code 3 naming the refused relation, audit in the store."""

from __future__ import annotations

import csv
import io
import json

import pytest

from twin_pipeline.cli import main
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

from .conftest import build_store


@pytest.fixture
def home(twin_home: Settings) -> Settings:
    build_store(twin_home)
    return twin_home


def test_csv_json_and_table_output(home: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT patient_id, birth_date FROM deid.patient ORDER BY 1"
    assert main(["query", "--as", "researcher", "--format", "csv", sql]) == 0
    got = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert got == [["patient_id", "birth_date"], ["d1", "1950-01-01"], ["d3", "1977-01-01"]]

    assert main(["query", "--as", "researcher", "--format", "json", "--limit", "1", sql]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == [{"patient_id": "d1", "birth_date": "1950-01-01"}]
    assert doc["truncated"] is True and doc["role"] == "researcher"
    assert doc["row_filters"] == {"deid.patient": ["research-consent"]}

    assert main(["query", "--as", "auditor", "SELECT ssn FROM harmonized.patient"]) == 0
    out = capsys.readouterr()
    assert "***6789" in out.out and "4 rows" in out.err


@pytest.mark.parametrize(
    ("user", "sql", "named"),
    [
        ("researcher", "SELECT * FROM harmonized.patient", "harmonized.patient"),
        ("engineer", "SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
        ("admin", "ATTACH '/tmp/x.duckdb' AS x", "ATTACH"),
        ("nobody", "SELECT 1", "unknown user 'nobody'"),
    ],
)
def test_denial_exit_code_and_message(
    home: Settings, capsys: pytest.CaptureFixture[str], user: str, sql: str, named: str
) -> None:
    assert main(["query", "--as", user, sql]) == 3
    err = capsys.readouterr().err
    assert err.startswith("twin: denied: ") and named in err
    with Store.open(home, read_only=True) as store:
        row = store.con.execute(
            "SELECT payload FROM governance.ledger WHERE kind = 'audit' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    assert row is not None
    entry = json.loads(row[0])
    assert (entry["user"], entry["decision"], entry["sql"]) == (user, "deny", sql)


def test_query_error_is_exit_2(home: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["query", "--as", "researcher", "SELECT nope FROM deid.patient"]) == 2
    assert "twin: error: query failed: Binder Error" in capsys.readouterr().err


def test_describe_lists_masks_and_filters(
    home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", "--as", "researcher", "--describe"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["role"] == "researcher"
    assert set(doc["relations"]) == {
        "deid.patient",
        "deid.observation",
        "deid.device",
        "deid.location",
        "deid.imaging_series",
        "deid.imaging_instance",
    }
    cols = {c["name"]: c["mask"] for c in doc["relations"]["deid.device"]["columns"]}
    assert cols["serial_number"] == "hash" and cols["manufacturer"] is None
    assert doc["relations"]["deid.location"]["row_filters"] == []


def test_no_store_yet_is_a_clear_error(
    twin_home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["query", "--as", "engineer", "SELECT 1"]) == 2
    assert "no store yet" in capsys.readouterr().err
    assert not twin_home.store_path.exists()


def test_audit_log_is_encrypted_at_rest(home: Settings) -> None:
    marker = "AUDIT-PLAINTEXT-MARKER-Xq7431"
    assert main(["query", "--as", "researcher", f"SELECT '{marker}' AS m"]) == 0
    assert main(["query", "--as", "researcher", f"SELECT * FROM raw.x WHERE y = '{marker}'"]) == 3
    with Store.open(home, read_only=True) as store:
        n = store.con.execute(
            "SELECT count(*) FROM governance.ledger WHERE kind = 'audit' AND contains(payload, ?)",
            [marker],
        ).fetchone()
    assert n == (2,)  # both queries are in the audit log ...
    for f in home.home.glob("twin.duckdb*"):  # ... and neither is readable in the files
        assert marker.encode() not in f.read_bytes(), f
