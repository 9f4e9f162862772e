"""Bedside-monitor readings as NDJSON/JSON Lines or CSV (kind ``telemetry``).

Files under ``telemetry/`` with fields ``device_id``, ``patient_id`` (FHIR id, optional),
``metric`` (MDC or LOINC code or alias from ``assets/telemetry.yaml``), ``value``, ``unit``
(UCUM) and ``ts`` (ISO-8601; without an offset it is read in the spec's default time zone).

Two paths, same result (a test holds them equal):

- **Batch** (plain UTF-8 files, the common case): DuckDB's strict JSON-lines reader (or its CSV
  reader, one file at a time) parses a batch of files at once, in a private in-memory DuckDB, and
  checks every reading once. When the batch has exactly one row per line, a line number is a row
  offset; files whose every line is a good reading go to ``raw.telemetry_reading`` in one
  statement. Everything else falls through to the line-by-line path.
- **Line by line**: lines are read with ``read_csv`` on a delimiter that cannot occur in valid
  JSON and numbered by insertion order (a file with carriage returns is split exactly with
  ``read_text``; a file that is not all UTF-8 is split in Python), parsed with
  ``json_transform`` and checked into a scratch table. Bad lines (unparseable, missing field,
  bad value, bad timestamp, unknown metric) go to quarantine with their line number, reason and
  text. Raw rows land in ``raw.telemetry_reading``, a table the HL7 v2 and WFDB readers share
  (column ``source_kind`` says which reader wrote a row).

Keys: a line's ``lineage_key`` is :func:`twin_pipeline.store.position_lineage_key` (the file's
sha256 prefix and ``line:N``). ``position`` and ``lineage_key`` are virtual columns computed from
``key_prefix`` (one per file version) and ``line``: writing two unique strings per reading cost
more than the rest of the row. Its ``record_hash`` is left NULL: the record is the line at that
position of the registered file version, whose sha256 covers it; ``twin lineage trace`` re-reads
the line and hashes it when a trace needs it, and a changed line shows as a changed file. For
the same reason the timestamp text as received (``ts_text``) is kept only for HL7 v2 and WFDB
readings. Quarantined lines carry the same kind of key and the line as received.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twin_pipeline.harmonize.telemetry_config import TelemetrySpec, load_telemetry_spec
from twin_pipeline.sources import FileStats, LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import (
    BATCH,
    QuarantineRow,
    Store,
    execute_over,
    lineage_key,
    memory_limit,
    position_lineage_key,
    sql_literal,
)

RAW_TABLE = "raw.telemetry_reading"
# A reading's ``position`` and ``lineage_key`` are virtual columns: for a line of a telemetry
# file they are computed from the line number and the file's key prefix (no unique string is
# written per reading: writing two of them cost more than the rest of the row); readings of
# other feeds (HL7 v2, WFDB) carry both explicitly in ``position_text`` / ``lineage_key_text``.
KEY_COLUMNS_DDL = """
    key_prefix VARCHAR,       -- the source file version's lineage-key prefix (sha256 prefix + /)
    line BIGINT,              -- line number in the file (telemetry files)
    position_text VARCHAR,    -- position when it is not a line (HL7 v2 entry/segment, WFDB sample)
    lineage_key_text VARCHAR, -- key when it is not prefix + position (HL7 v2, WFDB)
    position VARCHAR GENERATED ALWAYS AS (coalesce(position_text, 'line:' || line)) VIRTUAL,
    lineage_key VARCHAR GENERATED ALWAYS AS
        (coalesce(lineage_key_text, key_prefix || coalesce(position_text, 'line:' || line)))
        VIRTUAL
