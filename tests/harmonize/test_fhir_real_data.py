"""Real data: the Synthea bulk export (shared data) and a generated sample hospital."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from twin_pipeline.harmonize import fhir as ehr

from .conftest import Ehr, private_env

SYNTHEA_COUNTS = {
    "AllergyIntolerance": 11,
    "Condition": 555,
    "Device": 16,
    "DocumentReference": 1215,
    "Encounter": 1215,
    "Immunization": 161,
    "Location": 44,
    "MedicationRequest": 1745,
    "Organization": 43,
    "Patient": 13,
    "Practitioner": 43,
    "PractitionerRole": 43,
    "Procedure": 2056,
}


@pytest.fixture(scope="module")
def synthea(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Ehr:
    env = private_env(tmp_path_factory.mktemp("synthea"))
    shutil.copytree(shared_data / "synthea-10", env.landing / "ehr" / "bulk")
    env.run()
    return env


def test_synthea_every_resource_harmonized_per_type(synthea: Ehr) -> None:
    with synthea.store() as store:
        report = ehr.type_report(store)
        balance = ehr.conservation(store)
    for rtype, n in SYNTHEA_COUNTS.items():
        assert report[rtype]["raw"] == n, rtype
        assert report[rtype]["harmonized"] == n, rtype
        assert report[rtype]["quarantined"] == 0, rtype
        assert report[rtype]["table"] is not None, rtype
    # the export's log.ndjson is not FHIR: its 4 lines are quarantined, nothing else is
    assert synthea.quarantine() == {
        ("ehr/bulk/log.ndjson", f"line:{n}"): "unknown_resource_type" for n in range(1, 5)
    }
    assert all(f["balanced"] for f in balance), balance
    assert sum(f["in"] for f in balance) == sum(SYNTHEA_COUNTS.values()) + 4


@pytest.mark.parametrize(
    ("table", "n"),
    [
        ("patient", 13),
        ("encounter", 1215),
        ("condition", 555),
        ("procedure", 2056),
        ("medication_request", 1745),
        ("immunization", 161),
        ("allergy_intolerance", 11),
        ("document_reference", 1215),
        ("device", 16),
        ("location", 44),
        ("organization", 43),
        ("practitioner", 43),
        ("practitioner_role", 43),
        ("observation", 0),
        ("imaging_study", 0),
    ],
)
def test_synthea_table_counts(synthea: Ehr, table: str, n: int) -> None:
    assert synthea.rows(f"SELECT count(*) FROM harmonized.{table}") == [(n,)]


def test_synthea_known_values(synthea: Ehr) -> None:
    (p,) = synthea.dicts(
        "SELECT * FROM harmonized.patient WHERE patient_id = '129c6ac7-8d06-89de-ad63-0204a93e76c3'"
    )
    assert (p["family_name"], p["gender"], str(p["birth_date"])) == (
        "Medhurst46",
        "female",
        "1927-05-21",
    )
    assert p["ssn"] == "999-94-5397"
    assert p["deceased_at"] is not None
    (e,) = synthea.dicts(
        "SELECT * FROM harmonized.encounter WHERE encounter_id = '00c7f717-4030-5582-2ed8-888ad2bc878e'"
    )
    assert e["patient_id"] == "79a66c97-6131-3213-f3c9-4606946ab056"
    # conditional references (Location?identifier=..., Practitioner?identifier=npi|...) resolve
    assert e["location_id"] == "3b23bdf7-5bd6-30bf-85a9-a37d7d74938a"
    assert e["practitioner_id"] is not None
    assert str(e["period_start"]) == "1989-10-04 06:25:16+00:00"
    (d,) = synthea.dicts(
        "SELECT * FROM harmonized.document_reference "
        "WHERE document_id = '00212c89-d070-985e-b695-b5f12fffd23e'"
    )
    assert d["note_text"].startswith("\n1987-11-19\n\n# Chief Complaint\n- Cough")
    assert d["type_code"] == "34117-2"
    # every patient reference in the export resolves
    assert synthea.rows(
        "SELECT count(*) FROM harmonized.dangling_reference WHERE target_type = 'Patient'"
    ) == [(0,)]


def test_generated_hospital_planted_defects_land_in_quarantine(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from twin_pipeline.generate.core import generate_hospital

    env = private_env(tmp_path_factory.mktemp("generated"))
    generate_hospital(env.landing, patients=12, seed=11, dirty_rate=0.05)
    # only the EHR part matters here
    for sub in ("pacs", "telemetry", "labels"):
        shutil.rmtree(env.landing / sub, ignore_errors=True)
    env.run()
    manifest = json.loads((env.landing / "manifest.json").read_text())
    planted = [d for d in manifest["dirty"] if d["path"].startswith("ehr/")]
    assert planted, "the generator planted no EHR defects"
    quarantined = env.quarantine()
    status = {
        (f, p): s
        for f, p, s in env.rows(
            "SELECT source_file, position, status FROM harmonized.fhir_record_status"
        )
    }
    for d in planted:
        key = (d["path"], d["position"])
        if d["kind"] == "duplicate":
            assert status[key] == "duplicate", d
        else:
            assert key in quarantined, d
    with env.store() as store:
        assert all(f["balanced"] for f in ehr.conservation(store))


@pytest.mark.parametrize(
    ("table", "key", "expected"),
    [
        ("condition", "0023b3a7-2ded-840c-ee5b-6b123fdcfb0b", {
            "code_system": "http://snomed.info/sct", "code": "91302008",
            "display": "Sepsis (disorder)", "clinical_status": "active",
            "patient_id": "129c6ac7-8d06-89de-ad63-0204a93e76c3",
            "encounter_id": "f6003197-6507-1168-87be-ceccd5517094",
            "onset_at": "1976-01-20 03:58:16+00:00"}),
        ("procedure", "0007498e-ddd1-0048-bc43-bf238e4b3f01", {
            "code": "430193006", "status": "completed",
            "patient_id": "8e1a0a7c-e308-444b-075a-3c2b1f60f881",
            "performed_start": "2022-06-22 16:31:08+00:00",
            "location_id": "903d2c77-31a2-3572-b99d-55fcdb7e3f52"}),
        ("medication_request", "002eb5b8-2964-effd-3b09-f132017dae04", {
            "code_system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076",
            "display": "lisinopril 10 MG Oral Tablet", "status": "stopped", "intent": "order",
            "dose_value": 1.0}),
        ("immunization", "04912b69-f775-5a9d-3e8b-9d06c28165ad", {
            "code_system": "http://hl7.org/fhir/sid/cvx", "code": "62",
            "patient_id": "fb7c882a-f897-e7c5-67e0-825e7fd55d15", "status": "completed"}),
        ("allergy_intolerance", "1b2ce4a9-9773-f40f-6692-cb4d1283a9ca", {
            "code": "1191", "display": "Aspirin", "criticality": "low",
            "category": "medication", "clinical_status": "active",
            "patient_id": "cbc86e51-9eca-3855-76ec-c058f72c5761"}),
        ("location", "0b9875ba-9310-313d-93d4-bf552585d527", {
            "name": "LIFE CARE CENTER OF BURLINGTON", "city": "BURLINGTON", "state": "KS",
            "latitude": 38.206373}),
        ("organization", "048630ac-ba97-3386-9ac5-d8bf6392db50", {
            "name": "HILLTOP MANOR NURSING CENTER", "type_code": "prov", "active": True}),
        ("practitioner", "0965e26a-8bc3-395f-b7b0-4620fb6e778c", {
            "npi": "9999908392", "family_name": "Emard19", "given_name": "Irvin970",
            "gender": "male", "email": "Irvin970.Emard19@example.com"}),
        ("practitioner_role", "01a97323-3c5e-0b03-7dcf-b0e9c1d87759", {
            "organization_id": "55f9298b-e904-3fe0-ae3d-e8c0c4f7faf8",
            "location_id": "7cf6ad8f-30a6-33bb-8fe0-6f688207a213", "code": "208D00000X"}),
        ("device", "031165b5-6fd0-d716-ccc3-bbaba3ab379a", {
            "serial_number": "9866037", "device_type": "Blood glucose meter (physical object)",
            "device_type_code": "337414009",
            "patient_id": "79a66c97-6131-3213-f3c9-4606946ab056"}),
    ],
)  # fmt: skip
def test_synthea_mapping_per_table(
    synthea: Ehr, table: str, key: str, expected: dict[str, object]
) -> None:
    from twin_pipeline.harmonize.fhir_spec import load_spec

    key_col = load_spec().tables[table].key
    (row,) = synthea.dicts(f"SELECT * FROM harmonized.{table} WHERE {key_col} = ?", [key])
    got = {k: (str(row[k]) if k.endswith(("_at", "_start")) else row[k]) for k in expected}
    assert got == expected
