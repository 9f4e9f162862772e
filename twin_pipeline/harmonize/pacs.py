"""``raw.dicom_header`` → ``harmonized.imaging_instance`` and ``harmonized.imaging_series``.

Rebuilt in SQL in one transaction (idempotent). Instance rows are the instance-level headers
(Part 10 files and instance-level QIDO-RS entries); the same SOP Instance UID twice is kept once
(``prefer_source_format`` order, then smallest lineage key; the others quarantined as
``duplicate``). Series rows aggregate their instances and series-level QIDO-RS entries; a
study-level QIDO-RS entry without any series is quarantined (``study_level_only``).

EHR link (``assets/pacs_dicom.yaml``): StudyInstanceUID, then AccessionNumber, against
``harmonized.imaging_study``; the patient is the linked study's subject, else the patient whose
MRN equals PatientID. Series with no EHR study are kept with ``ehr_match = false``.
Conservation per source file: raw header rows = instance rows + series-level rows harmonized +
quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.sources.dicom import DDL as RAW_DDL
from twin_pipeline.sources.dicom import TABLE as RAW
from twin_pipeline.sources.telemetry import QUARANTINE_ID_SQL
from twin_pipeline.store import Store
from twin_pipeline.yamlfiles import safe_load

SERIES = "harmonized.imaging_series"
INSTANCE = "harmonized.imaging_instance"
PACS_SPEC = ASSETS_DIR / "pacs_dicom.yaml"


class PacsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    required_uids: list[str]
    link_order: list[str]
    patient_link: str
    keep_local_datetimes: bool = True
    prefer_source_format: list[str]
    equipment_identity: list[str]


def load_pacs_spec(path: Path | None = None) -> PacsSpec:
    path = path or PACS_SPEC
    try:
        spec = PacsSpec.model_validate(safe_load(path.read_text()))
    except FileNotFoundError as exc:
        raise ConfigError("PACS spec not found", path=str(path)) from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid PACS spec: {exc}", path=str(path)) from exc
    unknown = set(spec.link_order) - {"study_uid", "accession"}
    if unknown:
        raise ConfigError(f"unknown link methods {sorted(unknown)}", path=str(path))
    return spec


def _dt(date: str, time: str) -> str:
    """DICOM DA + TM (partial times allowed, old colon form too) as TIMESTAMP."""
    t = f"rpad(split_part(replace(coalesce({time}, ''), ':', ''), '.', 1), 6, '0')"
    frac = f"coalesce(nullif(split_part(coalesce({time}, ''), '.', 2), ''), '0')"
    return (
        f"try_strptime(replace({date}, '.', '') || {t} || '.' || rpad({frac}, 6, '0'), "
        "'%Y%m%d%H%M%S.%f')"
    )


def _dicom_dt(dt: str) -> str:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) as local TIMESTAMP (offset kept elsewhere)."""
    core = f"regexp_replace({dt}, '[+-][0-9]{{4}}$', '')"
    return _dt(f"substr({core}, 1, 8)", f"nullif(substr({core}, 9), '')")


@dataclass
class PacsResult:
    instances: int
    series: int
    quarantined: int
    ehr_matched_series: int


def _instances_sql(spec: PacsSpec) -> str:
    pref = " ".join(f"WHEN '{fmt}' THEN {i}" for i, fmt in enumerate(spec.prefer_source_format))
    return f"""
        SELECT h.*,
               row_number() OVER (PARTITION BY sop_instance_uid
                   ORDER BY CASE source_format {pref} ELSE 99 END, lineage_key) AS copy_rank
        FROM {RAW} h WHERE level = 'instance'
    """


