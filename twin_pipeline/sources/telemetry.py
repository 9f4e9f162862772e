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
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from twin_pipeline.harmonize.telemetry_config import TelemetrySpec, load_telemetry_spec
from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import Store, lineage_key

RAW_TABLE = "raw.telemetry_reading"
RAW_DDL = f"""
CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
    lineage_key VARCHAR,
    source_file VARCHAR,
    position VARCHAR,
    record_hash VARCHAR,
    source_kind VARCHAR,      -- telemetry | hl7v2 | wfdb
    device_id VARCHAR,
    patient_id VARCHAR,       -- FHIR Patient id when the feed knows it
    patient_mrn VARCHAR,      -- medical record number (HL7 PID-3) when that is what it knows
    metric VARCHAR,           -- code as received
    value DOUBLE,             -- value as received (unit as received)
    unit VARCHAR,
    ts TIMESTAMPTZ,           -- the instant (offset applied, or the default time zone)
    ts_text VARCHAR           -- timestamp as received
)
"""
FIELDS = ("device_id", "patient_id", "metric", "value", "unit", "ts")
REQUIRED = ("device_id", "metric", "value", "unit", "ts")
_EXT = re.compile(r"\.(ndjson|jsonl|csv)$", re.IGNORECASE)

# SQL for the same keys as twin_pipeline.store.lineage_key / quarantine_id.
LINEAGE_SQL = "substr(sha256({sha} || '|' || {pos} || '|' || {rh}), 1, 32)"
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
    store.con.register("_tele_batch", batch)
    try:
        store.con.execute(f"INSERT INTO {RAW_TABLE} SELECT * FROM _tele_batch")
    finally:
        store.con.unregister("_tele_batch")
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
        con.execute(f"CREATE OR REPLACE TEMP TABLE _tele_checked ({_CHECKED_COLS})")
        for f in files:
            if not _stage_lines(con, f):
                continue  # the whole file was quarantined (not UTF-8 text)
            parsed = _csv_parse_sql(con, f) if f.rel.lower().endswith(".csv") else _JSON_PARSE_SQL
            if parsed:
                _classify(store, spec, parsed, f)
            con.execute("DROP VIEW IF EXISTS _tele_one")
            con.execute("DROP TABLE IF EXISTS _tele_raw")
            con.execute("DROP TABLE IF EXISTS _tele_py")
            con.execute("DROP TABLE IF EXISTS _tele_lines")
        _insert_checked(store)
        _file_stats(store, files, stats)
        return stats


_CHECKED_COLS = (
    "source_file VARCHAR, file_sha VARCHAR, position VARCHAR, record_hash VARCHAR, "
    "rule VARCHAR, device_id VARCHAR, patient_id VARCHAR, metric VARCHAR, value DOUBLE, "
    "unit VARCHAR, ts TIMESTAMPTZ, ts_text VARCHAR, payload VARCHAR"
)
_STRUCT = "{" + ",".join(f'"{c}":"VARCHAR"' for c in FIELDS) + "}"
_JSON_PARSE_SQL = f"""
    SELECT n, line, j.device_id, j.patient_id, j.metric, j.value, j.unit, j.ts,
           j IS NOT NULL AS parsed
    FROM (SELECT n, line, try(json_transform(line, '{_STRUCT}')) AS j FROM _tele_one)
"""


