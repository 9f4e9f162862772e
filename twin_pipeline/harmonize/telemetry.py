"""Raw readings → ``harmonized.telemetry_reading``, per-minute aggregates and device gaps.

Incremental: only raw rows of source files not yet harmonized (or changed since) are mapped;
``governance.telemetry_state`` remembers which file versions are in, and
``governance.telemetry_pending`` the (patient, metric, minute) keys and devices whose aggregates
and gaps must be recomputed. A full rebuild gives the same table content.

Mapping: every metric code (MDC, LOINC, alias) to the canonical MDC metric; units through the
UCUM synonym table and the metric's conversions to its canonical unit (no conversion → quarantine
``bad_unit``); exact duplicates (device, metric, instant, value) quarantined as ``duplicate``
(the first copy, by file registration then line, or the one already harmonized, is kept); readings
outside the plausible range flagged ``implausible``; readings older than their device's watermark
at arrival (latest instant from files registered before theirs) flagged ``late`` and, beyond the
late-arrival window, ``late_beyond_window``. Late and out-of-order readings are still accepted;
aggregates and gaps are computed in ``ts_utc`` order, never in arrival order.

Cost: the batch is a view over raw joined once to the mapping of each distinct (code, unit)
received, never copied; duplicates are screened by one 64-bit hash per reading and ranked
exactly only within colliding groups; minute buckets are integer arithmetic on microseconds;
gaps are found over each device's distinct instants.
"""

from __future__ import annotations

from dataclasses import dataclass

from twin_pipeline.harmonize.telemetry_config import TelemetrySpec, load_telemetry_spec
from twin_pipeline.sources.telemetry import (
    KEY_COLUMNS_DDL,
    QUARANTINE_ID_SQL,
    RAW_TABLE,
    ensure_raw_table,
    vocabulary_table,
)
from twin_pipeline.store import Store

READING = "harmonized.telemetry_reading"
MINUTE = "harmonized.telemetry_minute"
GAP = "harmonized.device_gap"
STATE = "governance.telemetry_state"
PENDING = "governance.telemetry_pending"
TELEMETRY_KINDS = ("telemetry", "hl7v2", "wfdb")


def _minute(ts: str) -> str:
    """SQL for the UTC minute of instant ``ts``: ``date_trunc('minute', ts)`` for every zone with
    whole-minute offsets, by integer arithmetic on microseconds (``date_trunc`` on a
    TIMESTAMPTZ goes through the ICU calendar, about ten times slower)."""
    us = f"epoch_us({ts})"
    return f"make_timestamptz({us} - (({us} % 60000000) + 60000000) % 60000000)"


READING_TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {READING} (
    source_file VARCHAR,
    source_kind VARCHAR,
    device_id VARCHAR,
    patient_id VARCHAR,
    metric VARCHAR,            -- canonical IEEE 11073 MDC reference id
    loinc VARCHAR,
    value DOUBLE,              -- in the canonical unit
    unit VARCHAR,              -- canonical UCUM unit
    original_metric VARCHAR,
    original_value DOUBLE,
    original_unit VARCHAR,
    ts_utc TIMESTAMPTZ,
    implausible BOOLEAN,
    late BOOLEAN,
    late_beyond_window BOOLEAN,
    {KEY_COLUMNS_DDL}
)
"""
READING_DDL = (
    READING_TABLE_DDL
    + f""";