def build_instances(store: Store, spec: PacsSpec | None = None) -> PacsResult:
    """Rebuild ``harmonized.imaging_instance`` from the raw headers."""
    spec = spec or load_pacs_spec()
    con = store.con
    with store.transaction():
        con.execute(RAW_DDL)
        con.execute(f"DROP TABLE IF EXISTS {INSTANCE}")
        store.clear_quarantine("harmonize", INSTANCE)
        con.execute(f"CREATE OR REPLACE TEMP TABLE _px AS {_instances_sql(spec)}")
        con.execute(
            f"""
            CREATE TABLE {INSTANCE} AS
            SELECT lineage_key, source_file, position, source_format, sop_instance_uid,
                   series_instance_uid, study_instance_uid, sop_class_uid, instance_number,
                   rows, columns, number_of_frames, pixel_spacing,
                   try_cast(split_part(pixel_spacing, '\\', 1) AS DOUBLE) AS pixel_spacing_row_mm,
                   try_cast(split_part(pixel_spacing, '\\', 2) AS DOUBLE) AS pixel_spacing_col_mm,
                   try_cast(slice_thickness AS DOUBLE) AS slice_thickness,
                   coalesce({_dicom_dt("acquisition_datetime")},
                            {_dt("acquisition_date", "acquisition_time")}) AS acquisition_datetime,
                   timezone_offset, image_comments, burned_in_annotation, transfer_syntax_uid
            FROM _px WHERE copy_rank = 1
            ORDER BY study_instance_uid, series_instance_uid, instance_number, sop_instance_uid
            """
        )
        qid = QUARANTINE_ID_SQL.format(
            stage="'harmonize'",
            table=f"'{INSTANCE}'",
            file="source_file",
            pos="position",
            rule="'duplicate'",
        )
        con.execute(
            f"""
            INSERT INTO governance.quarantine
            SELECT {qid}, ?, 'harmonize', '{INSTANCE}', 'dicom', source_file, position,
                   'duplicate', source_file || ' [' || position || ']: SOP Instance '
                   || sop_instance_uid || ' already harmonized from another copy',
                   NULL, lineage_key, now()
            FROM _px WHERE copy_rank > 1
            """,
            [store.run_id],
        )
        con.execute("DROP TABLE IF EXISTS _px")
        q = con.execute(
            "SELECT count(*) FROM governance.quarantine WHERE stage = 'harmonize' "
            "AND table_name = ?",
            [INSTANCE],
        ).fetchone()
    return PacsResult(store.row_count(INSTANCE), 0, int(q[0]) if q else 0, 0)


