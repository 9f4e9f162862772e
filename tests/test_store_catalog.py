"""The store's catalog helpers (table_exists, columns) and the once-per-process schema check."""

from __future__ import annotations

import duckdb
import pytest

from twin_pipeline.paths import Settings
from twin_pipeline.store import SCHEMA_VERSION, Store


def test_table_exists_probe(twin_home: Settings) -> None:
    with Store.open(twin_home) as store:
        with store.transaction() as con:
            con.execute('CREATE TABLE harmonized."odd ""name""" (x INTEGER)')
        assert store.table_exists("governance.store_meta")
        assert store.table_exists('harmonized.odd "name"')
        assert not store.table_exists("harmonized.nothing_here")
        assert not store.table_exists("no_such_schema.t")
        assert not store.table_exists("store_meta")  # not schema.table
        assert not store.table_exists("")
        # a probe for a missing table inside a transaction leaves the transaction usable
        with store.transaction() as con:
            con.execute("CREATE TABLE harmonized.t (x INTEGER)")
            assert not store.table_exists("harmonized.missing")
            con.execute("INSERT INTO harmonized.t VALUES (1), (2)")
        assert store.row_count("harmonized.t") == 2


def test_columns_match_the_catalog_for_every_type(twin_home: Settings) -> None:
    with Store.open(twin_home) as store:
        with store.transaction() as con:
            con.execute(
                "CREATE TABLE harmonized.typed (a VARCHAR, b DECIMAL(12, 3), c TIMESTAMP WITH "
                "TIME ZONE, d STRUCT(k VARCHAR, v DOUBLE[]), e INTEGER[], f BOOLEAN, g DATE, "
                "h BIGINT GENERATED ALWAYS AS (length(a)) VIRTUAL)"
            )
        for table in [*store.tables(("governance", "harmonized")), "harmonized.typed"]:
            schema, _, name = table.partition(".")
            want = store.con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
                "'twin' AND schema_name = ? AND table_name = ? ORDER BY column_index",
                [schema, name],
            ).fetchall()
            assert store.columns(table) == [tuple(r) for r in want], table
        assert store.columns("harmonized.typed")[1] == ("b", "DECIMAL(12,3)")
        assert store.columns("harmonized.nothing_here") == []
        assert store.columns("nodot") == []


def test_schema_check_runs_again_for_a_new_or_older_store_file(twin_home: Settings) -> None:
    Store.open(twin_home).close()
    Store.open(twin_home).close()  # the second open takes the short path
    # the file is replaced by a new one: its governance tables are created again
    twin_home.store_path.unlink()
    twin_home.store_path.with_name(twin_home.store_path.name + ".wal").unlink(missing_ok=True)
    with Store.open(twin_home) as store:
        assert store.table_exists("governance.quarantine")
        assert store.schema_version() == SCHEMA_VERSION
        with store.transaction() as con:
            con.execute(
                "UPDATE governance.store_meta SET value = ? WHERE key = 'schema_version'",
                [str(SCHEMA_VERSION - 1)],
            )
            con.execute("DELETE FROM governance.schema_migration")
    # an older version recorded in the file: the migrations run, as on a first open
    with Store.open(twin_home) as store:
        assert store.schema_version() == SCHEMA_VERSION
        migrated = store.con.execute(
            "SELECT version FROM governance.schema_migration ORDER BY 1"
        ).fetchall()
        assert migrated == [(SCHEMA_VERSION,)]


