"""Content hash v3: a table with a ``source_file`` column is hashed per source file, and the
digests of files whose rows did not change are reused, so appending one file to a table of
millions of rows does not digest them all again (a watch round over a 10,000-patient store spent
~2 s per big table on it)."""

from __future__ import annotations

import hashlib

import duckdb
import pytest

from twin_pipeline.paths import Settings
from twin_pipeline.store import GROUP_HASH_TABLE, SCHEMA_VERSION, Store


def by_sql(con: duckdb.DuckDBPyConnection, table: str, cols: str) -> str:
    """v3's definition in SQL: sha256 of the sorted per-file digests, each the sha256 of the
    file's sorted row digests (md5 of the row as a JSON array)."""
    row = con.execute(
        "SELECT sha256(coalesce(string_agg(g, '' ORDER BY g), '')) FROM ("
        "SELECT sha256(string_agg(h, '' ORDER BY h)) AS g FROM ("
        f"SELECT source_file, md5(json_array({cols})) AS h FROM twin.{table}) "
        "GROUP BY source_file)"
    ).fetchone()
    assert row is not None
    return str(row[0])


COLS = '"source_file", "line", "value"'


def _readings(con: duckdb.DuckDBPyConnection, table: str, file: str | None, n: int) -> None:
    name = "NULL" if file is None else f"'{file}'"
    con.execute(f"INSERT INTO {table} SELECT {name}, range, range * 0.5, now() FROM range({n})")


@pytest.fixture
def store(twin_home: Settings) -> Store:
    with Store.open(twin_home) as s:
        assert s.content_hash_scheme() == "v3"
        s.con.execute(
            "CREATE TABLE raw.readings (source_file VARCHAR, line BIGINT, value DOUBLE, "
            "loaded_at TIMESTAMPTZ)"  # volatile: left out of the hash
        )
        for k in range(5):
            _readings(s.con, "raw.readings", f"telemetry/f{k}.ndjson", 2000 + k)
        _readings(s.con, "raw.readings", None, 7)
    s = Store.open(twin_home)
    yield s  # type: ignore[misc]
    s.close()


def _check(store: Store) -> str:
    """The hash (with remembered digests) equals the hash recomputed from every row and the SQL
    definition."""
    h = store.content_hash("raw.readings")
    assert h == store.content_hash("raw.readings", verify=True)
    assert h == by_sql(store.con, "raw.readings", COLS)
    return h


def _remembered(store: Store) -> dict[str | None, str]:
    rows = store.con.execute(
        f"SELECT grp, digest FROM {GROUP_HASH_TABLE} WHERE table_name = 'raw.readings'"
    ).fetchall()
    assert len(rows) == len({g for g, _ in rows})  # one digest per file, never two
    return dict(rows)


def test_v3_is_its_sql_definition_and_a_table_without_files_is_hashed_as_v2(
    store: Store,
) -> None:
    first = _check(store)
    assert len(_remembered(store)) == 6  # five files and the rows without one
    store.con.execute("CREATE TABLE raw.plain AS SELECT range AS x FROM range(10)")
    v2 = store.con.execute(
        "SELECT sha256(string_agg(md5(json_array(x)), '' ORDER BY md5(json_array(x)))) "
        "FROM raw.plain"
    ).fetchone()
    assert store.content_hash("raw.plain") == v2[0]  # type: ignore[index]
    store.con.execute("DELETE FROM raw.readings")
    assert store.content_hash("raw.readings") == by_sql(store.con, "raw.readings", COLS) != first


def test_remembered_digests_are_reused_only_for_unchanged_files(store: Store) -> None:
    con = store.con
    _check(store)
    # A wrong remembered digest for an unchanged file shows: it is reused, not recomputed.
    con.execute(f"UPDATE {GROUP_HASH_TABLE} SET digest = 'x' WHERE grp = 'telemetry/f0.ndjson'")
    assert store.content_hash("raw.readings") != store.content_hash("raw.readings", verify=True)
    # Each change re-digests the files it touched (f0's wrong digest is replaced when f0
    # changes), and the hash is the definition's after every one of them.
    changes = [
        "UPDATE raw.readings SET value = value + 1 WHERE source_file = 'telemetry/f0.ndjson' "
        "AND line = 5",  # in place: same row count
        "DELETE FROM raw.readings WHERE source_file = 'telemetry/f1.ndjson'",
        "UPDATE raw.readings SET line = line + 1 WHERE source_file IS NULL AND line = 0",
        "UPDATE raw.readings SET loaded_at = now() + INTERVAL 1 DAY",  # volatile only
    ]
    seen = {_check(store)}  # (the recomputing check put the right f0 digest back)
    for sql in changes:
        con.execute(sql)
        seen.add(_check(store))
        _remembered(store)
    _readings(con, "raw.readings", "telemetry/f9.ndjson", 300)  # a new file
    seen.add(_check(store))
    assert len(seen) == 5  # the volatile-only change left the hash as it was
    assert "telemetry/f1.ndjson" not in _remembered(store)
    # a file deleted while no other changed is forgotten too (by the plain hash: the
    # recomputing one re-remembers every file)
    con.execute("DELETE FROM raw.readings WHERE source_file = 'telemetry/f2.ndjson'")
    h = store.content_hash("raw.readings")
    assert "telemetry/f2.ndjson" not in _remembered(store)
    assert h == by_sql(con, "raw.readings", COLS) not in seen
    assert "telemetry/f9.ndjson" in _remembered(store)
    # A new column changes every row's text: nothing remembered is reused.
    con.execute("ALTER TABLE raw.readings ADD COLUMN unit VARCHAR DEFAULT 'bpm'")
    con.execute(f"UPDATE {GROUP_HASH_TABLE} SET digest = 'x'")
    assert store.content_hash("raw.readings") == by_sql(con, "raw.readings", COLS + ', "unit"')


