"""Deterministic Parquet: the same rows in the same order give the same bytes.

:func:`copy_parquet` (what snapshots use) has DuckDB write the file itself with ``COPY (SELECT
... ORDER BY <total order>) TO ... (FORMAT parquet)``: parallel, no rows through Python. The
query's ORDER BY is a total order and DuckDB preserves it (``preserve_insertion_order``), with a
fixed codec, level and row-group size, so the bytes depend only on the rows and the DuckDB
version (recorded in the manifest as the writer), not on the thread count.

:func:`write_parquet` is the pyarrow writer: rows stream from DuckDB as Arrow record batches (bounded memory) and are re-cut into row groups
of exactly ``row_group_size`` rows (the last one shorter), with a fixed compression codec and
level, format version and statistics setting. Parquet footers carry no write time; the only
environment-dependent bytes are the writer's ``created_by`` string (pyarrow version), which the
manifest records. Time-zone-aware timestamps are normalised to ``UTC`` (DuckDB labels them with
the session's zone, which differs between machines, while the instants are the same).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from twin_pipeline.snapshot.config import ParquetSettings

PARQUET_VERSION = "2.6"


@dataclass
class WrittenFile:
    path: Path
    rows: int
    bytes: int
    sha256: str
    schema: list[dict[str, str]]  # [{"name", "type"}] as Arrow types


def writer_id() -> str:
    return f"pyarrow {pa.__version__} (parquet {PARQUET_VERSION})"


def _normalise_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_timestamp(t) and t.tz is not None:
        return pa.timestamp(t.unit, tz="UTC")
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    return t


def normalise_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [pa.field(f.name, _normalise_type(f.type), f.nullable) for f in schema], metadata=None
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(
    reader: pa.RecordBatchReader, path: Path, settings: ParquetSettings
) -> WrittenFile:
    """Write every batch of ``reader`` to ``path``; return rows, size and sha256."""
    schema = normalise_schema(reader.schema)
    group = settings.row_group_size
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    with pq.ParquetWriter(
        path,
        schema,
        compression=settings.compression,
        compression_level=settings.compression_level if settings.compression == "zstd" else None,
        version=PARQUET_VERSION,
        use_dictionary=True,
        write_statistics=True,
        store_schema=True,
    ) as writer:

        def flush(final: bool) -> None:
            nonlocal pending, pending_rows
            if not pending_rows:
                return
            table = pa.Table.from_batches(pending, schema=schema)
            full = (pending_rows // group) * group
            cut = pending_rows if final else full
            if cut:
                writer.write_table(table.slice(0, cut), row_group_size=group)
            rest = table.slice(cut)
            pending = rest.to_batches()
            pending_rows = rest.num_rows

        for batch in reader:
            if batch.num_rows == 0:
                continue
            if batch.schema != schema:
                batch = batch.cast(schema)
            pending.append(batch)
            pending_rows += batch.num_rows
            rows += batch.num_rows
            if pending_rows >= group:
                flush(final=False)
        flush(final=True)
    size = path.stat().st_size
    return WrittenFile(
        path=path,
        rows=rows,
        bytes=size,
        sha256=sha256_file(path),
        schema=[{"name": f.name, "type": str(f.type)} for f in schema],
    )


def duckdb_writer_id() -> str:
    import duckdb

    return f"DuckDB {duckdb.__version__} COPY (FORMAT parquet)"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def copy_parquet(
    con: Any, select_sql: str, params: Sequence[Any], path: Path, settings: ParquetSettings
) -> WrittenFile:
    """Have DuckDB write the rows of ``select_sql`` (which must end in a total ORDER BY) to
    ``path``; return rows, size, sha256 and the file's Arrow schema."""
    opts = [
        "FORMAT parquet",
        f"COMPRESSION {settings.compression}",
        f"ROW_GROUP_SIZE {int(settings.row_group_size)}",
    ]
    if settings.compression == "zstd" and settings.compression_level:
        opts.append(f"COMPRESSION_LEVEL {int(settings.compression_level)}")
    row = con.execute(
        f"COPY ({select_sql}) TO {_sql_text(str(path))} ({', '.join(opts)})", list(params)
    ).fetchone()
    rows = int(row[0]) if row else 0
    schema = normalise_schema(pq.read_schema(path))
    return WrittenFile(
        path=path,
        rows=rows,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        schema=[{"name": f.name, "type": str(f.type)} for f in schema],
    )
