"""Structured de-identification on small hand-made harmonized tables."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import pytest

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import load_policy
from twin_pipeline.deid.structured import deidentify_table
from twin_pipeline.errors import PolicyViolation
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

PATIENT_DDL = """
CREATE TABLE harmonized.patient AS SELECT * FROM (VALUES
  ('p1', '10000001', '123-45-6789', 'Quinn', 'Avery', 'female', DATE '1950-03-04', NULL::TIMESTAMPTZ,
   '12 Elm St', 'Worcester', 'MA', '01609', '508-555-0101', 'avery@example.com', TRUE, 'org1', '1',
   TIMESTAMPTZ '2024-01-02 10:00:00+00', FALSE, 'ehr/a.json', 'entry:1', 'lk1'),
  ('p2', '10000002', '234-56-7890', 'Rivers', 'Blake', 'male', DATE '1925-07-08',
   TIMESTAMPTZ '2024-02-01 00:00:00+00', '9 Oak Ave', 'Hyannis', 'MA', '03601', '508-555-0102',
   'blake@example.com', FALSE, 'org1', '1', TIMESTAMPTZ '2024-01-03 10:00:00+00', FALSE,
   'ehr/a.json', 'entry:2', 'lk2')
) t(patient_id, mrn, ssn, family_name, given_name, gender, birth_date, deceased_at, address_line,
    city, state, postal_code, phone, email, research_consent, managing_organization_id,
    version_id, last_updated, deleted, source_file, source_position, lineage_key)
"""

DOC_DDL = """
CREATE TABLE harmonized.document_reference AS SELECT * FROM (VALUES
  ('d1', 'p1', 'e1', TIMESTAMPTZ '2024-03-01 08:00:00+00', 'current', 'http://loinc.org', '11506-3',
   'Progress note', 'Dr. Lee, MD', 'text/plain',
   'Avery Quinn (MRN 10000001) seen 03/01/2024; lives at 12 Elm St, Worcester, MA 01609. Call 508-555-0101.',
   '1', TIMESTAMPTZ '2024-03-01 09:00:00+00', FALSE, 'ehr/b.json', 'entry:1', 'lk3'),
  ('d2', 'p1', 'e2', TIMESTAMPTZ '2024-03-11 08:00:00+00', 'current', 'http://loinc.org', '11506-3',
   'Progress note', 'Dr. Lee, MD', 'text/plain', 'QUINN, AVERY follow-up on 03/11/2024.',
   '1', TIMESTAMPTZ '2024-03-11 09:00:00+00', FALSE, 'ehr/b.json', 'entry:2', 'lk4')
) t(document_id, patient_id, encounter_id, date, status, type_system, type_code, type_display,
    author_display, content_type, note_text, version_id, last_updated, deleted, source_file,
    source_position, lineage_key)