"""
RAW_DDL = f"""
CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
    source_file VARCHAR,
    record_hash VARCHAR,
    source_kind VARCHAR,      -- telemetry | hl7v2 | wfdb
    device_id VARCHAR,
    patient_id VARCHAR,       -- FHIR Patient id when the feed knows it
    patient_mrn VARCHAR,      -- medical record number (HL7 PID-3) when that is what it knows
    metric VARCHAR,           -- code as received
    value DOUBLE,             -- value as received (unit as received)
    unit VARCHAR,
    ts TIMESTAMPTZ,           -- the instant (offset applied, or the default time zone)
    ts_text VARCHAR,          -- timestamp as received (HL7 v2, WFDB; a file line holds its own)
    {KEY_COLUMNS_DDL}
)
"""
FIELDS = ("device_id", "patient_id", "metric", "value", "unit", "ts")
REQUIRED = ("device_id", "metric", "value", "unit", "ts")
_EXT = re.compile(r"\.(ndjson|jsonl|csv)$", re.IGNORECASE)

# SQL for the same key as twin_pipeline.store.quarantine_id.
QUARANTINE_ID_SQL = (
    "substr(sha256({stage} || chr(31) || {table} || chr(31) || {file} || chr(31) || {pos} "
    "|| chr(31) || {rule}), 1, 24)"
)


def ensure_raw_table(store: Store) -> None:
    store.con.execute(RAW_DDL)


def vocabulary_table(store: Store, spec: TelemetrySpec, name: str = "_tele_alias") -> str:
    """A temp table (alias VARCHAR upper case, metric VARCHAR) of every accepted metric code."""
    store.con.execute(f"CREATE OR REPLACE TEMP TABLE {name} (alias VARCHAR, metric VARCHAR)")
    store.con.executemany(f"INSERT INTO {name} VALUES (?, ?)", list(spec.alias_map().items()))
    return name


@dataclass
class ReadingRow:
    """One reading produced in Python (HL7 v2, WFDB, quoted CSV)."""

    source_file: str
    file_sha256: str
    position: str
    record_hash: str
    source_kind: str
    device_id: str | None
    patient_id: str | None
    patient_mrn: str | None
    metric: str
    value: float
    unit: str | None
    ts: datetime
    ts_text: str | None


_ARROW_SCHEMA = pa.schema(
    [
        ("lineage_key_text", pa.string()),
        ("source_file", pa.string()),
        ("position_text", pa.string()),
        ("record_hash", pa.string()),
        ("source_kind", pa.string()),
        ("device_id", pa.string()),
        ("patient_id", pa.string()),
        ("patient_mrn", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("unit", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("ts_text", pa.string()),
    ]
)


def insert_readings(store: Store, rows: Iterable[ReadingRow]) -> int:
    """Append Python-made readings to ``raw.telemetry_reading`` through one Arrow batch."""
    cols: dict[str, list[object]] = {f.name: [] for f in _ARROW_SCHEMA}
    n = 0
    for r in rows:
        cols["lineage_key_text"].append(lineage_key(r.file_sha256, r.position, r.record_hash))
        cols["source_file"].append(r.source_file)
        cols["position_text"].append(r.position)
        cols["record_hash"].append(r.record_hash)
        cols["source_kind"].append(r.source_kind)
        cols["device_id"].append(r.device_id)
        cols["patient_id"].append(r.patient_id)
        cols["patient_mrn"].append(r.patient_mrn)
        cols["metric"].append(r.metric)
        cols["value"].append(r.value)
        cols["unit"].append(r.unit)
        cols["ts"].append(r.ts)
        cols["ts_text"].append(r.ts_text)
        n += 1
    if not n:
        return 0
    batch = pa.table(cols, schema=_ARROW_SCHEMA)
    store.insert_arrow(RAW_TABLE, batch, by_name=True)
    return n


@register
class TelemetryReader(SourceReader):
    kind = "telemetry"
    raw_tables = (RAW_TABLE,)

    def matches(self, rel: str) -> bool:
        parts = rel.split("/")
        return "telemetry" in parts[:-1] and bool(_EXT.search(rel))

    def ensure_tables(self, store: Store) -> None:
        ensure_raw_table(store)

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        stats = LoadStats(self.kind)
        ensure_raw_table(store)
        if not files:
            return stats
        spec = load_telemetry_spec()
        vocabulary_table(store, spec)
        con = store.con
        prev_tz = con.execute("SELECT current_setting('TimeZone')").fetchone()
        con.execute(f"SET TimeZone = '{spec.default_timezone}'")
        try:
            checks = {f.rel: inspect_file(f.path) for f in files}
            batchable: list[SourceFile] = []
            slow: list[SourceFile] = []
            for f in files:
                (batchable if BATCH_READ and _batchable(f, checks[f.rel]) else slow).append(f)
            if batchable:
                known = {alias.upper() for alias in spec.alias_map()}
                with _parser(spec.default_timezone) as parser:
                    for batch in _batches(batchable):
                        slow += _load_batch(store, parser, known, batch, checks, stats)
            for f in sorted(slow, key=lambda f: f.rel):
                _load_file(store, f, stats.file(f.rel), checks[f.rel])
                con.execute("DROP VIEW IF EXISTS _tele_one")
                for table in ("_tele_raw", "_tele_py", "_tele_lines", "_tele_cls", "_tele_unknown"):
                    con.execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            if prev_tz:
                with contextlib.suppress(duckdb.Error):
                    con.execute(f"SET TimeZone = '{prev_tz[0]}'")
        return stats


_STRUCT = "{" + ",".join(f'"{c}":"VARCHAR"' for c in FIELDS) + "}"
_JSON_PARSE_SQL = f"""
    SELECT n, line, j.device_id, j.patient_id, j.metric, j.value, j.unit, j.ts,
           j IS NOT NULL AS parsed
    FROM (SELECT n, line, try(json_transform(line, '{_STRUCT}')) AS j FROM ({{src}}))
