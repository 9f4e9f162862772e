"""A tiny hand-made twin store: raw records and harmonized tables with planted defects.

Each planted row is tagged with the expectation meant to catch it, so tests are table-driven.
"""

from __future__ import annotations

from dataclasses import dataclass

from twin_pipeline.store import Store

NOW_SQL = "now()"


@dataclass(frozen=True)
class Planted:
    table: str
    lineage_key: str
    expectation: str  # the expectation meant to catch it
    what: str


# Each harmonized row: (lineage_key, values...). Raw rows are made for every lineage key.
PATIENTS = [
    ("pat-1", "p1", "MRN1", "female", "1950-03-01", None, True),
    ("pat-2", "p2", "MRN2", "male", "1971-07-12", None, False),
    ("pat-3", "p3", "MRN3", "M", "1980-01-01", None, True),  # bad gender code
    ("pat-4", "p4", "MRN4", "female", "2190-01-01", None, True),  # born in the future
    ("pat-5", "p5", "MRN5", "male", "1940-01-01", "1930-05-05 10:00:00+00", True),  # dies first
    ("pat-6", "p1", "MRN1", "female", "1950-03-01", None, True),  # duplicate of p1
]
ENCOUNTERS = [
    ("enc-1", "e1", "p1", "finished", "IMP", "2024-01-01 08:00:00+00", "2024-01-03 08:00:00+00"),
    ("enc-2", "e2", "p2", "finished", "AMB", "2024-01-02 08:00:00+00", "2024-01-02 09:00:00+00"),
    ("enc-3", "e3", "p2", "finished", "AMB", "2024-02-02 08:00:00+00", "2024-02-01 09:00:00+00"),
    ("enc-4", "e4", "p1", "finished", "XYZ", "2024-03-02 08:00:00+00", "2024-03-02 09:00:00+00"),
    ("enc-5", "e5", "p9", "finished", "AMB", "2024-03-02 08:00:00+00", "2024-03-02 09:00:00+00"),
]
OBS_COLS = "lineage_key, observation_id, patient_id, code_system, code, component_code, value, unit, effective_at, status"
LOINC = "http://loinc.org"
OBSERVATIONS = [
    ("obs-1", "o1", "p1", LOINC, "8867-4", None, 72.0, "/min", "2024-01-01 09:00:00+00", "final"),
    (
        "obs-2",
        "o2",
        "p1",
        LOINC,
        "85354-9",
        "8480-6",
        120.0,
        "mm[Hg]",
        "2024-01-01 09:00:00+00",
        "final",
    ),
    (
        "obs-2",
        "o2",
        "p1",
        LOINC,
        "85354-9",
        "8462-4",
        80.0,
        "mm[Hg]",
        "2024-01-01 09:00:00+00",
        "final",
    ),
    ("obs-3", "o3", "p2", LOINC, "29463-7", None, 81.5, "kg", "2024-01-02 08:30:00+00", "final"),
    ("obs-4", "o4", "p2", LOINC, "99999-9", None, 5.0, "mg/dL", "2024-01-02 08:30:00+00", "final"),
    (
        "obs-5",
        "o5",
        "p2",
        LOINC,
        "29463-7",
        None,
        81.5,
        "mm[Hg]",
        "2024-01-02 08:30:00+00",
        "final",
    ),
    ("obs-6", "o6", "p2", LOINC, "8867-4", None, 900.0, "/min", "2024-01-02 08:30:00+00", "final"),
    ("obs-7", "o7", "p2", LOINC, "8310-5", None, 37.0, "Cel", None, "final"),
    ("obs-8", "o8", "p9", LOINC, "8867-4", None, 70.0, "/min", "2024-01-02 08:30:00+00", "final"),
    ("obs-9", "o9", "p1", LOINC, None, None, 70.0, "/min", "2024-01-02 08:30:00+00", None),
    ("obs-10", "o1", "p1", LOINC, "8867-4", None, 72.0, "/min", "2024-01-01 09:00:00+00", "final"),
    (
        "obs-11",
        "o11",
        "p1",
        LOINC,
        "2339-0",
        None,
        -20.0,
        "mg/dL",
        "2024-01-01 09:00:00+00",
        "final",
    ),
    ("obs-12", "o12", "p1", LOINC, "8310-5", None, 36.6, "Cel", "2999-01-01 00:00:00+00", "final"),
    ("obs-13", "o13", "p1", LOINC, "8310-5", None, 36.6, None, "2024-01-01 09:00:00+00", "final"),
    (
        "obs-14",
        "o14",
        "p2",
        LOINC,
        "85354-9",
        "8480-6",
        450.0,
        "mm[Hg]",
        "2024-01-02 08:30:00+00",
        "final",
    ),
]
TEL_COLS = "lineage_key, device_id, patient_id, metric, value, unit, ts_utc"
TELEMETRY = [
    ("tel-1", "d1", "p1", "MDC_ECG_HEART_RATE", 80.0, "/min", "2024-01-01 10:00:00+00"),
    ("tel-2", "d1", "p1", "MDC_PULS_OXIM_SAT_O2", 97.0, "%", "2024-01-01 10:00:00+00"),
    ("tel-3", "d1", "p1", "MDC_PULS_OXIM_SAT_O2", 140.0, "%", "2024-01-01 10:01:00+00"),
    ("tel-4", "d1", "p1", "MDC_VENDOR_XYZ_INDEX", 3.0, "/min", "2024-01-01 10:02:00+00"),
    ("tel-5", "d1", "p1", "MDC_ECG_HEART_RATE", 80.0, "/min", "2024-01-01 10:00:00+00"),
    ("tel-6", "d1", "p1", "MDC_RESP_RATE", -5.0, "/min", "2024-01-01 10:03:00+00"),
    ("tel-7", "d1", "p1", "MDC_TEMP_BODY", 37.0, "Cel", None),
    ("tel-8", "d2", "p9", "MDC_ECG_HEART_RATE", 80.0, "/min", "2024-01-01 10:00:00+00"),
]