"""


@pytest.fixture
def store(twin_home: Settings) -> Iterator[Store]:
    with Store.open(twin_home) as s:
        s.con.execute(PATIENT_DDL)
        s.con.execute(DOC_DDL)
        yield s


def _rows(store: Store, sql: str) -> list[tuple[object, ...]]:
    return store.con.execute(sql).fetchall()


def test_patient_rules(store: Store, twin_home: Settings) -> None:
    policy = load_policy()
    res = deidentify_table(store, policy, "patient")
    assert res.status == "written" and res.rows == 2 and res.key_version == 1
    cols = [c for c, _ in store.columns("deid.patient")]
    for gone in ("ssn", "family_name", "given_name", "address_line", "city", "phone", "email"):
        assert gone not in cols
    assert {"lineage_key", "key_version", "research_consent", "birth_year"} <= set(cols)
    key = KeyRing(twin_home.keys_dir).pseudonym_key()
    rows = {
        r[0]: r
        for r in _rows(
            store,
            "SELECT patient_id, mrn, birth_year, postal_code, research_consent, deceased_at, "
            "key_version, lineage_key FROM deid.patient",
        )
    }
    p1 = rows[keyed.pseudonym(key, "patient", "p1")]
    p2 = rows[keyed.pseudonym(key, "patient", "p2")]
    assert p1[1] == keyed.pseudonym(key, "mrn", "10000001")
    assert p1[2] == 1950
    assert p2[2] is None  # born 1925: the year itself would reveal an age over 89
    assert p1[3] == "016"
    assert p2[3] == "000"  # 036 is a restricted ZIP3 area
    assert (p1[4], p2[4]) == (True, False)
    off = keyed.day_offset(key, "p2")
    assert p2[5].date() == date(2024, 2, 1).fromordinal(date(2024, 2, 1).toordinal() + off)
    assert p1[6] == 1 and p1[7] == "lk1"


def test_text_columns_are_redacted_consistently(store: Store, twin_home: Settings) -> None:
    res = deidentify_table(store, load_policy(), "document_reference")
    assert res.texts_redacted == 2
    notes = dict(_rows(store, "SELECT lineage_key, note_text FROM deid.document_reference"))
    joined = " ".join(notes.values())
    for raw in ("Avery", "Quinn", "QUINN", "10000001", "12 Elm St", "Worcester", "508-555-0101"):
        assert raw not in joined, raw
    assert "author_display" not in [c for c, _ in store.columns("deid.document_reference")]
    # dates in text move by the same per-patient offset as the structured date column
    key = KeyRing(twin_home.keys_dir).pseudonym_key()
    off = keyed.day_offset(key, "p1")
    first = date.fromordinal(date(2024, 3, 1).toordinal() + off).strftime("%m/%d/%Y")
    second = date.fromordinal(date(2024, 3, 11).toordinal() + off).strftime("%m/%d/%Y")
    assert first in notes["lk3"] and second in notes["lk4"]
    shifted = _rows(store, "SELECT min(date) FROM deid.document_reference")[0][0]
    assert shifted.date() == date.fromordinal(date(2024, 3, 1).toordinal() + off)


def test_key_rotation_changes_surrogates_and_records_version(
    store: Store, twin_home: Settings
) -> None:
    policy = load_policy()
    deidentify_table(store, policy, "patient")
    before = {r[0] for r in _rows(store, "SELECT patient_id FROM deid.patient")}
    KeyRing(twin_home.keys_dir).rotate("pseudonym")
    res = deidentify_table(store, policy, "patient")
    after = {r[0] for r in _rows(store, "SELECT patient_id FROM deid.patient")}
    assert res.key_version == 2
    assert before.isdisjoint(after)
    assert _rows(store, "SELECT DISTINCT key_version FROM deid.patient") == [(2,)]


def test_unknown_column_stops_with_its_name(store: Store) -> None:
    store.con.execute("ALTER TABLE harmonized.patient ADD COLUMN religion VARCHAR")
    with pytest.raises(PolicyViolation, match=r"patient\.religion"):
        deidentify_table(store, load_policy(), "patient")


def test_missing_input_is_skipped_and_withheld_tables_not_written(store: Store) -> None:
    policy = load_policy()
    assert deidentify_table(store, policy, "telemetry_reading").status == "skipped"
    store.con.execute("CREATE TABLE harmonized.fhir_resource (payload JSON)")
    res = deidentify_table(store, policy, "fhir_resource")
    assert res.status == "withheld" and not store.table_exists("deid.fhir_resource")


def test_dicom_uids_consistent_across_series_and_instances(store: Store) -> None:
    store.con.execute(
        "CREATE TABLE harmonized.imaging_series AS SELECT '1.2.3.4' AS series_instance_uid, "
        "'1.2.3' AS study_instance_uid, 'p1' AS patient_id, '10000001' AS mrn, 'RA1' AS "
        "accession_number, 'CT' AS modality, 'CHEST' AS body_part, TIMESTAMP '2024-03-01 08:00' "
        "AS study_datetime, TIMESTAMP '2024-03-01 08:05' AS series_datetime, '-0500' AS "
        "timezone_offset, 'CT01' AS station_name, 'ACME' AS manufacturer, 'X1' AS model, "
        "'SN123' AS device_serial, 'General' AS institution, 'CT CHEST for Avery Quinn' AS "
        "study_description, 'AXIAL' AS series_description, 1 AS series_number, 1 AS "
        "number_of_instances, 's1' AS ehr_study_id, 'uid' AS link_method, TRUE AS ehr_match, "
        "FALSE AS patient_mismatch, 'pacs/x.dcm' AS source_file, 'file' AS position, 'dicom' AS "
        "source_format, 'lk9' AS lineage_key"
    )
    store.con.execute(
        "CREATE TABLE harmonized.imaging_instance AS SELECT 'lk10' AS lineage_key, 'pacs/y.dcm' "
        "AS source_file, 'file' AS position, 'dicom' AS source_format, '1.2.3.4.5' AS "
        "sop_instance_uid, '1.2.3.4' AS series_instance_uid, '1.2.3' AS study_instance_uid, "
        "'1.2.840.10008.5.1.4.1.1.2' AS sop_class_uid, 1 AS instance_number, 512 AS rows, 512 AS "
        "columns, 1 AS number_of_frames, '0.5\\0.5' AS pixel_spacing, 0.5 AS pixel_spacing_row_mm, "
        "0.5 AS pixel_spacing_col_mm, 1.0 AS slice_thickness, TIMESTAMP '2024-03-01 08:06' AS "
        "acquisition_datetime, '-0500' AS timezone_offset, 'Quinn positioned prone' AS "
        "image_comments, NULL::VARCHAR AS burned_in_annotation, '1.2.840.10008.1.2.1' AS "
        "transfer_syntax_uid"
    )
    policy = load_policy()
    deidentify_table(store, policy, "imaging_series")
    deidentify_table(store, policy, "imaging_instance")
    s = _rows(
        store,
        "SELECT series_instance_uid, study_instance_uid, patient_identity_removed, "
        "deidentification_method_codes, study_description, series_datetime FROM deid.imaging_series",
    )[0]
    i = _rows(
        store,
        "SELECT series_instance_uid, study_instance_uid, sop_instance_uid, sop_class_uid, "
        "image_comments, burned_in_annotation_flag, acquisition_datetime FROM deid.imaging_instance",
    )[0]
    assert s[0].startswith("2.25.") and s[0] == i[0] and s[1] == i[1]
    assert i[2].startswith("2.25.") and i[3] == "1.2.840.10008.5.1.4.1.1.2"
    assert s[2] == "YES" and s[3] == "113100\\113107\\113105"
    assert "Quinn" not in s[4] and "Quinn" not in i[4]
    assert i[5] is True  # BurnedInAnnotation missing: flagged for review
    # the instance (patient found through its series) shifts by the same offset as the series
    assert (i[6] - s[5]).total_seconds() == 60
    cols = [c for c, _ in store.columns("deid.imaging_series")]
    assert "station_name" not in cols and "device_serial" not in cols


def test_leak_check_passes_on_deid_output_and_catches_planted_leaks(store: Store) -> None:
    from twin_pipeline.deid.leaks import leak_check

    policy = load_policy()
    for t in ("patient", "document_reference"):
        deidentify_table(store, policy, t)
        rep = leak_check(store, policy, t)
        assert rep.passed, rep.hits
        assert rep.checked_columns > 0
    store.con.execute("UPDATE deid.patient SET state = '10000002'")  # an MRN kept verbatim
    assert not leak_check(store, policy, "patient").passed
    store.con.execute(
        "UPDATE deid.document_reference SET note_text = note_text || ' Seen with QUINN.'"
    )
    hits = leak_check(store, policy, "document_reference").hits
    assert any("note_text" in h and "word" in h for h in hits)
    assert all("Quinn" not in h and "10000002" not in h for h in hits)  # no PHI in the report


def test_table_without_person_gets_written(store: Store) -> None:
    store.con.execute(
        "CREATE TABLE harmonized.location AS SELECT 'loc1' AS location_id, 'Ward A' AS name, "
        "'active' AS status, 'WARD' AS type_code, 'Ward' AS type_display, 'wa' AS physical_type, "
        "NULL::VARCHAR AS part_of_id, 'org1' AS managing_organization_id, 'Worcester' AS city, "
        "'MA' AS state, 42.1 AS latitude, -71.8 AS longitude, '1' AS version_id, "
        "TIMESTAMPTZ '2024-01-01 00:00:00+00' AS last_updated, FALSE AS deleted, "
        "'ehr/l.json' AS source_file, 'entry:1' AS source_position, 'lk20' AS lineage_key"
    )
    res = deidentify_table(store, load_policy(), "location")
    assert res.status == "written" and res.rows == 1
    cols = {c for c, _ in store.columns("deid.location")}
    assert {"city", "latitude", "longitude"}.isdisjoint(cols) and "name" in cols


def test_each_person_and_text_pair_goes_through_the_engine_once(store: Store) -> None:
    """Rows sharing (person, text) are analyzed once and all get that one redaction; the same
    text of another person is analyzed for that person (its deny-list and offset differ)."""
    store.con.execute(
        "INSERT INTO harmonized.document_reference SELECT d.* REPLACE ("
        "'d' || (10 + i) AS document_id, CASE WHEN i < 3 THEN 'p1' ELSE 'p2' END AS patient_id, "
        "'Same words for everyone' AS note_text, 'lkx' || i AS lineage_key) "
        "FROM harmonized.document_reference d, range(5) r(i) WHERE document_id = 'd2'"
    )
    seen: list[tuple[str, str]] = []

    def counting(items: list[tuple[str, str]], key: bytes) -> list[str]:
        seen.extend(items)
        return [f"[{p}] {t.upper()}" for p, t in items]

    res = deidentify_table(store, load_policy(), "document_reference", text_fn=counting)
    assert res.texts_redacted == 7 and res.texts_analyzed == 4
    assert len(seen) == len(set(seen)) == 4
    got = dict(_rows(store, "SELECT lineage_key, note_text FROM deid.document_reference"))
    assert [got[f"lkx{i}"] for i in range(5)] == ["[p1] SAME WORDS FOR EVERYONE"] * 3 + [
        "[p2] SAME WORDS FOR EVERYONE"
    ] * 2
    assert got["lk4"] == "[p1] QUINN, AVERY FOLLOW-UP ON 03/11/2024."


def test_no_text_to_redact_builds_no_engine(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table with no text (empty, or every note NULL) is written without building the text
    engine: building it imports Presidio and spaCy (~3 s), which every small run paid."""
    from twin_pipeline.deid import structured

    def no_engine(*args: object, **kwargs: object) -> object:
        raise AssertionError("the text engine was built with nothing to redact")

    monkeypatch.setattr(structured, "default_text_fn", no_engine)
    store.con.execute("UPDATE harmonized.document_reference SET note_text = NULL")
    res = deidentify_table(store, load_policy(), "document_reference")
    assert res.status == "written" and res.texts_redacted == 0 and res.text_workers == 0
    assert _rows(store, "SELECT count(*), count(note_text) FROM deid.document_reference") == [
        (2, 0)
    ]
    store.con.execute("DELETE FROM harmonized.document_reference")
    res = deidentify_table(store, load_policy(), "document_reference")
    assert res.status == "written"
    assert _rows(store, "SELECT count(*) FROM deid.document_reference") == [(0,)]
