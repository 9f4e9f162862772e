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
