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