def _stage_lines(con: duckdb.DuckDBPyConnection, f: SourceFile) -> bool:
    """``_tele_one(n, line)``: the file's non-blank lines with their true 1-based numbers.

    DuckDB refuses a whole file over one byte that is not UTF-8 (and the refusal would abort
    the caller's transaction), so the file is checked first: a UTF-16/32 file (byte-order
    mark) is quarantined whole, and a file with invalid UTF-8 goes through a line-by-line
    Python split that quarantines only the bad lines. Returns False when nothing is left to
    parse."""
    path = str(f.path).replace("'", "''")
    check = inspect_file(f.path)
    if check.wide_bom:
        _quarantine_file(con, f, check.wide_bom)
        return False
    if not check.utf8:
        _stage_lines_python(con, f)
        src = "SELECT n, line FROM _tele_lines"
    elif check.special:
        # Exact split (slower): read_csv treats a lone CR as a line break.
        src = f"""
            SELECT n, rtrim(line, chr(13)) AS line FROM (
                SELECT unnest(l) AS line, unnest(range(1, len(l) + 1)) AS n
                FROM (SELECT string_split(content, chr(10)) AS l FROM read_text('{path}')))
        """
    else:
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _tele_raw AS
            SELECT line FROM read_csv('{path}', columns={{'line': 'VARCHAR'}}, delim=chr(31),
                quote='', escape='', header=false, auto_detect=false, strict_mode=false)
            """
        )
        # Insertion order is preserved, so the rowid offset is the line number (blank lines
        # are kept as NULL rows; rowids of a table made inside a transaction do not start at 0).
        src = "SELECT rowid - (SELECT min(rowid) FROM _tele_raw) + 1 AS n, line FROM _tele_raw"
    # A UTF-8 byte-order mark on the first line is not part of the record.
    # A view, not a copy: the lines are scanned once more by the classifying INSERT.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW _tele_one AS
        SELECT n, CASE WHEN n = 1 THEN ltrim(line, chr(65279)) ELSE line END AS line
        FROM ({src}) WHERE line IS NOT NULL AND trim(line) <> ''
        """
    )
    return True


@dataclass(frozen=True)
class FileCheck:
    """What one pass over a telemetry file found."""

    special: bool  # a carriage return or unit separator (needs the exact line split)
    utf8: bool  # the whole file is valid UTF-8
    wide_bom: str | None  # "UTF-16" / "UTF-32" when the file starts with such a byte-order mark


_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def inspect_file(path: Path, chunk: int = 1 << 20) -> FileCheck:
    """One chunked pass: line-break oddities, UTF-8 validity and a UTF-16/32 byte-order mark."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    special, utf8, wide = False, True, None
    with path.open("rb") as fh:
        first = True
        while block := fh.read(chunk):
            if first:
                wide = next((name for bom, name in _WIDE_BOMS if block.startswith(bom)), None)
                first = False
            if not special and (b"\r" in block or b"\x1f" in block):
                special = True
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
    return FileCheck(special, utf8, wide)


def _stage_lines_python(con: duckdb.DuckDBPyConnection, f: SourceFile) -> None:
    """``_tele_lines(n, line)`` from a file that is not all UTF-8: each line decoded on its own;
    a line that is not UTF-8 goes to ``_tele_checked`` as ``bad_encoding`` (its record hash is
    the md5 of its bytes, as for every line), the others are parsed like any line."""
    good_n: list[int] = []
    good: list[str] = []
    bad: list[tuple[object, ...]] = []
    for n, raw in enumerate(f.path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            payload = raw.decode("utf-8", "backslashreplace")
            bad.append(
                (
                    f.rel,
                    f.sha256,
                    f"line:{n}",
                    hashlib.md5(raw, usedforsecurity=False).hexdigest(),
                    "bad_encoding",
                    f"invalid byte at offset {exc.start} of the line",
                    payload,
                )
            )
            continue
        good_n.append(n)
        good.append(text)
    batch = pa.table({"n": pa.array(good_n, pa.int64()), "line": pa.array(good, pa.string())})
    con.register("_tele_lines_batch", batch)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE _tele_lines AS SELECT * FROM _tele_lines_batch")
    finally:
        con.unregister("_tele_lines_batch")
    if bad:
        con.executemany(
            "INSERT INTO _tele_checked (source_file, file_sha, position, record_hash, rule, "
            "ts_text, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            bad,
        )


def _quarantine_file(con: duckdb.DuckDBPyConnection, f: SourceFile, encoding: str) -> None:
    """A UTF-16/32 file: one quarantined record (``file``) naming the encoding."""
    con.execute(
        "INSERT INTO _tele_checked (source_file, file_sha, position, record_hash, rule, "
        "ts_text, payload) VALUES (?, ?, 'file', ?, 'bad_encoding', ?, NULL)",
        [
            f.rel,
            f.sha256,
            f.sha256,
            f"the file is {encoding} encoded (byte-order mark); telemetry files must be UTF-8",
        ],
    )


def _csv_parse_sql(con: duckdb.DuckDBPyConnection, f: SourceFile) -> str | None:
    """A SELECT over ``_tele_one`` parsing CSV rows (the header row names the fields)."""
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
        FROM (SELECT n, line, string_split(line, ',') AS p FROM _tele_one WHERE n <> {header_n})
    """


