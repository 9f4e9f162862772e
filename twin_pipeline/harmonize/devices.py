"""One device table from FHIR Device, DICOM equipment and telemetry sources, and who used what.

``harmonized.device_registry``: one row per device. FHIR Devices keep their id; DICOM equipment
(Manufacturer, ManufacturerModelName, DeviceSerialNumber, StationName from
``harmonized.imaging_series``) joins the FHIR Device with the same serial number, else becomes
``dicom:<serial or station>``; telemetry device ids join the FHIR Device of that id, else become
their own row. ``sources`` lists where a device was seen.

``harmonized.device_association(device_id, patient_id, valid_from, valid_to, basis)``: from
encounter locations (a device at a bed is associated with the patient of each encounter there,
for the encounter period), from ``Device.patient`` (open interval when no encounter says more),
and from telemetry readings that name their patient (first to last reading).

Every input table is optional: absent EHR tables are read as empty.
"""

from __future__ import annotations

from twin_pipeline.store import Store

REGISTRY = "harmonized.device_registry"
ASSOCIATION = "harmonized.device_association"


def _or_empty(store: Store, table: str, cols: dict[str, str]) -> str:
    """``table`` projected to ``cols`` (name -> type), or an empty relation when it is absent."""
    if store.table_exists(table):
        have = {c for c, _ in store.columns(table)}
        sel = ", ".join(
            f'"{c}"::{t} AS "{c}"' if c in have else f'NULL::{t} AS "{c}"' for c, t in cols.items()
        )
        return f"(SELECT {sel} FROM {table})"
    sel = ", ".join(f'NULL::{t} AS "{c}"' for c, t in cols.items())
    return f"(SELECT {sel} WHERE false)"


def build_registry(store: Store) -> int:
    dev = _or_empty(
        store,
        "harmonized.device",
        {
            "device_id": "VARCHAR",
            "patient_id": "VARCHAR",
            "location_id": "VARCHAR",
            "manufacturer": "VARCHAR",
            "model": "VARCHAR",
            "serial_number": "VARCHAR",
            "device_type": "VARCHAR",
            "lineage_key": "VARCHAR",
        },
    )
    series = _or_empty(
        store,
        "harmonized.imaging_series",
        {
            "manufacturer": "VARCHAR",
            "model": "VARCHAR",
            "device_serial": "VARCHAR",
            "station_name": "VARCHAR",
            "modality": "VARCHAR",
            "series_datetime": "TIMESTAMP",
            "lineage_key": "VARCHAR",
        },
    )
    tele = _or_empty(
        store,
        "harmonized.telemetry_reading",
        {
            "device_id": "VARCHAR",
            "source_kind": "VARCHAR",
            "ts_utc": "TIMESTAMPTZ",
            "lineage_key": "VARCHAR",
        },
    )
    with store.transaction() as con:
        con.execute(f"DROP TABLE IF EXISTS {REGISTRY}")
        con.execute(
            f"""
            CREATE TABLE {REGISTRY} AS
            WITH fhir AS (SELECT * FROM {dev}),
            equip AS (
                SELECT coalesce(f.device_id, 'dicom:' || coalesce(s.device_serial,
                           s.station_name, s.manufacturer || '/' || s.model)) AS device_id,
                       any_value(s.manufacturer) AS manufacturer, any_value(s.model) AS model,
                       any_value(s.device_serial) AS serial_number,
                       any_value(s.station_name) AS station_name,
                       'imaging:' || any_value(s.modality) AS device_type,
                       count(*) AS n_series, min(s.lineage_key) AS lineage_key
                FROM {series} s
                LEFT JOIN fhir f ON f.serial_number = s.device_serial
                WHERE coalesce(s.device_serial, s.station_name, s.manufacturer) IS NOT NULL
                GROUP BY 1
            ),
            tel AS (
                SELECT device_id, string_agg(DISTINCT source_kind, ',') AS kinds,
                       count(*) AS n_readings, min(ts_utc) AS first_reading,
                       max(ts_utc) AS last_reading, min(lineage_key) AS lineage_key
                FROM {tele} GROUP BY device_id
            ),
            ids AS (
                SELECT device_id FROM fhir UNION SELECT device_id FROM equip
                UNION SELECT device_id FROM tel
            )
            SELECT i.device_id,
                   list_filter([CASE WHEN f.device_id IS NOT NULL THEN 'fhir' END,
                                CASE WHEN e.device_id IS NOT NULL THEN 'dicom' END,
                                CASE WHEN t.device_id IS NOT NULL THEN 'telemetry' END],
                               x -> x IS NOT NULL) AS sources,
                   coalesce(f.manufacturer, e.manufacturer) AS manufacturer,
                   coalesce(f.model, e.model) AS model,
                   coalesce(f.serial_number, e.serial_number) AS serial_number,
                   e.station_name,
                   coalesce(f.device_type, e.device_type,
                            CASE WHEN t.device_id IS NOT NULL THEN 'telemetry:' || t.kinds END)
                       AS device_type,
                   f.patient_id, f.location_id,
                   coalesce(e.n_series, 0) AS n_series, coalesce(t.n_readings, 0) AS n_readings,
                   t.first_reading, t.last_reading,
                   coalesce(f.lineage_key, e.lineage_key, t.lineage_key) AS lineage_key
            FROM ids i
            LEFT JOIN fhir f USING (device_id)
            LEFT JOIN equip e USING (device_id)
            LEFT JOIN tel t USING (device_id)
            ORDER BY i.device_id
            """
        )
    return store.row_count(REGISTRY)