CREATE TABLE IF NOT EXISTS {STATE} (
    source_file VARCHAR PRIMARY KEY,
    sha256 VARCHAR,
    first_seen TIMESTAMPTZ,
    rows_in BIGINT,
    rows_harmonized BIGINT
);
CREATE TABLE IF NOT EXISTS governance.telemetry_device_file (
    device_id VARCHAR,
    source_file VARCHAR,
    first_seen TIMESTAMPTZ,
    max_ts TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS {PENDING} (
    kind VARCHAR,              -- minute | gap | full_minute | full_gap
    device_id VARCHAR,
    patient_id VARCHAR,
    metric VARCHAR,
    minute TIMESTAMPTZ
);
"""
)
MINUTE_DDL = f"""
CREATE TABLE IF NOT EXISTS {MINUTE} (
    patient_id VARCHAR,
    metric VARCHAR,
    minute TIMESTAMPTZ,
    n BIGINT,
    n_implausible BIGINT,
    min DOUBLE,                -- over plausible readings
    max DOUBLE,
    mean DOUBLE,
    unit VARCHAR,
    lineage_key VARCHAR        -- smallest lineage key of the readings in the minute
)
"""
GAP_DDL = f"""
CREATE TABLE IF NOT EXISTS {GAP} (
    device_id VARCHAR,
    patient_id VARCHAR,
    gap_start TIMESTAMPTZ,     -- last reading before the gap
    gap_end TIMESTAMPTZ,       -- first reading after it
    gap_seconds DOUBLE,
    threshold_seconds DOUBLE,
    lineage_key VARCHAR        -- the reading that ended the gap
)
"""


@dataclass
class TelemetryResult:
    files_processed: int
    rows_in: int
    harmonized: int
    quarantined: int
    duplicates: int
    implausible: int
    late: int


def _spec_tables(store: Store, spec: TelemetrySpec) -> None:
    con = store.con
    vocabulary_table(store, spec)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _tele_metric (metric VARCHAR, loinc VARCHAR, unit VARCHAR, "
        "lo DOUBLE, hi DOUBLE)"
    )
    con.executemany(
        "INSERT INTO _tele_metric VALUES (?,?,?,?,?)",
        [(m.metric, m.loinc, m.unit, m.plausible[0], m.plausible[1]) for m in spec.metrics],
    )
    con.execute("CREATE OR REPLACE TEMP TABLE _tele_unit (unit VARCHAR, ucum VARCHAR)")
    con.executemany("INSERT INTO _tele_unit VALUES (?, ?)", list(spec.units.items()))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _tele_conv (metric VARCHAR, ucum VARCHAR, factor DOUBLE, "
        "off DOUBLE)"
    )
    con.executemany("INSERT INTO _tele_conv VALUES (?,?,?,?)", spec.unit_rows())


def ensure_tables(store: Store) -> None:
    ensure_raw_table(store)
    store.con.execute(READING_DDL)


def harmonize_readings(
    store: Store, spec: TelemetrySpec | None = None, *, full: bool = False
) -> TelemetryResult:
    """Map the raw readings of new or changed source files into ``harmonized.telemetry_reading``."""
    spec = spec or load_telemetry_spec()
    con = store.con
    with store.transaction():
        fresh = not store.table_exists(READING)
        ensure_tables(store)
        _spec_tables(store, spec)
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _th_files AS
            SELECT s.path AS source_file, s.sha256, s.first_seen
            FROM governance.source_file s
            WHERE s.kind IN {TELEMETRY_KINDS}
            """
        )
        if full or fresh:
            con.execute(f"DELETE FROM {READING}")
            con.execute(f"DELETE FROM {STATE}")
            con.execute("DELETE FROM governance.telemetry_device_file")
            store.clear_quarantine("harmonize", READING)
            con.execute(f"DELETE FROM {PENDING}")
            con.execute(
                f"INSERT INTO {PENDING} VALUES ('full_minute', NULL, NULL, NULL, NULL), "
                "('full_gap', NULL, NULL, NULL, NULL)"
            )
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _th_todo AS
            SELECT f.* FROM _th_files f LEFT JOIN {STATE} s USING (source_file)
            WHERE s.sha256 IS DISTINCT FROM f.sha256
            """
        )
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _th_gone AS
            SELECT source_file FROM {STATE}
            WHERE source_file NOT IN (SELECT source_file FROM _th_files)
               OR source_file IN (SELECT source_file FROM _th_todo)
            """
        )
        # Whatever an earlier version of a changed/removed file contributed is undone.
        con.execute(
            f"""
            INSERT INTO {PENDING}
            SELECT 'minute', NULL, patient_id, metric, {_minute("ts_utc")}
            FROM {READING} WHERE source_file IN (SELECT source_file FROM _th_gone)
            UNION
            SELECT 'gap', device_id, NULL, NULL, NULL
            FROM {READING} WHERE source_file IN (SELECT source_file FROM _th_gone)
            """
        )
        for table in (READING, "governance.telemetry_device_file", STATE):
            con.execute(
                f"DELETE FROM {table} WHERE source_file IN (SELECT source_file FROM _th_gone)"
            )
        con.execute(
            "DELETE FROM governance.quarantine WHERE stage = 'harmonize' AND table_name = ? "
            "AND source_file IN (SELECT source_file FROM _th_gone)",
            [READING],
        )
        n_todo = con.execute("SELECT count(*) FROM _th_todo").fetchone()
        if not n_todo or not n_todo[0]:
            return TelemetryResult(0, 0, 0, 0, 0, 0, 0)
        counts = _harmonize_batch(store, spec)
        for t in (
            "_th_dup",
            "_th_agg",
            "_th_map",
            "_th_watermark",
            "_th_todo",
            "_th_gone",
            "_th_files",
        ):
            con.execute(f"DROP TABLE IF EXISTS {t}")
        con.execute("DROP VIEW IF EXISTS _th_mapped")
    total, ok, dup, impl, late = counts
    return TelemetryResult(int(n_todo[0]), total, ok, total - ok, dup, impl, late)