"""
# A required field is missing when absent or blank. A value or instant that casts is not
# blank, so those two are trimmed only when their cast fails (the casts skip surrounding
# spaces themselves; the instant is cast again trimmed when the plain cast fails).
_MISSING = (
    "coalesce(device_id_trim, '') = '' OR coalesce(metric_trim, '') = '' "
    "OR coalesce(unit_trim, '') = '' "
    "OR (value_d IS NULL AND coalesce(trim(value), '') = '') "
    "OR (ts_t IS NULL AND coalesce(trim(ts), '') = '')"
)
# Every parsed line with its rule (NULL: a good reading, unless its metric code is unknown) and
# its typed, trimmed fields, each expression computed once. The instant is read in the session
# time zone, set to the spec's default for the load. A blank line is never a good reading (it
# does not parse). Metric codes are checked afterwards, once per distinct code (the check is
# the last rule, so it applies only where this one is NULL).


def _trim(col: str) -> str:
    """``trim(col)``, only where there is something to trim (``trim`` copies every string)."""
    return f"CASE WHEN starts_with({col}, ' ') OR ends_with({col}, ' ') THEN trim({col}) ELSE {col} END"


_CLASSIFIED_SQL = f"""
    SELECT n{{extra}}, rule, device_id_trim AS device_id, nullif(patient_id_trim, '') AS patient_id,
           metric_trim AS metric, value_d, unit_trim AS unit, ts_t, ts
    FROM (
        SELECT t.*, CASE
                 WHEN NOT t.parsed THEN 'broken_record'
                 WHEN {_MISSING} THEN 'missing_required'
                 WHEN value_d IS NULL OR isnan(value_d) THEN 'bad_value'
                 WHEN ts_t IS NULL THEN 'bad_timestamp'
               END AS rule
        FROM (
            SELECT n{{extra}}, parsed, ts, value, {_trim("device_id")} AS device_id_trim,
                   {_trim("patient_id")} AS patient_id_trim, {_trim("metric")} AS metric_trim,
                   {_trim("unit")} AS unit_trim, try_cast(value AS DOUBLE) AS value_d,
                   coalesce(try_cast(ts AS TIMESTAMPTZ), try_cast(trim(ts) AS TIMESTAMPTZ)) AS ts_t
            FROM ({{parsed}})
        ) t
    )