def build_series(store: Store, spec: PacsSpec | None = None) -> PacsResult:
    """Rebuild ``harmonized.imaging_series`` from the raw headers, linked to the EHR."""
    spec = spec or load_pacs_spec()
    con = store.con
    with store.transaction():
        con.execute(RAW_DDL)
        con.execute(f"DROP TABLE IF EXISTS {SERIES}")
        store.clear_quarantine("harmonize", SERIES)
        con.execute(
            f"""
            CREATE OR REPLACE TEMP TABLE _ps AS
            SELECT series_instance_uid,
                   any_value(study_instance_uid) AS study_instance_uid,
                   any_value(patient_id) AS mrn,
                   any_value(accession_number) AS accession_number,
                   any_value(modality) AS modality, any_value(body_part) AS body_part,
                   min({_dt("study_date", "study_time")}) AS study_datetime,
                   min(coalesce({_dt("series_date", "series_time")},
                                {_dt("study_date", "study_time")})) AS series_datetime,
                   any_value(timezone_offset) AS timezone_offset,
                   any_value(station_name) AS station_name,
                   any_value(manufacturer) AS manufacturer, any_value(model) AS model,
                   any_value(device_serial) AS device_serial,
                   any_value(institution) AS institution,
                   any_value(study_description) AS study_description,
                   any_value(series_description) AS series_description,
                   any_value(series_number) AS series_number,
                   count(*) FILTER (level = 'instance') AS number_of_instances,
                   min(lineage_key) AS lineage_key
            FROM ({_instances_sql(spec)}) WHERE copy_rank = 1 OR level = 'series'
            GROUP BY series_instance_uid
            """.replace("WHERE level = 'instance'", "WHERE level IN ('instance', 'series')")
        )
        study_link = _study_link_sql(store, spec)
        con.execute(
            f"""
            CREATE TABLE {SERIES} AS
            SELECT s.series_instance_uid, s.study_instance_uid,
                   coalesce(l.ehr_patient_id, m.patient_id) AS patient_id,
                   s.mrn, s.accession_number, s.modality, s.body_part, s.study_datetime,
                   s.series_datetime, s.timezone_offset, s.station_name, s.manufacturer,
                   s.model, s.device_serial, s.institution, s.study_description,
                   s.series_description, s.series_number, s.number_of_instances,
                   l.ehr_study_id, l.link_method, l.ehr_study_id IS NOT NULL AS ehr_match,
                   coalesce(l.ehr_patient_id IS NOT NULL AND m.patient_id IS NOT NULL
                       AND l.ehr_patient_id <> m.patient_id, false) AS patient_mismatch,
                   s.lineage_key
            FROM _ps s
            LEFT JOIN ({study_link}) l ON l.series_instance_uid = s.series_instance_uid
            LEFT JOIN ({_mrn_sql(store)}) m ON m.mrn = s.mrn
            ORDER BY s.study_instance_uid, s.series_number, s.series_instance_uid
            """
        )
        qid = QUARANTINE_ID_SQL.format(
            stage="'harmonize'",
            table=f"'{SERIES}'",
            file="source_file",
            pos="position",
            rule="'study_level_only'",
        )
        con.execute(
            f"""
            INSERT INTO governance.quarantine
            SELECT {qid}, ?, 'harmonize', '{SERIES}', 'dicom', source_file, position,
                   'study_level_only', source_file || ' [' || position || ']: QIDO-RS '
                   || 'study-level entry for ' || study_instance_uid
                   || ' has no series or instance to harmonize', NULL, lineage_key, now()
            FROM {RAW} WHERE level = 'study'
            """,
            [store.run_id],
        )
        con.execute("DROP TABLE IF EXISTS _ps")
        q = con.execute(
            "SELECT count(*) FROM governance.quarantine WHERE stage = 'harmonize' "
            "AND table_name = ?",
            [SERIES],
        ).fetchone()
        matched = con.execute(f"SELECT count(*) FILTER (ehr_match) FROM {SERIES}").fetchone()
    return PacsResult(
        0, store.row_count(SERIES), int(q[0]) if q else 0, int(matched[0]) if matched else 0
    )


def build_pacs(store: Store, spec: PacsSpec | None = None) -> PacsResult:
    """Both tables (instances, then series)."""
    i = build_instances(store, spec)
    s = build_series(store, spec)
    return PacsResult(i.instances, s.series, i.quarantined + s.quarantined, s.ehr_matched_series)


def _study_link_sql(store: Store, spec: PacsSpec) -> str:
    """series_instance_uid -> (ehr_study_id, ehr_patient_id, link_method), first rule wins."""
    if not store.table_exists("harmonized.imaging_study"):
        return (
            "SELECT NULL::VARCHAR AS series_instance_uid, NULL::VARCHAR AS ehr_study_id, "
            "NULL::VARCHAR AS ehr_patient_id, NULL::VARCHAR AS link_method WHERE false"
        )
    parts = []
    for rank, method in enumerate(spec.link_order):
        on = (
            "st.study_instance_uid = s.study_instance_uid"
            if method == "study_uid"
            else "st.accession_number = s.accession_number"
        )
        parts.append(
            f"SELECT s.series_instance_uid, st.study_id, st.patient_id, '{method}' AS method, "
            f"{rank} AS rank FROM _ps s JOIN harmonized.imaging_study st ON {on}"
        )
    union = " UNION ALL ".join(parts)
    return (
        "SELECT series_instance_uid, arg_min(study_id, (rank, study_id)) AS ehr_study_id, "
        "arg_min(patient_id, (rank, study_id)) AS ehr_patient_id, "
        f"arg_min(method, (rank, study_id)) AS link_method FROM ({union}) GROUP BY 1"
    )


def _mrn_sql(store: Store) -> str:
    if not store.table_exists("harmonized.patient"):
        return "SELECT NULL::VARCHAR AS mrn, NULL::VARCHAR AS patient_id WHERE false"
    return (
        "SELECT mrn, min(patient_id) AS patient_id FROM harmonized.patient "
        "WHERE mrn IS NOT NULL GROUP BY mrn"
    )