def _classify(store: Store, spec: TelemetrySpec, parsed_sql: str, f: SourceFile) -> None:
    con = store.con
    prev_tz = con.execute("SELECT current_setting('TimeZone')").fetchone()
    con.execute(f"SET TimeZone = '{spec.default_timezone}'")
    missing = " OR ".join(f"nullif(trim(p.{c}), '') IS NULL" for c in REQUIRED)
    try:
        con.execute(
            f"""
            INSERT INTO _tele_checked
            SELECT ?, ?, 'line:' || n, md5(line), rule, trim(device_id),
                   nullif(trim(patient_id), ''), trim(metric), value_d, trim(unit), ts_t, ts,
                   CASE WHEN rule IS NOT NULL THEN line END
            FROM (
                SELECT p.*, try_cast(trim(p.value) AS DOUBLE) AS value_d,
                       try_cast(trim(p.ts) AS TIMESTAMPTZ) AS ts_t,
                       CASE
                         WHEN NOT p.parsed THEN 'broken_record'
                         WHEN {missing} THEN 'missing_required'
                         WHEN value_d IS NULL OR isnan(value_d) THEN 'bad_value'
                         WHEN ts_t IS NULL THEN 'bad_timestamp'
                         WHEN a.metric IS NULL THEN 'unknown_metric'
                       END AS rule
                FROM ({parsed_sql}) p LEFT JOIN _tele_alias a ON a.alias = upper(trim(p.metric))
            )
            """,
            [f.rel, f.sha256],
        )
    finally:
        if prev_tz:
            con.execute(f"SET TimeZone = '{prev_tz[0]}'")


def _insert_checked(store: Store) -> None:
    con = store.con
    lk = LINEAGE_SQL.format(sha="file_sha", pos="position", rh="record_hash")
    con.execute(
        f"""
        INSERT INTO {RAW_TABLE}
        SELECT {lk}, source_file, position, record_hash, 'telemetry', device_id, patient_id,
               NULL, metric, value, unit, ts, ts_text
        FROM _tele_checked WHERE rule IS NULL
        """
    )
    qid = QUARANTINE_ID_SQL.format(
        stage="'read'", table=f"'{RAW_TABLE}'", file="source_file", pos="position", rule="rule"
    )
    reason = (
        "source_file || ' [' || position || ']: ' || CASE rule "
        "WHEN 'broken_record' THEN 'line is not a valid record' "
        "WHEN 'missing_required' THEN 'a required field (device_id, metric, value, unit, ts) "
        "is missing' "
        "WHEN 'bad_value' THEN 'value is missing or not a number' "
        "WHEN 'bad_timestamp' THEN 'timestamp ' || coalesce(ts_text, '') || ' cannot be read' "
        "WHEN 'unknown_metric' THEN 'metric ' || coalesce(metric, '') || "
        "' is not in the telemetry vocabulary' "
        "WHEN 'bad_encoding' THEN 'not UTF-8 text: ' || coalesce(ts_text, '?') END"
    )
    con.execute(
        f"""
        INSERT INTO governance.quarantine
        SELECT {qid}, ?, 'read', '{RAW_TABLE}', 'telemetry', source_file, position, rule,
               {reason}, payload, {lk}, now()
        FROM _tele_checked WHERE rule IS NOT NULL
        """,
        [store.run_id],
    )


def _file_stats(store: Store, files: Sequence[SourceFile], stats: LoadStats) -> None:
    rows = store.con.execute(
        "SELECT source_file, count(*), count(*) FILTER (rule IS NULL) FROM _tele_checked "
        "GROUP BY source_file"
    ).fetchall()
    by_file = {r[0]: (int(r[1]), int(r[2])) for r in rows}
    for f in files:
        total, ok = by_file.get(f.rel, (0, 0))
        fs = stats.file(f.rel)
        fs.records_in += total
        fs.loaded += ok
        fs.quarantined += total - ok
    store.con.execute("DROP TABLE IF EXISTS _tele_checked")