"""
_REASON_SQL = (
    "source_file || ' [' || position || ']: ' || CASE rule "
    "WHEN 'broken_record' THEN 'line is not a valid record' "
    "WHEN 'missing_required' THEN 'a required field (device_id, metric, value, unit, ts) "
    "is missing' "
    "WHEN 'bad_value' THEN 'value is missing or not a number' "
    "WHEN 'bad_timestamp' THEN 'timestamp ' || coalesce(ts, '') || ' cannot be read' "
    "WHEN 'unknown_metric' THEN 'metric ' || coalesce(metric, '') || "
    "' is not in the telemetry vocabulary' END"
)


# Files parsed together by one ``read_json`` (bounded by bytes: the checked rows of a batch
# sit in one temporary table).
BATCH_BYTES = int(os.environ.get("TWIN_TELEMETRY_BATCH_BYTES", str(128 << 20)))
# The batch path can be switched off (``TWIN_TELEMETRY_BATCH=0``): every file line by line.
BATCH_READ = os.environ.get("TWIN_TELEMETRY_BATCH", "1") != "0"
_VARCHAR_COLUMNS = "{" + ", ".join(f"'{c}': 'VARCHAR'" for c in FIELDS) + "}"


def _batchable(f: SourceFile, check: FileCheck) -> bool:
    """A file the batch path may take: plain UTF-8 JSON lines with at least one line."""
    return (
        check.utf8
        and not check.special
        and not check.bom
        and not check.wide_bom
        and check.lines > (1 if _is_csv(f) else 0)
    )


def _is_csv(f: SourceFile) -> bool:
    return f.rel.lower().endswith(".csv")


def _csv_header(f: SourceFile) -> list[str] | None:
    """The field names of a CSV file's first line (lower case), or None if it is not a plain
    header of distinct names."""
    with f.path.open(encoding="utf-8", newline="") as fh:
        first = fh.readline().rstrip("\n")
    try:
        names = [h.strip().lower() for h in next(csv.reader([first]), [])]
    except csv.Error:
        return None
    if not names or len(set(names)) != len(names) or any(not n for n in names):
        return None
    return names


def _batches(files: Sequence[SourceFile]) -> Iterable[list[SourceFile]]:
    batch: list[SourceFile] = []
    size = 0
    for f in sorted(files, key=lambda f: f.rel):
        if _is_csv(f):  # a CSV file has its own header: a batch of its own
            yield [f]
            continue
        if batch and size + f.size > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        yield batch


@contextlib.contextmanager
def _parser(timezone: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A private in-memory DuckDB that only parses files: a statement that fails there (the
    strict JSON reader rejecting a line) leaves the store's transaction untouched."""
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{memory_limit()}'")
        con.execute(f"SET TimeZone = '{timezone}'")
        yield con
    finally:
        con.close()


