"""A small de-identified store built by hand, with a known k-anonymity outcome (k = 5).

Patients (pseudonyms ``d<group><n>``), ages as of 2026, ZIP3:

=====  =====  ======  ======  =======  ===========================================
group  count  gender  born    zip3     outcome
=====  =====  ======  ======  =======  ===========================================
A      8      female  1980    021      released (class of 8); A0..A5 have diabetes
B      6      male    1960    100      released (class of 6)
C      3      female  1950    606      suppressed (class of 3 < k)
D      5      male    NULL    021      released ("90+ or unknown", class of 5)
F      1      male    1980    021      suppressed (class of 1)
N      4      female  1980    021      no research consent: never exported
X      1      female  1980    021      consent but deleted: never exported
=====  =====  ======  ======  =======  ===========================================

So 23 patients are considered, 19 released, 4 suppressed. Every patient has 3 encounters and
4 observations; A and C patients have one imaging series with 2 instances each. ``deid.location``
is a reference table; ``deid.mystery`` has no patient link and must not be exported.
``harmonized.patient`` holds the raw identifiers the snapshot must never contain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from twin_pipeline.activity import table_versions
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

GROUPS: list[tuple[str, int, str, int | None, str, bool, bool]] = [
    # group, count, gender, birth_year, zip3, consent, deleted
    ("A", 8, "female", 1980, "021", True, False),
    ("B", 6, "male", 1960, "100", True, False),
    ("C", 3, "female", 1950, "606", True, False),
    ("D", 5, "male", None, "021", True, False),
    ("F", 1, "male", 1980, "021", True, False),
    ("N", 4, "female", 1980, "021", False, False),
    ("X", 1, "female", 1980, "021", True, True),
]
RELEASED = {f"d{g}{i}" for g, n, *_ in GROUPS if g in "ABD" for i in range(n)}
SUPPRESSED = {f"d{g}{i}" for g, n, *_ in GROUPS if g in "CF" for i in range(n)}
NOT_EXPORTED = {f"d{g}{i}" for g, n, *_ in GROUPS if g in "NX" for i in range(n)}
DIABETES = {f"dA{i}" for i in range(6)}
FIXTURE_RUN = "fixture-run-0001"
RAW_IDENTIFIERS = ["Quenneville", "Okonkwo-Smythe", "987-65-4321", "MRN-778899", "zed@example.org"]


def _patients() -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for group, count, gender, born, zip3, consent, deleted in GROUPS:
        for i in range(count):
            pid = f"d{group}{i}"
            rows.append(
                (pid, f"m:{pid}", gender, born, "MA", zip3, consent, deleted, f"lk-{pid}", 1)
            )
    return rows


def build_store(settings: Settings) -> None:
    with Store.open(settings, run_id=FIXTURE_RUN) as store, store.transaction() as con:
        con.execute(
            "CREATE TABLE harmonized.patient (patient_id VARCHAR, mrn VARCHAR, ssn VARCHAR, "
            "family_name VARCHAR, given_name VARCHAR, email VARCHAR, lineage_key VARCHAR)"
        )
        con.execute(
            "INSERT INTO harmonized.patient VALUES ('p1', 'MRN-778899', '987-65-4321', "
            "'Quenneville', 'Okonkwo-Smythe', 'zed@example.org', 'lk-dA0')"
        )
        con.execute(
            "CREATE TABLE deid.patient (patient_id VARCHAR, mrn VARCHAR, gender VARCHAR, "
            "birth_year INTEGER, state VARCHAR, postal_code VARCHAR, research_consent BOOLEAN, "
            "deleted BOOLEAN, lineage_key VARCHAR, key_version INTEGER)"
        )
        con.executemany("INSERT INTO deid.patient VALUES (?,?,?,?,?,?,?,?,?,?)", _patients())
        con.execute(
            "CREATE TABLE deid.encounter AS SELECT 'e-' || p.patient_id || '-' || j AS "
            "encounter_id, p.patient_id, 'finished' AS status, "
            "TIMESTAMPTZ '2025-03-01 08:00:00+00' + to_days(j) AS period_start, "
            "to_hours(4 + j) AS length, "
            "false AS deleted, 'lk-e-' || p.patient_id || '-' || j AS lineage_key, 1 AS key_version "
            "FROM deid.patient p, range(3) r(j)"
        )
        con.execute(
            "CREATE TABLE deid.observation AS SELECT 'o-' || p.patient_id || '-' || j AS "
            "observation_id, p.patient_id, '8867-4' AS code, 60.0 + j AS value, '/min' AS unit, "
            "TIMESTAMPTZ '2025-03-01 08:00:00+00' + to_minutes(j) AS effective_at, "
            # two rows share a lineage_key (a blood-pressure panel split in components)
            "'lk-o-' || p.patient_id || '-' || (j // 2) AS lineage_key, 1 AS key_version "
            "FROM deid.patient p, range(4) r(j)"
        )
        con.execute(
            "CREATE TABLE deid.condition AS SELECT 'c-' || patient_id AS condition_id, "
            "patient_id, 'http://snomed.info/sct' AS code_system, '44054006' AS code, "
            "'Diabetes mellitus type 2' AS display, false AS deleted, "
            "'lk-c-' || patient_id AS lineage_key, 1 AS key_version FROM deid.patient "
            f"WHERE patient_id IN ({', '.join(repr(p) for p in sorted(DIABETES))}) "
            "UNION ALL SELECT 'c-' || patient_id, patient_id, 'http://snomed.info/sct', "
            "'38341003', 'Hypertensive disorder', false, 'lk-c2-' || patient_id, 1 "
            "FROM deid.patient"
        )
        con.execute(
            "CREATE TABLE deid.imaging_series AS SELECT '2.25.' || hash(patient_id) AS "
            "series_instance_uid, patient_id, 'CT' AS modality, 'lk-s-' || patient_id AS "
            "lineage_key, 1 AS key_version FROM deid.patient "
            "WHERE patient_id LIKE 'dA%' OR patient_id LIKE 'dC%'"
        )
        con.execute(
            "CREATE TABLE deid.imaging_instance AS SELECT s.series_instance_uid || '.' || j AS "
            "sop_instance_uid, s.series_instance_uid, 512 AS rows, "
            "'lk-i-' || s.patient_id || '-' || j AS lineage_key, 1 AS key_version "
            "FROM deid.imaging_series s, range(2) r(j)"
        )
        con.execute(
            "CREATE TABLE deid.location AS SELECT * FROM (VALUES ('l1', 'ICU', 'lk-l1', 1), "
            "('l2', 'Ward 3', 'lk-l2', 1), ('l3', 'Radiology', 'lk-l3', 1)) "
            "AS t(location_id, name, lineage_key, key_version)"
        )
        con.execute("CREATE TABLE deid.mystery AS SELECT 'secret' AS what, 'lk-m' AS lineage_key")
        table_versions(store, store.tables(("deid", "harmonized")))


@pytest.fixture
def snap_home(twin_home: Settings) -> Settings:
    build_store(twin_home)
    return twin_home


@pytest.fixture
def cohort_file(tmp_path: Path) -> Path:
    path = tmp_path / "diabetes.yaml"
    path.write_text(
        "name: diabetes-women\n"
        "description: women aged 18 to 65 with type 2 diabetes\n"
        "include:\n"
        "  conditions: ['44054006']\n"
        "  condition_system: http://snomed.info/sct\n"
        "  age_min: 18\n"
        "  age_max: 65\n"
        "  gender: female\n"
    )
    return path