def test_create_table_as_keeps_values_and_stores_plain_columns_uncompressed(
    twin_home: Settings,
) -> None:
    """The table holds the query's rows, types and order; the named columns are stored
    uncompressed (DuckDB's storage info says so after a checkpoint), the others as DuckDB
    chooses; and the content hash is the same as for a plain CREATE TABLE AS."""
    query = (
        "SELECT md5(range::VARCHAR) AS lineage_key, 'ehr/a.ndjson' AS source_file, "
        "range AS n, range / 3.0 AS x FROM range(50000) ORDER BY n DESC"
    )
    with Store.open(twin_home) as store:
        with store.transaction():
            store.con.execute("CREATE TABLE harmonized.one AS SELECT 1 AS stale")
            store.create_table_as("harmonized.one", query, plain=("lineage_key",))
            store.con.execute(f"CREATE TABLE harmonized.two AS {query}")
        store.con.execute("CHECKPOINT")
        assert store.columns("harmonized.one") == store.columns("harmonized.two")
        assert (
            store.con.execute("SELECT * FROM harmonized.one LIMIT 3").fetchall()
            == store.con.execute("SELECT * FROM harmonized.two LIMIT 3").fetchall()
        )
        assert store.content_hash("harmonized.one") == store.content_hash("harmonized.two")
        kinds = dict(
            store.con.execute(
                "SELECT column_name, list(DISTINCT compression) FROM "
                "pragma_storage_info('twin.harmonized.one') WHERE segment_type <> 'VALIDITY' "
                "GROUP BY ALL"
            ).fetchall()
        )
        assert kinds["lineage_key"] == ["Uncompressed"]
        assert "Uncompressed" not in kinds["source_file"]


def _database_blocks(store: Store) -> int:
    """Blocks in use in the store file (``PRAGMA database_size``)."""
    row = store.con.execute("PRAGMA database_size").fetchall()
    return int(next(r[4] for r in row if r[0] == "twin"))


def test_compact_merges_row_groups_left_by_small_commits(twin_home: Settings) -> None:
    """Each committed append (then a checkpoint, as every store close makes) leaves a row group
    in a block of its own; ``compact`` rewrites such a table whole: same rows, same order, same
    content hash, same constraints and ledger chain, and the blocks come back."""
    from twin_pipeline import ledger

    for i in range(40):
        with Store.open(twin_home) as store:
            ledger.append(store, "probe", {"i": i, "text": "x" * 50})
            with store.transaction() as con:
                con.execute(
                    "CREATE TABLE IF NOT EXISTS governance.probe_log "
                    "(seq BIGINT PRIMARY KEY, note VARCHAR DEFAULT 'n', added TIMESTAMPTZ)"
                )
                con.execute(
                    f"INSERT INTO governance.probe_log (seq, added) VALUES ({39 - i}, now())"
                )
    with Store.open(twin_home) as store:
        store.con.execute("CREATE TABLE governance.few (x INTEGER PRIMARY KEY)")
        store.con.execute("INSERT INTO governance.few VALUES (1), (2)")
        assert store._row_groups("governance.ledger") >= 40
        before = {
            t: (
                store.content_hash(t),
                store.con.execute(f"SELECT * FROM {t}").fetchall(),  # in stored order
            )
            for t in ("governance.ledger", "governance.probe_log")
        }
        blocks = _database_blocks(store)
        done = store.compact()
        assert set(done) == {"governance.ledger", "governance.probe_log"}  # not "few"
        assert all(b >= 40 and a == 1 for b, a in done.values())
        for t, (digest, rows) in before.items():
            assert store.content_hash(t) == digest
            assert store.con.execute(f"SELECT * FROM {t}").fetchall() == rows
        assert ledger.verify(store).ok
        # the table is the one its DDL made: key and default still hold
        store.con.execute("INSERT INTO governance.probe_log (seq) VALUES (100)")
        assert store.con.execute(
            "SELECT note FROM governance.probe_log WHERE seq = 100"
        ).fetchall() == [("n",)]
        with pytest.raises(duckdb.ConstraintException):
            store.con.execute("INSERT INTO governance.probe_log (seq) VALUES (0)")
        assert store.compact() == {}  # nothing left to merge
    with Store.open(twin_home) as store:
        assert _database_blocks(store) < blocks - 40  # the 256 KB blocks are free again
        assert store._row_groups("governance.ledger") == 1


def test_compact_leaves_tables_with_generated_columns(twin_home: Settings) -> None:
    for i in range(35):
        with Store.open(twin_home) as store, store.transaction() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS governance.gen "
                "(x INTEGER PRIMARY KEY, y INTEGER GENERATED ALWAYS AS (x * 2) VIRTUAL)"
            )
            con.execute(f"INSERT INTO governance.gen (x) VALUES ({i})")
    with Store.open(twin_home) as store:
        assert store._row_groups("governance.gen") >= 32
        assert store.compact() == {}
        assert store.row_count("governance.gen") == 35