def test_a_read_only_store_hashes_without_remembering(store: Store, twin_home: Settings) -> None:
    expected = _check(store)
    _readings(store.con, "raw.readings", "telemetry/late.ndjson", 50)
    expected = by_sql(store.con, "raw.readings", COLS)
    before = _remembered(store)
    store.close()
    with Store.open(twin_home, read_only=True) as ro:
        assert ro.content_hash("raw.readings") == expected
    with Store.open(twin_home) as rw:
        assert _remembered(rw) == before  # the late file was digested, not remembered


def test_a_v2_store_with_recorded_versions_stays_v2(twin_home: Settings) -> None:
    """Schema 5 moves only a store with nothing recorded to v3: another's ledger names v2
    hashes."""
    with Store.open(twin_home) as store:
        store.con.execute(
            "CREATE TABLE raw.t AS SELECT 'f' AS source_file, range AS x FROM range(3)"
        )
        store.con.execute(
            "UPDATE governance.store_meta SET value = 'v2' WHERE key = 'content_hash_scheme'"
        )
        v2 = store.content_hash("raw.t")
        store.con.execute(
            "CREATE TABLE IF NOT EXISTS governance.table_version (table_name VARCHAR PRIMARY KEY, "
            "row_count BIGINT, content_hash VARCHAR, run_id VARCHAR)"
        )
        store.con.execute(f"INSERT INTO governance.table_version VALUES ('raw.t', 3, '{v2}', 'r')")
        store.con.execute(
            "UPDATE governance.store_meta SET value = '4' WHERE key = 'schema_version'"
        )
    with Store.open(twin_home) as store:
        assert store.schema_version() == SCHEMA_VERSION == 5
        assert store.content_hash_scheme() == "v2"
        assert store.content_hash("raw.t") == v2


@pytest.mark.parametrize(
    ("json_column", "copy_max_rows"), [(False, 10**9), (True, 10**9), (False, 100)]
)
def test_a_table_hashed_inside_the_transaction_that_wrote_it_hashes_as_committed(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch, json_column: bool, copy_max_rows: int
) -> None:
    """A step hashes what it wrote before its transaction commits: those rows are read through
    a copy (so the per-row digests run on every thread), except for a table with a JSON column
    or more rows than the copy is allowed. Either way the hash is the one the committed table
    gets, for a table hashed per file (v3) and one hashed whole (v2), and the one the SQL
    definition gives."""
    import twin_pipeline.store as store_module

    monkeypatch.setattr(store_module, "HASH_COPY_MAX_ROWS", copy_max_rows)
    extra = ", doc JSON" if json_column else ""
    doc = ", json_object('k', range)" if json_column else ""
    with Store.open(twin_home) as s:
        with s.transaction():
            s.con.execute(f"CREATE TABLE raw.per_file (source_file VARCHAR, n BIGINT{extra})")
            s.con.execute(f"CREATE TABLE raw.whole (n BIGINT, v DOUBLE{extra})")
            for k in range(3):
                s.con.execute(
                    f"INSERT INTO raw.per_file SELECT 'f{k}.ndjson', range{doc} FROM range(3000)"
                )
            s.con.execute(f"INSERT INTO raw.whole SELECT range, range / 7{doc} FROM range(5000)")
            inside = {t: s.content_hash(t) for t in ("raw.per_file", "raw.whole")}
        after = {t: s.content_hash(t, verify=True) for t in ("raw.per_file", "raw.whole")}
        assert inside == after
        cols = '"source_file", "n"' + (', CAST("doc" AS VARCHAR)' if json_column else "")
        assert inside["raw.per_file"] == by_sql(s.con, "raw.per_file", cols)
        digests = s.con.execute(
            "SELECT md5(json_array(n, v"
            + (", CAST(doc AS VARCHAR)" if json_column else "")
            + ")) AS h FROM raw.whole ORDER BY h"
        ).fetchall()
        assert (
            inside["raw.whole"]
            == hashlib.sha256("".join(h for (h,) in digests).encode()).hexdigest()
        )
