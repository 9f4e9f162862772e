"""Current state per twin: latest vitals per patient, device status and last reading, and
scanner utilization on the as-of day.

"Now" for a twin built from history is the *as-of* time: by default the latest timestamp found
in the data the state is built from (so rebuilding from the same rows gives the same state);
pass ``as_of`` to pin it. Each state table records the as-of time it was computed for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from twin_pipeline.store import Store, sql_literal
from twin_pipeline.twin.graph import EDGE_TABLE, NODE_TABLE
from twin_pipeline.twin.model import TwinModel

VITALS_TABLE = "twin.twin.state_patient_vitals"
DEVICE_TABLE = "twin.twin.state_device"
SCANNER_TABLE = "twin.twin.state_scanner"
# Per-series acquisition time assumed when a modality has no multi-series study to measure.
DEFAULT_SERIES_MINUTES = 5.0


@dataclass
class StateReport:
    table: str
    rows: int
    as_of: datetime | None
    inputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.rows,
            "as_of": self.as_of.isoformat() if self.as_of else None,
            "warnings": self.warnings,
        }


def _has(store: Store, qualified: str, *cols: str) -> bool:
    if not store.table_exists(qualified):
        return False
    have = {c for c, _ in store.columns(qualified)}
    return all(c in have for c in cols)


def _max_ts(store: Store, parts: list[tuple[str, str]]) -> datetime | None:
    best: datetime | None = None
    for table, col in parts:
        if not _has(store, table, col):
            continue
        row = store.con.execute(f"SELECT max(CAST({col} AS TIMESTAMPTZ)) FROM {table}").fetchone()
        if row and row[0] is not None and (best is None or row[0] > best):
            best = row[0]
    return best


def _count(store: Store, table: str) -> int:
    row = store.con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def build_patient_vitals(
    store: Store, model: TwinModel, as_of: datetime | None = None
) -> StateReport:
    """``twin.state_patient_vitals``: the latest value of each telemetry item of Patient twins,
    from observations and device readings alike (implausible readings left out)."""
    schema = model.source_schema
    patient = model.by_name.get("Patient")
    codes = [(t.name, c, t.unit) for t in (patient.telemetry if patient else []) for c in t.codes]
    obs, tel = f"{schema}.observation", f"{schema}.telemetry_reading"
    rep = StateReport(VITALS_TABLE, 0, None)
    parts: list[str] = []
    if _has(store, obs, "patient_id", "code", "value", "effective_at"):
        comp = (
            "coalesce(CAST(o.component_code AS VARCHAR), CAST(o.code AS VARCHAR))"
            if _has(store, obs, "component_code")
            else "CAST(o.code AS VARCHAR)"
        )
        unit = "o.unit" if _has(store, obs, "unit") else "NULL"
        lk = "o.lineage_key" if _has(store, obs, "lineage_key") else "NULL"
        parts.append(
            f"SELECT o.patient_id, c.vital, o.value, {unit} AS unit, "
            f"CAST(o.effective_at AS TIMESTAMPTZ) AS observed_at, 'observation' AS source, "
            f"{lk} AS lineage_key FROM {obs} o JOIN codes c ON c.code = {comp} "
            "WHERE o.value IS NOT NULL"
        )
        rep.inputs.append(obs)
    else:
        rep.warnings.append(f"{obs} missing or lacks needed columns")
    if _has(store, tel, "patient_id", "metric", "value", "ts_utc"):
        impl = "AND NOT coalesce(t.implausible, false)" if _has(store, tel, "implausible") else ""
        unit = "t.unit" if _has(store, tel, "unit") else "NULL"
        lk = "t.lineage_key" if _has(store, tel, "lineage_key") else "NULL"
        parts.append(
            f"SELECT t.patient_id, c.vital, t.value, {unit}, CAST(t.ts_utc AS TIMESTAMPTZ), "
            f"'telemetry', {lk} FROM {tel} t JOIN codes c ON c.code = CAST(t.metric AS VARCHAR) "
            f"WHERE t.value IS NOT NULL {impl}"
        )
        rep.inputs.append(tel)
    else:
        rep.warnings.append(f"{tel} missing or lacks needed columns")
    as_of = as_of or _max_ts(store, [(obs, "effective_at"), (tel, "ts_utc")])
    rep.as_of = as_of
    ddl_cols = (
        "node_id VARCHAR, patient_id VARCHAR, vital VARCHAR, value DOUBLE, unit VARCHAR, "
        "observed_at TIMESTAMPTZ, source VARCHAR, as_of TIMESTAMPTZ, lineage_key VARCHAR"
    )
    store.con.execute(f"CREATE OR REPLACE TABLE {VITALS_TABLE} ({ddl_cols})")
    if not parts or not codes or as_of is None:
        return rep
    values = ", ".join(
        f"({sql_literal(v)}, {sql_literal(c)}, {sql_literal(u)})" for v, c, u in codes
    )
    store.con.execute(
        f"""
        INSERT INTO {VITALS_TABLE}
        WITH codes(vital, code, unit) AS (VALUES {values}),
        allv AS ({" UNION ALL ".join(parts)})
        SELECT n.node_id, a.patient_id, a.vital, a.value, a.unit, a.observed_at, a.source,
               CAST(? AS TIMESTAMPTZ), a.lineage_key
        FROM allv a JOIN {NODE_TABLE} n
          ON n.twin_type = 'Patient' AND n.source_id = CAST(a.patient_id AS VARCHAR)
        WHERE a.observed_at <= CAST(? AS TIMESTAMPTZ)
        QUALIFY row_number() OVER (
            PARTITION BY a.patient_id, a.vital
            ORDER BY a.observed_at DESC, a.source, a.lineage_key) = 1
        """,
        [as_of, as_of],
    )
    rep.rows = _count(store, VITALS_TABLE)
    return rep


def build_device_state(
    store: Store, model: TwinModel, as_of: datetime | None = None
) -> StateReport:
    """``twin.state_device``: per Device twin, status (streaming/idle/offline/no_data), last
    reading, readings in the last 24 h, and the patient it is attached to at the as-of time."""
    tel = f"{model.source_schema}.telemetry_reading"
    rep = StateReport(DEVICE_TABLE, 0, None)
    has_tel = _has(store, tel, "device_id", "metric", "value", "ts_utc")
    if has_tel:
        rep.inputs.append(tel)
    else:
        rep.warnings.append(f"{tel} missing or lacks needed columns; devices show no_data")
    as_of = as_of or _max_ts(store, [(tel, "ts_utc")])
    rep.as_of = as_of
    store.con.execute(
        f"""CREATE OR REPLACE TABLE {DEVICE_TABLE} (
            node_id VARCHAR, device_id VARCHAR, status VARCHAR, last_metric VARCHAR,
            last_value DOUBLE, last_unit VARCHAR, last_reading_at TIMESTAMPTZ,
            readings_24h BIGINT, attached_patient VARCHAR, as_of TIMESTAMPTZ)"""
    )
    unit = "t.unit" if _has(store, tel, "unit") else "NULL"
    readings = (
        f"""SELECT CAST(t.device_id AS VARCHAR) AS device_id, t.metric, t.value, {unit} AS unit,
                   CAST(t.ts_utc AS TIMESTAMPTZ) AS ts FROM {tel} t
            WHERE CAST(t.ts_utc AS TIMESTAMPTZ) <= CAST($as_of AS TIMESTAMPTZ)"""
        if has_tel and as_of is not None
        else "SELECT NULL::VARCHAR AS device_id, NULL::VARCHAR AS metric, NULL::DOUBLE AS value, "
        "NULL::VARCHAR AS unit, NULL::TIMESTAMPTZ AS ts WHERE false"
    )
    store.con.execute(
        f"""
        INSERT INTO {DEVICE_TABLE}
        WITH r AS ({readings}),
        last AS (
            SELECT * FROM r
            QUALIFY row_number() OVER (PARTITION BY device_id ORDER BY ts DESC, metric) = 1),
        cnt AS (
            SELECT device_id,
                   count(*) FILTER (WHERE ts > CAST($as_of AS TIMESTAMPTZ) - INTERVAL 24 HOUR) AS n24
            FROM r GROUP BY device_id),
        dev AS (
            SELECT node_id, source_id, props->>'serial_number' AS serial
            FROM {NODE_TABLE} WHERE twin_type = 'Device'),
        att AS (
            SELECT src, dst FROM {EDGE_TABLE}
            WHERE src_type = 'Device' AND rel IN ('attached_to', 'assigned_to')
              AND (valid_from IS NULL OR valid_from <= CAST($as_of AS TIMESTAMPTZ))
              AND (valid_to IS NULL OR valid_to >= CAST($as_of AS TIMESTAMPTZ))
            QUALIFY row_number() OVER (
                PARTITION BY src ORDER BY rel = 'attached_to' DESC, valid_from DESC NULLS LAST,
                dst) = 1)
        SELECT d.node_id, d.source_id,
               CASE WHEN l.ts IS NULL THEN 'no_data'
                    WHEN l.ts >= CAST($as_of AS TIMESTAMPTZ) - INTERVAL 15 MINUTE THEN 'streaming'
                    WHEN l.ts >= CAST($as_of AS TIMESTAMPTZ) - INTERVAL 24 HOUR THEN 'idle'
                    ELSE 'offline' END,
               l.metric, l.value, l.unit, l.ts, coalesce(c.n24, 0), a.dst,
               CAST($as_of AS TIMESTAMPTZ)
        FROM dev d
        LEFT JOIN last l ON l.device_id = d.source_id OR l.device_id = d.serial
        LEFT JOIN cnt c ON c.device_id = l.device_id
        LEFT JOIN att a ON a.src = d.node_id
        QUALIFY row_number() OVER (PARTITION BY d.node_id ORDER BY l.ts DESC NULLS LAST) = 1
        """,
        {"as_of": as_of},
    )
    rep.rows = _count(store, DEVICE_TABLE)
    return rep


def build_scanner_state(
    store: Store, model: TwinModel, as_of: datetime | None = None
) -> StateReport:
    """``twin.state_scanner``: per ImagingModality twin, studies started on the as-of day, busy
    minutes (series span plus one typical series), utilization of the 24 h day, last study."""
    rep = StateReport(SCANNER_TABLE, 0, None, inputs=["twin.node", "twin.edge"])
    if as_of is None:
        row = store.con.execute(
            f"SELECT max(TRY_CAST(props->>'started' AS TIMESTAMPTZ)) FROM {NODE_TABLE} "
            "WHERE twin_type = 'ImagingStudy'"
        ).fetchone()
        as_of = row[0] if row else None
    rep.as_of = as_of
    store.con.execute(
        f"""CREATE OR REPLACE TABLE {SCANNER_TABLE} (
            node_id VARCHAR, modality VARCHAR, day DATE, studies_today BIGINT,
            busy_minutes_today DOUBLE, open_minutes DOUBLE, utilization_today DOUBLE,
            last_study_at TIMESTAMPTZ, studies_total BIGINT, as_of TIMESTAMPTZ)"""
    )
    store.con.execute(
        f"""
        INSERT INTO {SCANNER_TABLE}
        WITH st AS (
            SELECT n.node_id,
                   n.props->>'modality' AS modality,
                   TRY_CAST(n.props->>'started' AS TIMESTAMPTZ) AS started,
                   TRY_CAST(n.props->>'series_first' AS TIMESTAMP) AS s_first,
                   TRY_CAST(n.props->>'series_last' AS TIMESTAMP) AS s_last,
                   TRY_CAST(n.props->>'series_count' AS BIGINT) AS s_count,
                   n.props->>'scanner_serial' AS scanner_serial
            FROM {NODE_TABLE} n WHERE n.twin_type = 'ImagingStudy'),
        gap AS (
            SELECT modality,
                   median(date_diff('second', s_first, s_last) / 60.0 / (s_count - 1)) AS per_series
            FROM st WHERE s_count > 1 AND s_last > s_first GROUP BY modality),
        dur AS (
            SELECT st.*, coalesce(date_diff('second', s_first, s_last) / 60.0, 0)
                   + coalesce(g.per_series, {DEFAULT_SERIES_MINUTES}) AS minutes
            FROM st LEFT JOIN gap g USING (modality)),
        sc AS (
            SELECT node_id, props->>'modality' AS modality, props->>'serial_number' AS serial
            FROM {NODE_TABLE} WHERE twin_type = 'ImagingModality'),
        link AS (
            SELECT e.dst AS scanner, d.node_id AS study, d.started, d.minutes
            FROM dur d JOIN {EDGE_TABLE} e ON e.src = d.node_id AND e.rel = 'performed_on'
            UNION
            SELECT sc.node_id, d.node_id, d.started, d.minutes
            FROM dur d JOIN sc ON d.scanner_serial = sc.serial)
        SELECT sc.node_id, sc.modality, CAST($as_of AS DATE),
               count(l.study) FILTER (WHERE CAST(l.started AS DATE) = CAST($as_of AS DATE)),
               coalesce(sum(l.minutes) FILTER (
                   WHERE CAST(l.started AS DATE) = CAST($as_of AS DATE)), 0),
               1440.0,
               coalesce(sum(l.minutes) FILTER (
                   WHERE CAST(l.started AS DATE) = CAST($as_of AS DATE)), 0) / 1440.0,
               max(l.started), count(l.study), CAST($as_of AS TIMESTAMPTZ)
        FROM sc LEFT JOIN link l ON l.scanner = sc.node_id
        GROUP BY sc.node_id, sc.modality
        """,
        {"as_of": as_of},
    )
    rep.rows = _count(store, SCANNER_TABLE)
    return rep