def _load_batch(
    store: Store,
    parser: duckdb.DuckDBPyConnection,
    known: set[str],
    files: list[SourceFile],
    checks: dict[str, FileCheck],
    stats: LoadStats,
) -> list[SourceFile]:
    """The common case, clean JSON-lines files, in one pass: DuckDB's own strict
    newline-delimited JSON reader parses every file of the batch at once (all fields as text)
    and each reading is checked once, into one Arrow table. The reader keeps the files' order
    and each file's line order, never makes two rows of one line and skips only blank lines:
    when the batch has as many rows as its files have lines, every file has exactly one row per
    line, so a line number is a row offset (nothing per row is parsed or stored for it but an
    integer). The files whose every line is a good reading are appended to raw in one
    statement. Any other file (a bad line, an unknown metric code, a blank line), or the whole
    batch when the strict reader rejects a line, goes back to the caller for the line-by-line
    path, which quarantines exactly the bad lines; a batch of several files that does not load
    as one is retried one file at a time."""
    paths = "[" + ", ".join(sql_literal(str(f.path)) for f in files) + "]"
    # Rows each file must give, and the line of its first row.
    lines = [checks[f.rel].lines for f in files]
    first_line = [1] * len(files)
    if len(files) == 1 and _is_csv(files[0]):
        names = _csv_header(files[0])
        if names is None:
            return files
        columns = "{" + ", ".join(f"{sql_literal(n)}: 'VARCHAR'" for n in names) + "}"
        fields = ", ".join(f'"{c}"' if c in names else f"NULL AS {c}" for c in FIELDS)
        parsed = (
            f"SELECT NULL::BIGINT AS n, {fields}, true AS parsed FROM read_csv({paths}, "
            f"header=true, columns={columns}, delim=',', quote='\"', escape='\"', "
            "auto_detect=false, strict_mode=true, null_padding=false)"
        )
        lines, first_line = [lines[0] - 1], [2]
    else:
        parsed = (
            "SELECT NULL::BIGINT AS n, device_id, patient_id, metric, value, unit, ts, "
            f"true AS parsed FROM read_json({paths}, format='newline_delimited', "
            f"columns={_VARCHAR_COLUMNS})"
        )
    sql = _CLASSIFIED_SQL.replace("{parsed}", parsed).replace("{extra}", "")
    try:
        # Checked into a table first (both threads; an ordered result fetched straight to Arrow
        # is built by one), then handed over as Arrow.
        parser.execute(
            "CREATE OR REPLACE TEMP TABLE _tele_cls AS SELECT rule, device_id, patient_id, "
            f"metric, value_d, unit, ts_t FROM ({sql})"
        )
        cls = parser.execute("SELECT * FROM _tele_cls").fetch_arrow_table()
    except duckdb.Error:  # a line the strict reader rejects: find its file
        return _retry_singly(store, parser, known, files, checks, stats)
    finally:
        parser.execute("DROP TABLE IF EXISTS _tele_cls")
    if cls.num_rows != sum(lines):
        return _retry_singly(store, parser, known, files, checks, stats)
    # Rows with a rule, or with a metric code outside the vocabulary, make their file dirty.
    metric = cls.column("metric")
    codes = pc.unique(metric).to_pylist()
    unknown = [c for c in codes if c is not None and c.upper() not in known]
    bad = pc.is_valid(cls.column("rule"))
    if unknown:
        bad = pc.or_(bad, pc.is_in(metric, value_set=pa.array(unknown, pa.string())))
    bad_rows = pc.indices_nonzero(pc.fill_null(bad, False)).to_numpy()
    ends = np.cumsum(lines)
    dirty = {files[int(k)].rel for k in np.unique(np.searchsorted(ends, bad_rows, side="right"))}
    keep = [k for k, f in enumerate(files) if f.rel not in dirty]
    if keep:
        starts = ends - np.asarray(lines)
        take = np.concatenate([np.arange(starts[k], ends[k]) for k in keep])
        file_no = np.concatenate([np.full(lines[k], i, np.int32) for i, k in enumerate(keep)])
        line_no = np.concatenate([np.arange(first_line[k], first_line[k] + lines[k]) for k in keep])
        good = cls if len(keep) == len(files) else cls.take(pa.array(take))
        rels = pa.array([files[k].rel for k in keep], pa.string())
        prefixes = pa.array([position_lineage_key(files[k].sha256, "") for k in keep], pa.string())
        batch = pa.table(
            {
                "source_file": pa.DictionaryArray.from_arrays(pa.array(file_no), rels),
                "key_prefix": pa.DictionaryArray.from_arrays(pa.array(file_no), prefixes),
                "line": pa.array(line_no, pa.int64()),
                "device_id": good.column("device_id"),
                "patient_id": good.column("patient_id"),
                "metric": good.column("metric"),
                "value": good.column("value_d"),
                "unit": good.column("unit"),
                "ts": good.column("ts_t"),
                "source_kind": pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(len(line_no), np.int32)), pa.array(["telemetry"])
                ),
            }
        )
        with store.unordered():  # every row carries its own line number
            store.insert_arrow(RAW_TABLE, batch, by_name=True)
        for k in keep:
            fs = stats.file(files[k].rel)
            fs.records_in += lines[k]
            fs.loaded += lines[k]
    return [f for f in files if f.rel in dirty]


def _retry_singly(
    store: Store,
    parser: duckdb.DuckDBPyConnection,
    known: set[str],
    files: list[SourceFile],
    checks: dict[str, FileCheck],
    stats: LoadStats,
) -> list[SourceFile]:
    """A batch of several files that did not load as one: each file as its own batch."""
    if len(files) == 1:
        return files
    slow: list[SourceFile] = []
    for f in files:
        slow += _load_batch(store, parser, known, [f], checks, stats)
    return slow


