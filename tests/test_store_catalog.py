"""The store's catalog helpers (table_exists, columns) and the once-per-process schema check."""

from __future__ import annotations

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
