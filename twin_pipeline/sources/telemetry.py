"""Bedside-monitor readings as NDJSON/JSON Lines or CSV (kind ``telemetry``).

Files under ``telemetry/`` with fields ``device_id``, ``patient_id`` (FHIR id, optional),
``metric`` (MDC or LOINC code or alias from ``assets/telemetry.yaml``), ``value``, ``unit``
(UCUM) and ``ts`` (ISO-8601; without an offset it is read in the spec's default time zone).

The whole file is parsed in DuckDB (no per-line Python): lines are read with ``read_csv`` on a
delimiter that cannot occur in valid JSON and numbered by insertion order; a file with carriage
returns is split exactly with ``read_text`` instead, so positions are always true line numbers.
Bad lines (unparseable, missing field, bad value, bad timestamp, unknown metric) go to
quarantine with their line number. Raw rows land in ``raw.telemetry_reading``, a table the HL7 v2
and WFDB readers share (column ``source_kind`` says which reader wrote a row).

One parse per file: every line is parsed and checked once into a scratch table of typed fields
and rule (no filter sits under the JSON parse: DuckDB would re-run it per field), and the good
lines go from there into ``raw.telemetry_reading``. A file is clean when the rows loaded equal
its line count (counted while the file is checked for UTF-8); only for a file with a bad or
blank line does a second statement quarantine its bad lines, with numbers, reasons and text.

Keys: a loaded line's ``lineage_key`` is :func:`twin_pipeline.store.position_lineage_key` (the
file's sha256 prefix and ``line:N``), made per row by string concatenation instead of a sha256
per row, and its ``record_hash`` is left NULL: the record is the line at that position of the
registered file version, whose sha256 covers it; ``twin lineage trace`` re-reads the line and
hashes it when a trace needs it, and a changed line shows as a changed file. Quarantined lines
carry the same kind of key and the line as received.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from twin_pipeline.harmonize.telemetry_config import TelemetrySpec, load_telemetry_spec
from twin_pipeline.sources import FileStats, LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import QuarantineRow, Store, lineage_key, position_lineage_key

RAW_TABLE = "raw.telemetry_reading"
RAW_DDL = f"""
CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
    lineage_key VARCHAR USING COMPRESSION uncompressed,
    source_file VARCHAR,
    position VARCHAR USING COMPRESSION uncompressed,
    record_hash VARCHAR,
    source_kind VARCHAR,      -- telemetry | hl7v2 | wfdb
    device_id VARCHAR,
    patient_id VARCHAR,       -- FHIR Patient id when the feed knows it
    patient_mrn VARCHAR,      -- medical record number (HL7 PID-3) when that is what it knows
    metric VARCHAR,           -- code as received
    value DOUBLE,             -- value as received (unit as received)
    unit VARCHAR,
    ts TIMESTAMPTZ,           -- the instant (offset applied, or the default time zone)
    ts_text VARCHAR USING COMPRESSION uncompressed  -- timestamp as received
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
        ("lineage_key", pa.string()),
        ("source_file", pa.string()),
        ("position", pa.string()),
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
        cols["lineage_key"].append(lineage_key(r.file_sha256, r.position, r.record_hash))
        cols["source_file"].append(r.source_file)
        cols["position"].append(r.position)
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
    store.insert_arrow(RAW_TABLE, batch)
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
            for f in files:
                _load_file(store, f, stats.file(f.rel))
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
_CLASSIFIED_SQL = f"""
    SELECT n, rule, device_id_trim AS device_id, nullif(patient_id_trim, '') AS patient_id,
           metric_trim AS metric, value_d, unit_trim AS unit, ts_t, ts
    FROM (
        SELECT t.*, CASE
                 WHEN NOT t.parsed THEN 'broken_record'
                 WHEN {_MISSING} THEN 'missing_required'
                 WHEN value_d IS NULL OR isnan(value_d) THEN 'bad_value'
                 WHEN ts_t IS NULL THEN 'bad_timestamp'
               END AS rule
        FROM (
            SELECT n, parsed, ts, value, trim(device_id) AS device_id_trim,
                   trim(patient_id) AS patient_id_trim, trim(metric) AS metric_trim,
                   trim(unit) AS unit_trim, try_cast(value AS DOUBLE) AS value_d,
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


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _load_file(store: Store, f: SourceFile, fs: FileStats) -> None:
    """Load one file: every line parsed and checked once into ``_tele_cls`` (no filter under
    the parse: DuckDB would re-evaluate the JSON transform per field), good lines into raw;
    bad lines, only if the file has any, into quarantine."""
    con = store.con
    check = inspect_file(f.path)
    if check.wide_bom:
        fs.records_in += 1
        fs.quarantined += store.quarantine([_file_quarantine(f, check.wide_bom)])
        return
    bad = 0
    path = str(f.path).replace("'", "''")
    is_csv = f.rel.lower().endswith(".csv")
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
        "CREATE OR REPLACE TEMP TABLE _tele_cls AS " + _CLASSIFIED_SQL.replace("{parsed}", parsed)
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
    prefix = _sql_str(position_lineage_key(f.sha256, ""))
    row = con.execute(
        f"""
        INSERT INTO {RAW_TABLE}
        SELECT {prefix} || 'line:' || {n}, {_sql_str(f.rel)}, 'line:' || {n}, NULL,
               'telemetry', device_id, patient_id, NULL, metric, value_d, unit, ts_t, ts
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
        FROM (SELECT c.* REPLACE ({rule} AS rule), s.line, {_sql_str(f.rel)} AS source_file,
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
    con.register("_tele_lines_batch", batch)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _tele_lines AS SELECT * FROM _tele_lines_batch")
    finally:
        con.unregister("_tele_lines_batch")
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