def build_association(store: Store) -> int:
    dev = _or_empty(
        store,
        "harmonized.device",
        {
            "device_id": "VARCHAR",
            "patient_id": "VARCHAR",
            "location_id": "VARCHAR",
            "lineage_key": "VARCHAR",
        },
    )
    enc = _or_empty(
        store,
        "harmonized.encounter",
        {
            "encounter_id": "VARCHAR",
            "patient_id": "VARCHAR",
            "location_id": "VARCHAR",
            "period_start": "TIMESTAMPTZ",
            "period_end": "TIMESTAMPTZ",
            "lineage_key": "VARCHAR",
        },
    )
    tele = _or_empty(
        store,
        "harmonized.telemetry_reading",
        {
            "device_id": "VARCHAR",
            "patient_id": "VARCHAR",
            "ts_utc": "TIMESTAMPTZ",
            "lineage_key": "VARCHAR",
        },
    )
    with store.transaction() as con:
        con.execute(f"DROP TABLE IF EXISTS {ASSOCIATION}")
        con.execute(
            f"""
            CREATE TABLE {ASSOCIATION} AS
            WITH by_location AS (
                SELECT d.device_id, e.patient_id, e.period_start AS valid_from,
                       e.period_end AS valid_to, 'encounter_location' AS basis,
                       e.encounter_id, e.lineage_key
                FROM {dev} d JOIN {enc} e ON e.location_id = d.location_id
                WHERE d.location_id IS NOT NULL AND e.patient_id IS NOT NULL
            ),
            by_device AS (
                SELECT d.device_id, d.patient_id, NULL::TIMESTAMPTZ, NULL::TIMESTAMPTZ,
                       'device_patient', NULL::VARCHAR, d.lineage_key
                FROM {dev} d
                WHERE d.patient_id IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM by_location b
                    WHERE b.device_id = d.device_id AND b.patient_id = d.patient_id)
            ),
            by_readings AS (
                SELECT device_id, patient_id, min(ts_utc), max(ts_utc), 'telemetry',
                       NULL::VARCHAR, min(lineage_key)
                FROM {tele} WHERE patient_id IS NOT NULL GROUP BY device_id, patient_id
            )
            SELECT * FROM by_location UNION ALL SELECT * FROM by_device
            UNION ALL SELECT * FROM by_readings
            ORDER BY device_id, valid_from NULLS FIRST, patient_id
            """
        )
    return store.row_count(ASSOCIATION)
