"""The store's tables and columns as the quality checks see them, read once per check step.

Suites ask the catalog the same questions over and over (does the table exist, what are its
columns, which raw tables carry lineage); one query answers them all for a step instead of a
catalog query per expectation. Valid while no table is created, dropped or altered, which
holds for the quality step (it only deletes rows and writes ``governance`` tables).
"""

from __future__ import annotations

from twin_pipeline.store import CATALOG, Store


class Catalog:
    """Columns per ``schema.table`` of the store's tables, snapshotted at construction."""

    def __init__(self, store: Store) -> None:
        rows = store.con.execute(
            "SELECT c.schema_name || '.' || c.table_name, c.column_name, c.data_type "
            "FROM duckdb_columns() c JOIN duckdb_tables() t USING (table_oid) "
            "WHERE c.database_name = ? ORDER BY 1, c.column_index",
            [CATALOG],
        ).fetchall()
        self._columns: dict[str, list[tuple[str, str]]] = {}
        for table, column, dtype in rows:
            self._columns.setdefault(str(table), []).append((str(column), str(dtype)))
        self._raw_lookup: str | None = None

    def exists(self, table: str) -> bool:
        return table in self._columns

    def columns(self, table: str) -> list[tuple[str, str]]:
        """``(column, DuckDB type)`` in table order; empty for a missing table."""
        return list(self._columns.get(table, []))

    def column_names(self, table: str) -> set[str]:
        return {c for c, _ in self._columns.get(table, [])}

    def raw_lookup_sql(self) -> str:
        """UNION of (lineage_key, source_file, position) over every raw table that has them."""
        if self._raw_lookup is None:
            need = {"lineage_key", "source_file", "position"}
            self._raw_lookup = " UNION ALL ".join(
                f"SELECT lineage_key, source_file, position FROM {t}"
                for t in sorted(self._columns)
                if t.startswith("raw.") and need <= self.column_names(t)
            )
        return self._raw_lookup