def _harmonize_batch(store: Store, spec: TelemetrySpec) -> tuple[int, int, int, int, int]:
    """Map the raw rows of the files in ``_th_todo``; (rows in, harmonized, duplicates,
    implausible, late).

    The mapped rows are a view over raw, not a copy: the few passes over it (duplicate hashes,
    per device and file counts, the insert, the quarantine of rejected rows if there are any)
    cost less than writing and re-reading a temporary table of every reading."""
    con = store.con
    # Files to do are all the telemetry files on a first load or a full rebuild: no filter.
    counts = con.execute(
        "SELECT (SELECT count(*) FROM _th_todo), (SELECT count(*) FROM _th_files)"
    ).fetchone()
    todo = (
        ""
        if counts and counts[0] == counts[1]
        else ("WHERE r.source_file IN (SELECT source_file FROM _th_todo)")
    )
    # The mapping of each distinct (code, unit) received, made once: one join per reading.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _th_map AS
        SELECT k.metric AS raw_metric, k.unit AS raw_unit, a.metric, m.loinc,
               m.unit, c.factor, c.off, m.lo, m.hi
        FROM (SELECT DISTINCT r.metric, r.unit FROM {RAW_TABLE} r {todo}) k
        LEFT JOIN _tele_alias a ON a.alias = upper(k.metric)
        LEFT JOIN _tele_metric m ON m.metric = a.metric
        LEFT JOIN _tele_unit u ON u.unit = k.unit
        LEFT JOIN _tele_conv c ON c.metric = a.metric AND c.ucum = coalesce(u.ucum, k.unit)
        """
    )
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW _th_mapped AS
        SELECT r.lineage_key, r.source_file, r.position, r.key_prefix, r.line, r.position_text,
               r.lineage_key_text, r.source_kind, r.device_id,
               r.patient_id, r.patient_mrn, r.ts,
               k.metric, k.loinc, (r.value + k.off) * k.factor AS value, k.unit,
               r.metric AS original_metric, r.value AS original_value,
               r.unit AS original_unit, r.ts AS ts_utc,
               (r.value + k.off) * k.factor NOT BETWEEN k.lo AND k.hi AS implausible,
               CASE WHEN k.metric IS NULL THEN 'unknown_metric'
                    WHEN k.factor IS NULL THEN 'bad_unit'
                    WHEN r.device_id IS NULL OR r.device_id = '' THEN 'missing_device'
               END AS rule
        FROM {RAW_TABLE} r
        JOIN _th_map k ON k.raw_metric IS NOT DISTINCT FROM r.metric
         AND k.raw_unit IS NOT DISTINCT FROM r.unit
        {todo}
        """
    )
    # Exact duplicates (device, metric, instant, value) within the batch: the first copy
    # (earliest registered file, then line order) is kept, the same choice a full rebuild
    # makes. Candidate groups are found by one 64-bit hash per reading; the exact ranking runs
    # only inside the (few) groups that share a hash, on the real values.
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _th_dup AS
        SELECT lineage_key FROM (
            SELECT b.lineage_key, row_number() OVER (
                PARTITION BY b.device_id, b.metric, b.ts_utc, b.value
                ORDER BY t.first_seen, b.source_file,
                         try_cast(regexp_extract(b.position, '(\\d+)$', 1) AS BIGINT),
                         b.position, b.lineage_key) AS k
            FROM (SELECT * FROM _th_mapped
                  WHERE rule IS NULL AND hash(device_id, metric, ts_utc, value) IN (
                      SELECT h FROM (SELECT hash(device_id, metric, ts_utc, value) AS h
                                     FROM _th_mapped WHERE rule IS NULL)
                      GROUP BY h HAVING count(*) > 1)) b
            JOIN _th_todo t USING (source_file))
        WHERE k > 1
        """
    )
    # Readings equal to one already harmonized (from files harmonized before) are duplicates.
    if con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {READING} LIMIT 1)").fetchone() != (0,):
        con.execute(
            f"""
            INSERT INTO _th_dup
            SELECT b.lineage_key FROM _th_mapped b
            SEMI JOIN (SELECT device_id, metric, ts_utc, value FROM {READING}
                       WHERE device_id IN (SELECT DISTINCT device_id FROM _th_mapped)) s
              ON s.device_id = b.device_id AND s.metric = b.metric
             AND s.ts_utc = b.ts_utc AND s.value = b.value
            WHERE b.rule IS NULL AND b.lineage_key NOT IN (SELECT lineage_key FROM _th_dup)
            """
        )
    (n_dup,) = con.execute("SELECT count(*) FROM _th_dup").fetchone() or (0,)
    # ``_th_ok``: harmonized rows are those without a rule that are not duplicates.
    ok = "b.rule IS NULL" + (" AND d.lineage_key IS NULL" if n_dup else "")
    dup_join = " LEFT JOIN _th_dup d USING (lineage_key)" if n_dup else ""
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _th_agg AS
        SELECT a.*, t.first_seen FROM (
            SELECT b.source_file, b.device_id,
                   count(*) AS n_in, count(*) FILTER ({ok}) AS n_ok,
                   count(*) FILTER ({ok} AND b.implausible) AS n_implausible,
                   count(*) FILTER ({ok} AND b.patient_id IS NULL) AS n_no_patient,
                   max(b.ts_utc) FILTER ({ok}) AS max_ts
            FROM _th_mapped b{dup_join}
            GROUP BY b.source_file, b.device_id
        ) a JOIN _th_todo t USING (source_file)
        """
    )
    con.execute(
        """
        INSERT INTO governance.telemetry_device_file
        SELECT device_id, source_file, first_seen, max_ts FROM _th_agg WHERE n_ok > 0
        """
    )
    # Watermark of a device when a file arrived: its latest instant in files registered before.
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE _th_watermark AS
        SELECT b.device_id, b.source_file, max(d.max_ts) AS watermark
        FROM (SELECT device_id, source_file, first_seen FROM _th_agg WHERE n_ok > 0) b
        JOIN governance.telemetry_device_file d ON d.device_id = b.device_id
         AND (d.first_seen, d.source_file) < (b.first_seen, b.source_file)
        GROUP BY ALL
        """
    )
    (n_marks,) = con.execute("SELECT count(*) FROM _th_watermark").fetchone() or (0,)
    window = spec.late_arrival_window_seconds
    if n_marks:
        late_sql = (
            "coalesce(b.ts_utc < w.watermark, false), "
            f"coalesce(b.ts_utc < w.watermark - to_seconds({window}), false)"
        )
        mark_join = " LEFT JOIN _th_watermark w USING (device_id, source_file)"
    else:  # no device had readings in an earlier file: nothing is late
        late_sql, mark_join = "false, false", ""
    anti = " ANTI JOIN _th_dup d USING (lineage_key)" if n_dup else ""
    insert = f"""
        INSERT INTO {READING}
        SELECT b.source_file, b.source_kind, b.device_id, {{patient}}, b.metric, b.loinc,
               b.value, b.unit, b.original_metric, b.original_value, b.original_unit, b.ts_utc,
               b.implausible, {late_sql}, b.key_prefix, b.line, b.position_text,
               b.lineage_key_text
        FROM _th_mapped b{mark_join}{anti}
        WHERE b.rule IS NULL{{which}}
    """
    patient_sql = _patient_sql(store, "b")
    # Rows are appended in whatever order both threads finish them: every value is computed
    # in the statement, and readers order by time or key, never by position in the table.
    with store.unordered():
        if patient_sql == "b.patient_id":
            con.execute(insert.format(patient="b.patient_id", which=""))
        else:
            # The look-ups (by MRN, by the device's patient at that instant) run only for
            # readings that arrive without a patient id: DuckDB would join them for every one.
            con.execute(
                insert.format(patient="b.patient_id", which=" AND b.patient_id IS NOT NULL")
            )
            (n_no_patient,) = con.execute("SELECT sum(n_no_patient) FROM _th_agg").fetchone() or (
                0,
            )
            if n_no_patient:
                con.execute(insert.format(patient=patient_sql, which=" AND b.patient_id IS NULL"))
    sums = con.execute("SELECT sum(n_in), sum(n_ok), sum(n_implausible) FROM _th_agg").fetchone()
    total, n_ok, impl = (int(x or 0) for x in (sums or (0, 0, 0)))
    if total > n_ok:
        _quarantine_rejected(store, bool(n_dup))
    con.execute(
        f"""
        INSERT INTO {STATE}
        SELECT t.source_file, t.sha256, t.first_seen, coalesce(sum(a.n_in), 0),
               coalesce(sum(a.n_ok), 0)
        FROM _th_todo t LEFT JOIN _th_agg a USING (source_file)
        GROUP BY ALL
        """
    )
    # Keys to recompute; none when a full rebuild is pending anyway (first load).
    full_row = con.execute(
        f"SELECT count(*) FILTER (kind = 'full_minute'), count(*) FILTER (kind = 'full_gap') "
        f"FROM {PENDING}"
    ).fetchone()
    full_minute, full_gap = (bool(x) for x in (full_row or (0, 0)))
    if not full_minute:
        con.execute(
            f"""
            INSERT INTO {PENDING}
            SELECT DISTINCT 'minute', NULL, patient_id, metric, {_minute("ts_utc")}
            FROM {READING} WHERE source_file IN (SELECT source_file FROM _th_todo)
            """
        )
    if not full_gap:
        con.execute(
            f"""
            INSERT INTO {PENDING}
            SELECT DISTINCT 'gap', device_id, NULL, NULL, NULL FROM _th_agg WHERE n_ok > 0
            """
        )
    late = 0
    if n_marks:
        n_late = con.execute(
            f"SELECT count(*) FROM {READING} WHERE late AND source_file IN "
            "(SELECT source_file FROM _th_todo)"
        ).fetchone()
        late = int(n_late[0]) if n_late else 0
    return total, n_ok, int(n_dup), impl, late


def _quarantine_rejected(store: Store, with_duplicates: bool) -> None:
    """Rows of the batch that are not harmonized go to quarantine with rule and reason."""
    rejected = "SELECT * FROM _th_mapped WHERE rule IS NOT NULL"
    if with_duplicates:
        rejected += (
            " UNION ALL SELECT * REPLACE ('duplicate' AS rule) FROM _th_mapped "
            "SEMI JOIN _th_dup USING (lineage_key) WHERE rule IS NULL"
        )
    qid = QUARANTINE_ID_SQL.format(
        stage="'harmonize'",
        table=f"'{READING}'",
        file="source_file",
        pos="position",
        rule="rule",
    )
    reason = (
        "source_file || ' [' || position || ']: ' || CASE rule "
        "WHEN 'unknown_metric' THEN 'metric ' || original_metric || "
        "' is not in the telemetry vocabulary' "
        "WHEN 'bad_unit' THEN 'unit ' || coalesce(original_unit, '(none)') || "
        "' cannot be converted to ' || coalesce(unit, '?') || ' for ' || metric "
        "WHEN 'missing_device' THEN 'reading has no device id' "
        "WHEN 'duplicate' THEN 'exact duplicate of a reading already kept (device ' || "
        "device_id || ', ' || metric || ' at ' || ts_utc || ')' END"
    )
    store.con.execute(
        f"""
        INSERT INTO governance.quarantine
        SELECT {qid}, ?, 'harmonize', '{READING}', source_kind, source_file, position,
               rule, {reason},
               json_object('device_id', device_id, 'metric', original_metric,
                           'value', original_value, 'unit', original_unit,
                           'ts', CAST(ts_utc AS VARCHAR)),
               lineage_key, now()
        FROM ({rejected})
        """,
        [store.run_id],
    )


def _patient_sql(store: Store, r: str = "r") -> str:
    """The patient of reading ``r``: as sent, else by MRN, else the device's patient then."""
    parts = [f"{r}.patient_id"]
    if store.table_exists("harmonized.patient"):
        parts.append(
            "(SELECT any_value(p.patient_id) FROM harmonized.patient p "
            f"WHERE {r}.patient_mrn IS NOT NULL AND p.mrn = {r}.patient_mrn)"
        )
    if store.table_exists("harmonized.device_association"):
        parts.append(
            "(SELECT any_value(da.patient_id) FROM harmonized.device_association da "
            f"WHERE da.device_id = {r}.device_id AND {r}.ts >= da.valid_from "
            f"AND (da.valid_to IS NULL OR {r}.ts < da.valid_to))"
        )
    return parts[0] if len(parts) == 1 else f"coalesce({', '.join(parts)})"


