"""Deterministic Parquet: the same rows in the same order give the same bytes.

:func:`copy_parquet` has DuckDB write the file itself with ``COPY (SELECT ...) TO ... (FORMAT
parquet, RETURN_STATS)``: no rows through Python. The caller runs it on a connection with one
DuckDB thread: a query that joins (every policy subquery with a row filter does) is written by
DuckDB's regular, order-keeping COPY, whose row order and row-group boundaries depend on the
thread count when there is more than one; with one thread they depend only on the rows and the
store's order. Parallelism comes from exporting several tables at once, one thread each.
Codec, level and row-group size are fixed (``policies/snapshot.yaml``); the Parquet footer
holds no write time, only the writer's ``created_by`` (DuckDB version, recorded in the
manifest).

``RETURN_STATS`` hands back the row count, the file size and per-column min/max/null counts
the writer computed anyway, so nothing re-reads the file for them; the sha256 is the one full
read, from the page cache right after the write (:func:`sha256_file`, which releases the GIL,
so it overlaps the next table's export).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from twin_pipeline.snapshot.config import ParquetSettings
from twin_pipeline.store import sql_literal


@dataclass
class WrittenFile:
    path: Path
    rows: int
    bytes: int
    sha256: str
    schema: list[dict[str, str]]  # [{"name", "type"}] as Arrow types
    # per column: {"min", "max", "null_count", ...} as DuckDB reports them (text)
    stats: dict[str, dict[str, str]] = field(default_factory=dict)


def _normalise_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_timestamp(t) and t.tz is not None:
        return pa.timestamp(t.unit, tz="UTC")
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    return t


def normalise_schema(schema: pa.Schema) -> pa.Schema:
    """Time-zone-aware timestamps as ``UTC`` (the instants are stored in UTC whatever zone the
    writer's session labels them with), large/view strings as strings."""
    return pa.schema(
        [pa.field(f.name, _normalise_type(f.type), f.nullable) for f in schema], metadata=None
    )


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def duckdb_writer_id() -> str:
    import duckdb

    return f"DuckDB {duckdb.__version__} COPY (FORMAT parquet)"


def copy_options(settings: ParquetSettings) -> list[str]:
    opts = [
        "FORMAT parquet",
        f"COMPRESSION {settings.compression}",
        f"ROW_GROUP_SIZE {int(settings.row_group_size)}",
    ]
    if settings.compression == "zstd" and settings.compression_level:
        opts.append(f"COMPRESSION_LEVEL {int(settings.compression_level)}")
    if settings.format_version == 2:
        opts.append("PARQUET_VERSION V2")
    return opts


def _column_stats(raw: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, stats in (raw or {}).items():
        key = name[1:-1].replace('""', '"') if name.startswith('"') else name
        out[key] = {str(k): str(v) for k, v in (stats or {}).items()}
    return out


def copy_parquet(
    con: Any, select_sql: str, params: Sequence[Any], path: Path, settings: ParquetSettings
) -> WrittenFile:
    """Have DuckDB write the rows of ``select_sql`` to ``path``; return rows, size, sha256,
    the file's Arrow schema and DuckDB's column statistics."""
    opts = [*copy_options(settings), "RETURN_STATS"]
    cur = con.execute(
        f"COPY ({select_sql}) TO {sql_literal(str(path))} ({', '.join(opts)})", list(params)
    )
    names = [d[0] for d in cur.description or []]
    row = cur.fetchone()
    info = dict(zip(names, row, strict=True)) if row else {}
    schema = normalise_schema(pq.read_schema(path))  # the footer only
    return WrittenFile(
        path=path,
        rows=int(info.get("count") or 0),
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        schema=[{"name": f.name, "type": str(f.type)} for f in schema],
        stats=_column_stats(info.get("column_statistics")),
    )