def _load_file(store: Store, f: SourceFile, fs: FileStats, check: FileCheck) -> None:
    """Load one file line by line: every line parsed and checked once into ``_tele_cls`` (no
    filter under the parse: DuckDB would re-evaluate the JSON transform per field), good lines
    into raw; bad lines, only if the file has any, into quarantine."""
    con = store.con
    if check.wide_bom:
        fs.records_in += 1
        fs.quarantined += store.quarantine([_file_quarantine(f, check.wide_bom)])
        return
    bad = 0
    path = str(f.path).replace("'", "''")
    is_csv = _is_csv(f)
    read_lines = (
        f"read_csv('{path}', columns={{'line': 'VARCHAR'}}, delim=chr(31), quote='', "
        "escape='', header=false, auto_detect=false, strict_mode=false)"
    )
    # The common case, plain UTF-8 JSON lines, is parsed straight from the file; the checked
    # rows keep the file's line order (insertion order is preserved), so their rowid offset is
    # the line number (blank lines are kept as NULL rows).
    direct = check.utf8 and not check.special and not check.bom and not is_csv
    # ``src``: every line (blank ones too) with its true 1-based number ``n``.
    if direct:
        src = f"SELECT NULL::BIGINT AS n, line FROM {read_lines}"
    elif not check.utf8:
        bad = _stage_lines_python(store, f)
        src = "SELECT n, line FROM _tele_lines"
    elif check.special:
        # Exact split (slower): read_csv treats a lone CR as a line break.
        src = f"""
            SELECT n, rtrim(line, chr(13)) AS line FROM (
                SELECT unnest(l) AS line, unnest(range(1, len(l) + 1)) AS n
                FROM (SELECT string_split(content, chr(10)) AS l FROM read_text('{path}')))
        """
    else:
        src = _staged_lines(con, read_lines)
    if check.bom:  # a UTF-8 byte-order mark on the first line is not part of the record
        src = f"""
            SELECT n, CASE WHEN n = 1 THEN ltrim(line, chr(65279)) ELSE line END AS line
            FROM ({src})
        """
    fs.records_in += bad
    fs.quarantined += bad
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW _tele_one AS
        SELECT n, line FROM ({src}) WHERE line IS NOT NULL AND trim(line) <> ''
        """
    )
    parsed = _csv_parse_sql(con, f, src) if is_csv else _JSON_PARSE_SQL.replace("{src}", src)
    if not parsed:
        return
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _tele_cls AS "
        + _CLASSIFIED_SQL.replace("{parsed}", parsed).replace("{extra}", "")
    )
    n = "n"
    if direct:
        (first,) = con.execute("SELECT coalesce(min(rowid), 0) FROM _tele_cls").fetchone() or (0,)
        n = f"(rowid - {int(first) - 1})"
    # Metric codes not in the vocabulary, looked up once per distinct code received.
    # (Two statements: as one, the optimizer would run upper() on every row before DISTINCT.)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _tele_unknown AS "
        "SELECT DISTINCT metric FROM _tele_cls WHERE rule IS NULL"
    )
    con.execute("DELETE FROM _tele_unknown WHERE upper(metric) IN (SELECT alias FROM _tele_alias)")
    (n_unknown,) = con.execute("SELECT count(*) FROM _tele_unknown").fetchone() or (0,)
    known = " AND metric NOT IN (SELECT metric FROM _tele_unknown)" if n_unknown else ""
    prefix = sql_literal(position_lineage_key(f.sha256, ""))
    row = con.execute(
        f"""
        INSERT INTO {RAW_TABLE} BY NAME
        SELECT {sql_literal(f.rel)} AS source_file, 'telemetry' AS source_kind, device_id,
               patient_id, metric, value_d AS value, unit, ts_t AS ts,
               {prefix} AS key_prefix, {n} AS line
        FROM _tele_cls WHERE rule IS NULL{known}
        """
    ).fetchone()
    loaded = int(row[0]) if row else 0
    fs.records_in += loaded
    fs.loaded += loaded
    # Clean file: every line (the CSV header aside) became a raw row; nothing to quarantine.
    if bad == 0 and loaded == check.lines - (1 if is_csv else 0):
        return
    if direct:  # the lines themselves are needed now, for the quarantine payloads
        src = _staged_lines(con, read_lines)
    qid = QUARANTINE_ID_SQL.format(
        stage="'read'", table=f"'{RAW_TABLE}'", file="source_file", pos="position", rule="rule"
    )
    rule = "coalesce(c.rule, 'unknown_metric')" if n_unknown else "c.rule"
    bad_rows = "c.rule IS NOT NULL" + (
        " OR c.metric IN (SELECT metric FROM _tele_unknown)" if n_unknown else ""
    )
    # Blank lines are not records: they fail to parse but are neither loaded nor quarantined.
    # The line itself (the payload) is read again from ``src``: the checked rows do not carry it.
    row = con.execute(
        f"""
        INSERT INTO governance.quarantine
        SELECT {qid}, ?, 'read', '{RAW_TABLE}', 'telemetry', source_file, position, rule,
               {_REASON_SQL}, line, {prefix} || position, now()
        FROM (SELECT c.* REPLACE ({rule} AS rule), s.line, {sql_literal(f.rel)} AS source_file,
                     'line:' || s.n AS position
              FROM (SELECT *, {n} AS n_ FROM _tele_cls) c JOIN ({src}) s ON s.n = c.n_
              WHERE ({bad_rows}) AND s.line IS NOT NULL AND trim(s.line) <> '')
        """,
        [store.run_id],
    ).fetchone()
    quarantined = int(row[0]) if row else 0
    fs.records_in += quarantined
    fs.quarantined += quarantined


def _staged_lines(con: duckdb.DuckDBPyConnection, read_lines: str) -> str:
    """Copy a file's lines into ``_tele_raw``; a SELECT of ``(n, line)`` over it."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE _tele_raw AS SELECT line FROM {read_lines}")
    # Insertion order is preserved, so the rowid offset is the line number (blank lines are
    # kept as NULL rows; rowids of a table made inside a transaction do not start at 0).
    (first,) = con.execute("SELECT coalesce(min(rowid), 0) FROM _tele_raw").fetchone() or (0,)
    return f"SELECT rowid - {int(first) - 1} AS n, line FROM _tele_raw"