def _pending(store: Store, kind: str) -> tuple[bool, bool]:
    """(full rebuild needed, anything pending) for ``kind``; pending rows are consumed."""
    row = store.con.execute(
        f"SELECT count(*) FILTER (kind = ?), count(*) FILTER (kind = ?) FROM {PENDING}",
        [f"full_{kind}", kind],
    ).fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


def build_minutes(store: Store) -> int:
    """Recompute ``harmonized.telemetry_minute`` for the pending keys (all when new)."""
    con = store.con
    agg = f"""
        SELECT r.patient_id, r.metric, {_minute("r.ts_utc")} AS minute, count(*) AS n,
               count(*) FILTER (r.implausible) AS n_implausible,
               min(r.value) FILTER (NOT r.implausible), max(r.value) FILTER (NOT r.implausible),
               avg(r.value) FILTER (NOT r.implausible), any_value(r.unit),
               min(r.lineage_key)
        FROM {READING} r
    """
    with store.transaction():
        ensure_tables(store)
        fresh = not store.table_exists(MINUTE)
        con.execute(MINUTE_DDL)
        full, some = _pending(store, "minute")
        if fresh or full:
            con.execute(f"DELETE FROM {MINUTE}")
            con.execute(f"INSERT INTO {MINUTE} {agg} GROUP BY ALL ORDER BY minute")
        elif some:
            con.execute(
                f"""
                CREATE OR REPLACE TEMP TABLE _tm_keys AS
                SELECT DISTINCT patient_id, metric, minute FROM {PENDING} WHERE kind = 'minute'
                """
            )
            con.execute(
                f"""
                DELETE FROM {MINUTE} t USING _tm_keys k
                WHERE t.patient_id IS NOT DISTINCT FROM k.patient_id AND t.metric = k.metric
                  AND t.minute = k.minute
                """
            )
            con.execute(
                f"""
                INSERT INTO {MINUTE} {agg}
                SEMI JOIN _tm_keys k ON r.patient_id IS NOT DISTINCT FROM k.patient_id
                 AND r.metric = k.metric AND {_minute("r.ts_utc")} = k.minute
                GROUP BY ALL ORDER BY minute
                """
            )
            con.execute("DROP TABLE _tm_keys")
        con.execute(f"DELETE FROM {PENDING} WHERE kind IN ('minute', 'full_minute')")
    return store.row_count(MINUTE)


