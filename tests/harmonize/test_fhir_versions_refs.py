"""Versions, history, deletes, idempotency and reference resolution across files and runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from twin_pipeline.harmonize import fhir as ehr

from .conftest import Ehr


def patient(pid: str, version: str | None, updated: str | None, family: str) -> dict[str, Any]:
    res: dict[str, Any] = {"resourceType": "Patient", "id": pid, "name": [{"family": family}]}
    meta = {k: v for k, v in (("versionId", version), ("lastUpdated", updated)) if v}
    if meta:
        res["meta"] = meta
    return res


@pytest.mark.parametrize(
    ("first", "second", "current_family", "history_families"),
    [
        # a newer versionId/lastUpdated replaces; the old one goes to history
        (
            ("1", "2024-01-01T00:00:00Z", "Old"),
            ("2", "2024-02-01T00:00:00Z", "New"),
            "New",
            ["Old"],
        ),
        # an older version arriving later does not replace the newer one
        (
            ("2", "2024-02-01T00:00:00Z", "New"),
            ("1", "2024-01-01T00:00:00Z", "Old"),
            "New",
            ["Old"],
        ),
        # versionId alone decides when lastUpdated is absent (numeric, not text, order)
        (("9", None, "Nine"), ("10", None, "Ten"), "Ten", ["Nine"]),
        # no version information: the content that arrived last wins
        ((None, None, "First"), (None, None, "Second"), "Second", ["First"]),
        # the same version seen twice is one row and no history
        (("1", "2024-01-01T00:00:00Z", "Same"), ("1", "2024-01-01T00:00:00Z", "Same"), "Same", []),
    ],
)
def test_versions_across_runs(
    ehr_env: Ehr,
    first: tuple[str | None, str | None, str],
    second: tuple[str | None, str | None, str],
    current_family: str,
    history_families: list[str],
) -> None:
    ehr_env.ndjson("ehr/a/Patient.ndjson", [patient("p1", *first)])
    ehr_env.run()
    ehr_env.ndjson("ehr/b/Patient.ndjson", [patient("p1", *second)])
    ehr_env.run()
    assert ehr_env.rows("SELECT family_name FROM harmonized.patient") == [(current_family,)]
    hist = ehr_env.rows(
        "SELECT json_extract_string(payload, '$.name[0].family') FROM harmonized.fhir_history "
        "ORDER BY 1"
    )
    assert [h[0] for h in hist] == history_families
    with ehr_env.store() as store:
        assert all(r["balanced"] for r in ehr.conservation(store))


def test_changed_file_replaces_what_it_loaded(ehr_env: Ehr) -> None:
    ehr_env.ndjson(
        "ehr/Patient.ndjson", [patient("p1", None, None, "A"), patient("p2", None, None, "B")]
    )
    ehr_env.run()
    ehr_env.ndjson("ehr/Patient.ndjson", [patient("p1", None, None, "A2")])
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id, family_name FROM harmonized.patient") == [("p1", "A2")]
    assert ehr_env.rows("SELECT count(*) FROM raw.fhir_resource") == [(1,)]


def test_delete_in_a_later_bundle_marks_deleted_and_keeps_history(ehr_env: Ehr) -> None:
    ehr_env.ndjson("ehr/bulk/Patient.ndjson", [patient("p9", "1", "2024-01-01T00:00:00Z", "Gone")])
    ehr_env.run()
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "DELETE", "url": "Patient/p9"}}],
    }
    ehr_env.write("ehr/bundles/delete.json", json.dumps(bundle))
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id, family_name, deleted FROM harmonized.patient") == [
        ("p9", "Gone", True)
    ]
    with ehr_env.store() as store:
        report = {r["file"]: r for r in ehr.conservation(store)}
    assert report["ehr/bundles/delete.json"]["deletes"] == 1
    assert all(r["balanced"] for r in report.values())


def test_rerun_without_new_files_keeps_every_hash(ehr_env: Ehr) -> None:
    ehr_env.ndjson("ehr/Patient.ndjson", [patient("p1", "1", None, "A")])
    ehr_env.run()
    before = ehr_env.hashes()
    ehr_env.run()
    assert ehr_env.hashes() == before


def _encounter(eid: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": subject},
    }


@pytest.mark.parametrize(
    "reference",
    [
        "Patient/p42",
        "http://ehr.example.org/fhir/Patient/p42",
        "Patient/p42/_history/3",
        "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|MRN-42",
    ],
)
def test_dangling_reference_resolves_when_target_arrives_later(
    ehr_env: Ehr, reference: str
) -> None:
    ehr_env.ndjson("ehr/day1/Encounter.ndjson", [_encounter("e1", reference)])
    ehr_env.run()
    (d,) = ehr_env.dicts("SELECT * FROM harmonized.dangling_reference")
    assert (d["from_id"], d["reference"], d["resolved"]) == ("e1", reference, False)
    target = patient("p42", None, None, "Late")
    target["identifier"] = [{"system": "urn:oid:2.16.840.1.113883.19.5", "value": "MRN-42"}]
    ehr_env.ndjson("ehr/day2/Patient.ndjson", [target])
    ehr_env.run()
    (d,) = ehr_env.dicts("SELECT * FROM harmonized.dangling_reference")
    assert (d["target_id"], d["resolved"]) == ("p42", True)
    assert ehr_env.rows("SELECT patient_id FROM harmonized.encounter") == [("p42",)]


def test_reference_to_a_resource_in_another_file_of_the_same_load_is_not_dangling(
    ehr_env: Ehr,
) -> None:
    ehr_env.ndjson("ehr/Encounter.ndjson", [_encounter("e1", "Patient/p1")])
    ehr_env.ndjson("ehr/Patient.ndjson", [patient("p1", None, None, "X")])
    ehr_env.run()
    assert ehr_env.rows("SELECT count(*) FROM harmonized.dangling_reference") == [(0,)]
    assert ehr_env.rows("SELECT patient_id FROM harmonized.encounter") == [("p1",)]


def test_searchset_bundle_and_single_resource_file(ehr_env: Ehr) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {
                "fullUrl": "http://x.org/fhir/Patient/s1",
                "resource": patient("s1", None, None, "S"),
                "search": {"mode": "match"},
            },
            {
                "resource": {
                    "resourceType": "OperationOutcome",
                    "id": "oo1",
                    "issue": [{"severity": "information", "code": "informational"}],
                },
                "search": {"mode": "outcome"},
            },
        ],
    }
    ehr_env.write("fhir/search.json", json.dumps(bundle))
    ehr_env.write("fhir/p2.json", json.dumps(patient("p2", None, None, "Single")))
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id FROM harmonized.patient ORDER BY 1") == [
        ("p2",),
        ("s1",),
    ]
    with ehr_env.store() as store:
        report = {r["file"]: r for r in ehr.conservation(store)}
        types = ehr.type_report(store)
    # OperationOutcome has no table: kept in raw, reported
    assert report["fhir/search.json"]["raw_only"] == 1
    assert types["OperationOutcome"]["table"] is None
    assert report["fhir/p2.json"] == {**report["fhir/p2.json"], "in": 1, "harmonized": 1}


def test_broken_bundle_file_is_one_quarantined_record(ehr_env: Ehr) -> None:
    ehr_env.write("ehr/bundles/broken.json", '{"resourceType": "Bundle", "entry": [')
    ehr_env.ndjson("ehr/Patient.ndjson", [patient("p1", None, None, "Fine")])
    ehr_env.run()
    assert ehr_env.quarantine() == {("ehr/bundles/broken.json", "file"): "broken_json"}
    assert ehr_env.rows("SELECT count(*) FROM harmonized.patient") == [(1,)]


@pytest.mark.parametrize(
    ("reference", "patient_id", "dangling"),
    [
        ("Patient/p7", "p7", [("Patient/p7", False)]),  # unresolved: id kept, flagged
        ("Group/g1", None, [("Group/g1", False)]),  # not a patient: no patient_id
        ("#contained-patient", None, []),  # contained: never dangling
        (
            "urn:uuid:9d3c0000-0000-4000-8000-000000000000",
            "9d3c0000-0000-4000-8000-000000000000",
            [("urn:uuid:9d3c0000-0000-4000-8000-000000000000", False)],
        ),
    ],
)
def test_reference_forms_fill_the_target_column_only_for_the_target_type(
    ehr_env: Ehr, reference: str, patient_id: str | None, dangling: list[tuple[str, bool]]
) -> None:
    ehr_env.ndjson("ehr/Encounter.ndjson", [_encounter("e1", reference)])
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id FROM harmonized.encounter") == [(patient_id,)]
    assert ehr_env.rows("SELECT reference, resolved FROM harmonized.dangling_reference") == dangling


def test_put_entry_without_id_takes_the_id_from_the_request_url(ehr_env: Ehr) -> None:
    res = patient("ignored", None, None, "Put")
    del res["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7f000000-0000-4000-8000-000000000001",
                "resource": res,
                "request": {"method": "PUT", "url": "Patient/mrn-77"},
            }
        ],
    }
    ehr_env.write("ehr/bundles/put.json", json.dumps(bundle))
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id, family_name FROM harmonized.patient") == [
        ("mrn-77", "Put")
    ]


def test_twin_ehr_report_cli(ehr_env: Ehr, capsys: pytest.CaptureFixture[str]) -> None:
    from twin_pipeline.cli import main

    ehr_env.ndjson("ehr/Patient.ndjson", [patient("p1", None, None, "A")])
    ehr_env.write("ehr/Observation.ndjson", '{"resourceType": "Observation"\n')
    ehr_env.run()
    assert main(["ehr", "report", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["types"]["Patient"]["harmonized"] == 1
    assert doc["types"]["(not a resource)"]["reasons"] == {"broken_json": 1}
    assert {f["file"]: f["balanced"] for f in doc["files"]} == {
        "ehr/Observation.ndjson": True,
        "ehr/Patient.ndjson": True,
    }


def test_rows_removed_by_quality_quarantine_still_balance(
    ehr_env: Ehr, capsys: pytest.CaptureFixture[str]
) -> None:
    from twin_pipeline.cli import main
    from twin_pipeline.store import QuarantineRow

    ehr_env.ndjson(
        "ehr/Patient.ndjson", [patient("p1", None, None, "A"), patient("p2", None, None, "B")]
    )
    ehr_env.run()
    with ehr_env.store() as store, store.transaction():
        (lk,) = store.con.execute(
            "SELECT lineage_key FROM harmonized.patient WHERE patient_id = 'p2'"
        ).fetchone()
        # what a blocking data-quality expectation does to a failing row
        store.con.execute("DELETE FROM harmonized.patient WHERE lineage_key = ?", [lk])
        store.quarantine(
            [
                QuarantineRow(
                    "quality",
                    "harmonized.patient",
                    "fhir",
                    "ehr/Patient.ndjson",
                    "line:2",
                    "some_expectation",
                    "failed",
                    None,
                    lk,
                )
            ]
        )
        (report,) = ehr.conservation(store)
    assert (report["harmonized"], report["quarantined"], report["balanced"]) == (1, 1, True)
    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["conservation"]["fhir"] == {"files": 1, "balanced": 1, "unbalanced": []}


def test_without_versions_the_later_record_of_a_file_and_the_later_file_win(ehr_env: Ehr) -> None:
    """Arrival order is the files' registration, then their path, then the record's place in
    its file: the same resource twice in one file, and again in two files of one run."""
    ehr_env.ndjson(
        "ehr/a/Patient.ndjson",
        [patient("p1", None, None, "First"), patient("p1", None, None, "Second")],
    )
    ehr_env.ndjson("ehr/b/Patient.ndjson", [patient("p2", None, None, "B1")])
    ehr_env.ndjson("ehr/c/Patient.ndjson", [patient("p2", None, None, "C1")])
    ehr_env.run()
    assert ehr_env.rows("SELECT patient_id, family_name FROM harmonized.patient ORDER BY 1") == [
        ("p1", "Second"),
        ("p2", "C1"),
    ]
    hist = ehr_env.rows(
        "SELECT resource_id, json_extract_string(payload, '$.name[0].family') "
        "FROM harmonized.fhir_history ORDER BY 1"
    )
    assert hist == [("p1", "First"), ("p2", "B1")]