def _file_quarantine(f: SourceFile, encoding: str) -> QuarantineRow:
    """A UTF-16/32 file: one quarantined record (``file``) naming the encoding."""
    return QuarantineRow(
        stage="read",
        table_name=RAW_TABLE,
        source_kind="telemetry",
        source_file=f.rel,
        position="file",
        rule="bad_encoding",
        reason=f"{f.rel} [file]: not UTF-8 text: the file is {encoding} encoded "
        "(byte-order mark); telemetry files must be UTF-8",
        lineage_key=position_lineage_key(f.sha256, "file"),
    )


@dataclass(frozen=True)
class FileCheck:
    """What one pass over a telemetry file found."""

    special: bool  # a carriage return or unit separator (needs the exact line split)
    utf8: bool  # the whole file is valid UTF-8
    wide_bom: str | None  # "UTF-16" / "UTF-32" when the file starts with such a byte-order mark
    lines: int = 0  # lines split at LF (a last line without LF counts; an empty file has 0)
    bom: bool = False  # starts with a UTF-8 byte-order mark


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def inspect_file(path: Path, chunk: int = 1 << 20) -> FileCheck:
    """One chunked pass: line-break oddities, UTF-8 validity, a UTF-16/32 byte-order mark and
    the number of lines."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    special, utf8, wide, bom = False, True, None, False
    newlines, last = 0, b"\n"
    with path.open("rb") as fh:
        first = True
        while block := fh.read(chunk):
            if first:
                wide = next((name for mark, name in _WIDE_BOMS if block.startswith(mark)), None)
                bom = block.startswith(codecs.BOM_UTF8)
                first = False
            if not special and (b"\r" in block or b"\x1f" in block):
                special = True
            newlines += block.count(b"\n")
            last = block[-1:]
            # ASCII needs no decoding unless a multi-byte sequence is pending from the last block
            if utf8 and not (block.isascii() and not decoder.getstate()[0]):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    utf8 = False
    if utf8:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8 = False
    return FileCheck(special, utf8, wide, newlines + (last != b"\n"), bom)


def _stage_lines_python(store: Store, f: SourceFile) -> int:
    """``_tele_lines(n, line)`` from a file that is not all UTF-8: each line decoded on its own;
    a line that is not UTF-8 is quarantined as ``bad_encoding``, the others are parsed like any
    line. Returns the number of lines quarantined."""
    good_n: list[int] = []
    good: list[str] = []
    bad: list[QuarantineRow] = []
    for n, raw in enumerate(f.path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            position = f"line:{n}"
            bad.append(
                QuarantineRow(
                    stage="read",
                    table_name=RAW_TABLE,
                    source_kind="telemetry",
                    source_file=f.rel,
                    position=position,
                    rule="bad_encoding",
                    reason=f"{f.rel} [{position}]: not UTF-8 text: invalid byte at offset "
                    f"{exc.start} of the line",
                    payload=raw.decode("utf-8", "backslashreplace"),
                    lineage_key=position_lineage_key(f.sha256, position),
                )
            )
            continue
        good_n.append(n)
        good.append(text)
    batch = pa.table({"n": pa.array(good_n, pa.int64()), "line": pa.array(good, pa.string())})
    con = store.con
    execute_over(con, f"CREATE OR REPLACE TEMP TABLE _tele_lines AS SELECT * FROM {BATCH}", batch)
    return store.quarantine(bad)


def _csv_parse_sql(con: duckdb.DuckDBPyConnection, f: SourceFile, src: str) -> str | None:
    """A SELECT over the lines ``src`` parsing CSV rows (the first non-blank line, the header,
    names the fields)."""
    # The header is nearly always line 1; otherwise the first non-blank line.
    head = con.execute("SELECT n, line FROM _tele_one WHERE n = 1").fetchone()
    if head is None:
        head = con.execute("SELECT n, line FROM _tele_one ORDER BY n LIMIT 1").fetchone()
    if head is None:
        return None
    header_n, header = int(head[0]), str(head[1])
    try:
        names = [h.strip().lower() for h in next(csv.reader([header]), [])]
    except csv.Error:
        names = []
    idx = {name: names.index(name) for name in FIELDS if name in names}
    width = len(names)
    quoted = con.execute(
        "SELECT count(*) FROM _tele_one WHERE contains(line, '\"') AND n <> ?", [header_n]
    ).fetchone()
    if quoted and quoted[0]:
        rows = con.execute(
            "SELECT n, line FROM _tele_one WHERE n <> ? ORDER BY n", [header_n]
        ).fetchall()
        out = []
        for n, line in rows:
            try:
                vals = next(csv.reader(io.StringIO(line)))
            except (csv.Error, StopIteration):
                vals = []
            ok = len(vals) == width
            out.append(
                (n, line, *((vals[idx[c]] if ok and c in idx else None) for c in FIELDS), ok)
            )
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _tele_py (n BIGINT, line VARCHAR, device_id VARCHAR, "
            "patient_id VARCHAR, metric VARCHAR, value VARCHAR, unit VARCHAR, ts VARCHAR, "
            "parsed BOOLEAN)"
        )
        con.executemany("INSERT INTO _tele_py VALUES (?,?,?,?,?,?,?,?,?)", out)
        return "SELECT * FROM _tele_py"

    def col(c: str) -> str:
        return f"nullif(trim(p[{idx[c] + 1}]), '') AS {c}" if c in idx else f"NULL AS {c}"

    return f"""
        SELECT n, line, {", ".join(col(c) for c in FIELDS)}, len(p) = {width} AS parsed
        FROM (SELECT n, line, string_split(line, ',') AS p FROM ({src}) WHERE n <> {header_n})
    """