PLANTED = [
    Planted("harmonized.patient", "pat-3", "patient_gender_in_fhir_valueset", "missing_required"),
    Planted("harmonized.patient", "pat-4", "patient_birth_date_not_in_future", "bad_timestamp"),
    Planted("harmonized.patient", "pat-5", "patient_deceased_after_birth", "bad_timestamp"),
    Planted("harmonized.patient", "pat-6", "patient_id_unique", "duplicate"),
    Planted("harmonized.encounter", "enc-3", "encounter_end_after_start", "bad_timestamp"),
    Planted("harmonized.encounter", "enc-4", "encounter_class_in_actcode_valueset", "unknown_code"),
    Planted("harmonized.encounter", "enc-5", "encounter_patient_exists", "orphan"),
    Planted(
        "harmonized.observation", "obs-4", "observation_code_in_loinc_valueset", "unknown_code"
    ),
    Planted("harmonized.observation", "obs-5", "observation_unit_canonical_for_code", "bad_unit"),
    Planted(
        "harmonized.observation", "obs-6", "observation_heart_rate_plausible", "impossible_value"
    ),
    Planted("harmonized.observation", "obs-7", "observation_effective_at_present", "bad_timestamp"),
    Planted("harmonized.observation", "obs-8", "observation_patient_exists", "orphan"),
    Planted("harmonized.observation", "obs-9", "observation_code_not_null", "missing_required"),
    Planted("harmonized.observation", "obs-9", "observation_status_not_null", "missing_required"),
    Planted("harmonized.observation", "obs-10", "observation_unique", "duplicate"),
    Planted(
        "harmonized.observation", "obs-11", "observation_glucose_plausible", "impossible_value"
    ),
    Planted(
        "harmonized.observation",
        "obs-12",
        "observation_effective_at_not_in_future",
        "bad_timestamp",
    ),
    Planted("harmonized.observation", "obs-13", "observation_value_has_unit", "bad_unit"),
    Planted(
        "harmonized.observation", "obs-14", "observation_systolic_bp_plausible", "impossible_value"
    ),
    Planted(
        "harmonized.telemetry_reading", "tel-3", "telemetry_spo2_plausible", "impossible_value"
    ),
    Planted(
        "harmonized.telemetry_reading", "tel-4", "telemetry_metric_in_mdc_valueset", "unknown_code"
    ),
    Planted("harmonized.telemetry_reading", "tel-5", "telemetry_reading_unique", "duplicate"),
    Planted(
        "harmonized.telemetry_reading", "tel-6", "telemetry_resp_rate_plausible", "impossible_value"
    ),
    Planted("harmonized.telemetry_reading", "tel-7", "telemetry_ts_present", "bad_timestamp"),
    Planted("harmonized.telemetry_reading", "tel-8", "telemetry_patient_exists", "orphan"),
]
CLEAN_KEYS = {
    "harmonized.patient": {"pat-1", "pat-2"},
    "harmonized.encounter": {"enc-1", "enc-2"},
    "harmonized.observation": {"obs-1", "obs-2", "obs-3"},
    "harmonized.telemetry_reading": {"tel-1", "tel-2"},
}