def build_gaps(store: Store, spec: TelemetrySpec | None = None) -> int:
    """Recompute ``harmonized.device_gap`` for the pending devices (all when new)."""
    spec = spec or load_telemetry_spec()
    con = store.con
    threshold = spec.gap_threshold_seconds
    with store.transaction():
        ensure_tables(store)
        fresh = not store.table_exists(GAP)
        con.execute(GAP_DDL)
        full, some = _pending(store, "gap")
        where = ""
        if not (fresh or full):
            if not some:
                return store.row_count(GAP)
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE _tg_dev AS SELECT DISTINCT device_id FROM {PENDING} "
                "WHERE kind = 'gap'"
            )
            con.execute(f"DELETE FROM {GAP} WHERE device_id IN (SELECT device_id FROM _tg_dev)")
            where = "WHERE device_id IN (SELECT device_id FROM _tg_dev)"
        else:
            con.execute(f"DELETE FROM {GAP}")
        # Gaps between the distinct instants of each device; patient and (smallest) lineage
        # key are looked up only for the readings that end a gap.
        con.execute(
            f"""
            INSERT INTO {GAP}
            SELECT g.device_id, any_value(r.patient_id), g.prev_ts, g.ts_utc,
                   epoch(g.ts_utc) - epoch(g.prev_ts), {threshold}, min(r.lineage_key)
            FROM (
                SELECT device_id, ts_utc,
                       lag(ts_utc) OVER (PARTITION BY device_id ORDER BY ts_utc) AS prev_ts
                FROM (SELECT DISTINCT device_id, ts_utc FROM {READING} {where})
            ) g
            JOIN {READING} r ON r.device_id = g.device_id AND r.ts_utc = g.ts_utc
            WHERE epoch(g.ts_utc) - epoch(g.prev_ts) > {threshold}
            GROUP BY g.device_id, g.prev_ts, g.ts_utc
            ORDER BY g.device_id, g.prev_ts
            """
        )
        con.execute("DROP TABLE IF EXISTS _tg_dev")
        con.execute(f"DELETE FROM {PENDING} WHERE kind IN ('gap', 'full_gap')")
    return store.row_count(GAP)
