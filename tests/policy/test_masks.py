"""Every mask on every kind of column: the masked query runs, keeps the column name and type
where it promises to, and hides the value."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import duckdb
import pytest

from twin_pipeline.policy.masks import relation_query
from twin_pipeline.policy.model import Role

COLUMNS = [
    ("v_text", "VARCHAR", "'123-45-6789'"),
    ("v_int", "INTEGER", "42"),
    ("v_dec", "DECIMAL(10,2)", "1234.56"),
    ("v_date", "DATE", "DATE '1961-07-02'"),
    ("v_ts", "TIMESTAMP", "TIMESTAMP '1961-07-02 10:11:12'"),
    ("v_tstz", "TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ '1961-07-02 10:11:12+00'"),
    ("v_list", "VARCHAR[]", "['a', 'b']"),
    ("v_struct", "STRUCT(a INTEGER, b VARCHAR)", "{'a': 1, 'b': 'x'}"),
    ("v_null", "VARCHAR", "NULL"),
]


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    c = duckdb.connect()
    c.execute("SET TimeZone = 'UTC'")
    c.execute("ATTACH ':memory:' AS twin")
    c.execute("CREATE SCHEMA twin.harmonized")
    cols = ", ".join(f"{n} {t}" for n, t, _ in COLUMNS)
    c.execute(f"CREATE TABLE twin.harmonized.t ({cols})")
    c.execute(f"INSERT INTO twin.harmonized.t VALUES ({', '.join(v for *_, v in COLUMNS)})")
    yield c
    c.close()


def masked(con: duckdb.DuckDBPyConnection, mask: str) -> dict[str, tuple[object, str]]:
    role = Role.model_validate(
        {
            "description": "test",
            "read": ["harmonized.*"],
            "masks": [{"tables": ["harmonized.t"], "columns": ["v_*"], "mask": mask}],
        }
    )
    q, masks, _, _ = relation_query("harmonized.t", [(n, t) for n, t, _ in COLUMNS], role, "s4lt")
    assert set(masks) == {n for n, _, _ in COLUMNS}
    cur = con.execute(q.sql(dialect="duckdb"))
    row = cur.fetchone()
    assert row is not None
    types = [str(d[1]) for d in cur.description]
    return {d[0]: (v, t) for d, v, t in zip(cur.description, row, types, strict=True)}


def test_null_keeps_types(con: duckdb.DuckDBPyConnection) -> None:
    out = masked(con, "null")
    assert all(v is None for v, _ in out.values())
    assert out["v_date"][1] == "DATE" and out["v_int"][1] == "INTEGER"


def test_hash_is_keyed_text(con: duckdb.DuckDBPyConnection) -> None:
    out = masked(con, "hash")
    for name, (value, _) in out.items():
        if name == "v_null":
            assert value is None
            continue
        assert isinstance(value, str) and value.startswith("h:") and len(value) == 26
    assert "123" not in str(out["v_text"][0])


def test_last4(con: duckdb.DuckDBPyConnection) -> None:
    out = masked(con, "last4")
    assert out["v_text"][0] == "***6789"
    assert out["v_int"][0] == "***42"
    assert out["v_null"][0] is None


def test_year_only(con: duckdb.DuckDBPyConnection) -> None:
    out = masked(con, "year_only")
    assert out["v_date"][0] == dt.date(1961, 1, 1)
    assert out["v_ts"][0] == dt.datetime(1961, 1, 1)
    tstz = out["v_tstz"][0]
    assert isinstance(tstz, dt.datetime) and (tstz.year, tstz.month, tstz.day) == (1961, 1, 1)
    assert out["v_text"][0] == "123-"  # text: its first four characters
    assert out["v_int"][0] is None and out["v_list"][0] is None  # no year to keep


def test_redact(con: duckdb.DuckDBPyConnection) -> None:
    out = masked(con, "redact")
    assert out["v_text"][0] == "[REDACTED]"
    assert out["v_struct"][0] is None and out["v_date"][0] is None
    assert out["v_null"][0] is None