def _lit(v: object) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _values(rows: list[tuple[object, ...]]) -> str:
    return ", ".join("(" + ", ".join(_lit(v) for v in r) + ")" for r in rows)


def build_store(store: Store, *, clean: bool = False) -> None:
    """Create raw.* and harmonized.{patient,encounter,observation,telemetry_reading}."""

    def keep(rows: list[tuple[object, ...]], table: str) -> list[tuple[object, ...]]:
        return [r for r in rows if not clean or r[0] in CLEAN_KEYS[table]]

    patients = keep(PATIENTS, "harmonized.patient")
    encounters = keep(ENCOUNTERS, "harmonized.encounter")
    observations = keep(OBSERVATIONS, "harmonized.observation")
    telemetry = keep(TELEMETRY, "harmonized.telemetry_reading")
    con = store.con
    with store.transaction():
        con.execute(
            "CREATE OR REPLACE TABLE raw.fhir_resource (lineage_key VARCHAR, source_file VARCHAR,"
            " position VARCHAR, resource_type VARCHAR, record_hash VARCHAR, payload VARCHAR)"
        )
        con.execute(
            "CREATE OR REPLACE TABLE raw.telemetry_reading (lineage_key VARCHAR, source_file VARCHAR,"
            " position VARCHAR, record_hash VARCHAR, payload VARCHAR)"
        )
        fhir_raw: list[tuple[object, ...]] = []
        for rtype, rows in (
            ("Patient", patients),
            ("Encounter", encounters),
            ("Observation", observations),
        ):
            seen: set[object] = set()
            for i, r in enumerate(rows, start=1):
                if r[0] in seen:
                    continue
                seen.add(r[0])
                fhir_raw.append((r[0], f"ehr/bulk/{rtype}.ndjson", f"line:{i}", rtype, "h", "{}"))
        con.execute(f"INSERT INTO raw.fhir_resource VALUES {_values(fhir_raw)}")
        tel_raw = [
            (r[0], "telemetry/monitors-000.ndjson", f"line:{i}", "h", "{}")
            for i, r in enumerate(telemetry, start=1)
        ]
        con.execute(f"INSERT INTO raw.telemetry_reading VALUES {_values(tel_raw)}")
        for path, kind in (
            ("ehr/bulk/Patient.ndjson", "fhir"),
            ("ehr/bulk/Encounter.ndjson", "fhir"),
            ("ehr/bulk/Observation.ndjson", "fhir"),
            ("telemetry/monitors-000.ndjson", "telemetry"),
        ):
            con.execute(
                "INSERT OR REPLACE INTO governance.source_file (path, kind) VALUES (?, ?)",
                [path, kind],
            )
        con.execute(
            "CREATE OR REPLACE TABLE harmonized.patient (lineage_key VARCHAR, patient_id VARCHAR,"
            " mrn VARCHAR, gender VARCHAR, birth_date DATE, deceased_at TIMESTAMPTZ,"
            " research_consent BOOLEAN)"
        )
        con.execute(f"INSERT INTO harmonized.patient VALUES {_values(patients)}")
        con.execute(
            "CREATE OR REPLACE TABLE harmonized.encounter (lineage_key VARCHAR, encounter_id"
            " VARCHAR, patient_id VARCHAR, status VARCHAR, class_code VARCHAR, period_start"
            " TIMESTAMPTZ, period_end TIMESTAMPTZ)"
        )
        con.execute(f"INSERT INTO harmonized.encounter VALUES {_values(encounters)}")
        con.execute(
            "CREATE OR REPLACE TABLE harmonized.observation (lineage_key VARCHAR, observation_id"
            " VARCHAR, patient_id VARCHAR, code_system VARCHAR, code VARCHAR, component_code"
            " VARCHAR, value DOUBLE, unit VARCHAR, effective_at TIMESTAMPTZ, status VARCHAR)"
        )
        con.execute(
            f"INSERT INTO harmonized.observation ({OBS_COLS}) VALUES {_values(observations)}"
        )
        con.execute(
            "CREATE OR REPLACE TABLE harmonized.telemetry_reading (lineage_key VARCHAR, device_id"
            " VARCHAR, patient_id VARCHAR, metric VARCHAR, value DOUBLE, unit VARCHAR, ts_utc"
            " TIMESTAMPTZ)"
        )
        con.execute(
            f"INSERT INTO harmonized.telemetry_reading ({TEL_COLS}) VALUES {_values(telemetry)}"
        )
