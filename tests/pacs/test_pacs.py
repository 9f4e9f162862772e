"""DICOM reader and PACS harmonization: real pydicom files, bad files, QIDO-RS, EHR link,
device registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from tests.telemetry.helpers import ingest, query
from twin_pipeline.harmonize import devices as D
from twin_pipeline.harmonize.pacs import build_pacs
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def _pacs(settings: Settings):  # type: ignore[no-untyped-def]
    with Store.open(settings) as store:
        return build_pacs(store)


def test_pydicom_test_files(twin_home: Settings, tmp_path: Path) -> None:
    """Every pydicom and pydicom-data test file: read or quarantined with a reason."""
    files = [Path(p) for p in get_testdata_files("*.dcm")]
    assert len(files) > 100
    pacs = tmp_path / "l" / "pacs"
    pacs.mkdir(parents=True)
    for i, p in enumerate(files):
        shutil.copy(p, pacs / f"{i:03d}_{p.name}")
    res = ingest(twin_home, tmp_path / "l")["dicom"]
    assert res.stats.records_in == len(files)
    assert all(fs.balanced() for fs in res.stats.per_file.values())
    rules = dict(query(twin_home, "SELECT rule, count(*) FROM governance.quarantine GROUP BY 1"))
    assert set(rules) <= {"truncated_dicom", "missing_uid", "not_dicom"}
    assert rules["truncated_dicom"] >= 2 and rules["missing_uid"] >= 1
    by_name = dict(
        query(twin_home, "SELECT source_file, rule FROM governance.quarantine WHERE stage='read'")
    )
    assert any(k.endswith("_rtplan_truncated.dcm") for k in by_name)
    assert any(k.endswith("_MR_truncated.dcm") for k in by_name)
    r = _pacs(twin_home)
    ((n_raw,),) = query(twin_home, "SELECT count(*) FROM raw.dicom_header")
    assert n_raw == res.stats.loaded
    assert r.instances + r.quarantined == n_raw  # conservation: duplicates of the same SOP UID
    ((ct,),) = query(
        twin_home,
        "SELECT count(*) FROM harmonized.imaging_instance i JOIN harmonized.imaging_series s "
        "USING (series_instance_uid) WHERE s.modality = 'CT' AND i.rows = 128",
    )
    assert ct >= 1
    # Pixels are never stored; private tags are kept apart.
    ((hdr, priv),) = query(
        twin_home,
        "SELECT count(*) FILTER (json_extract(header_json, '$.\"7FE00010\"') IS NOT NULL), "
        "count(*) FILTER (private_json IS NOT NULL) FROM raw.dicom_header",
    )
    assert hdr == 0 and priv >= 1


def _ct(tmp: Path, name: str, **changes: object) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in changes.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    out = tmp / name
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


BAD = [
    ("text.dcm", "not_dicom"),
    ("cut.dcm", "truncated_dicom"),
    ("nouid.dcm", "missing_uid"),
]


def test_bad_files_quarantined_with_reason(twin_home: Settings, tmp_path: Path) -> None:
    pacs = tmp_path / "l" / "pacs"
    pacs.mkdir(parents=True)
    (pacs / "text.dcm").write_text("this is not an image\n")
    good = _ct(pacs, "good.dcm")
    (pacs / "cut.dcm").write_bytes(good.read_bytes()[: good.stat().st_size - 5000])
    _ct(pacs, "nouid.dcm", SeriesInstanceUID=None)
    ingest(twin_home, tmp_path / "l")
    got = dict(query(twin_home, "SELECT source_file, rule FROM governance.quarantine"))
    assert got == {f"pacs/{n}": rule for n, rule in BAD}
    reasons = [r[0] for r in query(twin_home, "SELECT reason FROM governance.quarantine")]
    assert all(r.startswith("pacs/") for r in reasons)
    assert query(twin_home, "SELECT source_file FROM raw.dicom_header") == [("pacs/good.dcm",)]


def test_qido_json_levels(twin_home: Settings, tmp_path: Path) -> None:
    def obj(**tags: tuple[str, str]) -> dict[str, object]:
        return {t: {"vr": vr, "Value": [v]} for t, (vr, v) in tags.items()}

    doc = [
        obj(
            **{
                "0020000D": ("UI", "1.2.3"),
                "0020000E": ("UI", "1.2.3.4"),
                "00080060": ("CS", "MR"),
                "00080050": ("SH", "ACC1"),
                "00100020": ("LO", "MRN1"),
            }
        ),
        obj(
            **{
                "0020000D": ("UI", "1.2.3"),
                "0020000E": ("UI", "1.2.3.4"),
                "00080018": ("UI", "1.2.3.4.5"),
                "00280010": ("US", "256"),
            }
        ),
        obj(**{"0020000D": ("UI", "1.2.9")}),
        obj(**{"00080060": ("CS", "CT")}),
    ]
    path = tmp_path / "l" / "pacs" / "qido" / "series.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    res = ingest(twin_home, tmp_path / "l")["dicom"]
    fs = res.stats.per_file["pacs/qido/series.json"]
    assert (fs.records_in, fs.loaded, fs.quarantined) == (4, 3, 1)
    r = _pacs(twin_home)
    assert (r.instances, r.series) == (1, 1)
    series = query(
        twin_home,
        "SELECT modality, accession_number, mrn, number_of_instances, ehr_match "
        "FROM harmonized.imaging_series",
    )
    assert series == [("MR", "ACC1", "MRN1", 1, False)]
    rules = sorted(r[0] for r in query(twin_home, "SELECT rule FROM governance.quarantine"))
    assert rules == ["missing_uid", "study_level_only"]


def test_ehr_link_by_uid_accession_and_mrn(twin_home: Settings, tmp_path: Path) -> None:
    pacs = tmp_path / "l" / "pacs"
    _ct(
        pacs,
        "a.dcm",
        StudyInstanceUID="1.2.840.1",
        SeriesInstanceUID="1.2.840.1.1",
        SOPInstanceUID="1.2.840.1.1.1",
        AccessionNumber="X1",
        PatientID="MRN-A",
    )
    _ct(
        pacs,
        "b.dcm",
        StudyInstanceUID="1.2.840.2",
        SeriesInstanceUID="1.2.840.2.1",
        SOPInstanceUID="1.2.840.2.1.1",
        AccessionNumber="ACC-B",
        PatientID="MRN-B",
    )
    _ct(
        pacs,
        "c.dcm",
        StudyInstanceUID="1.2.840.3",
        SeriesInstanceUID="1.2.840.3.1",
        SOPInstanceUID="1.2.840.3.1.1",
        AccessionNumber="NOPE",
        PatientID="MRN-C",
    )
    ingest(twin_home, tmp_path / "l")
    with Store.open(twin_home) as store, store.transaction() as con:
        con.execute(
            "CREATE TABLE harmonized.imaging_study AS SELECT * FROM (VALUES "
            "('st-a', 'pat-a', '1.2.840.1', 'OTHER'), ('st-b', 'pat-b', '9.9', 'ACC-B')) "
            "t(study_id, patient_id, study_instance_uid, accession_number)"
        )
        con.execute(
            "CREATE TABLE harmonized.patient AS SELECT * FROM (VALUES "
            "('pat-a', 'MRN-A'), ('pat-b', 'MRN-B'), ('pat-c', 'MRN-C')) t(patient_id, mrn)"
        )
    _pacs(twin_home)
    got = query(
        twin_home,
        "SELECT study_instance_uid, ehr_study_id, patient_id, link_method, ehr_match "
        "FROM harmonized.imaging_series ORDER BY 1",
    )
    assert got == [
        ("1.2.840.1", "st-a", "pat-a", "study_uid", True),
        ("1.2.840.2", "st-b", "pat-b", "accession", True),
        ("1.2.840.3", None, "pat-c", None, False),  # flagged, not dropped; patient by MRN
    ]


def test_device_registry_merges_sources(twin_home: Settings, tmp_path: Path) -> None:
    _ct(tmp_path / "l" / "pacs", "a.dcm", DeviceSerialNumber="SER-1", StationName="CT01")
    tele = tmp_path / "l" / "telemetry" / "m.ndjson"
    tele.parent.mkdir(parents=True)
    tele.write_text(
        json.dumps(
            {
                "device_id": "mon-1",
                "metric": "HR",
                "value": 70,
                "unit": "/min",
                "ts": "2024-03-05T10:00:00Z",
                "patient_id": "pat-9",
            }
        )
        + "\n"
    )
    ingest(twin_home, tmp_path / "l")
    from twin_pipeline.harmonize import telemetry as T

    with Store.open(twin_home) as store:
        with store.transaction() as con:
            con.execute(
                "CREATE TABLE harmonized.device AS SELECT * FROM (VALUES "
                "('dev-ct', NULL, 'loc-rad', 'GE', 'Revolution', 'SER-1', 'CT scanner'), "
                "('mon-1', 'pat-9', 'bed-1', 'Philips', 'MX800', 'DE1', 'monitor')) "
                "t(device_id, patient_id, location_id, manufacturer, model, serial_number, "
                "device_type)"
            )
            con.execute(
                "CREATE TABLE harmonized.encounter AS SELECT 'enc-1' AS encounter_id, "
                "'pat-9' AS patient_id, 'bed-1' AS location_id, "
                "TIMESTAMPTZ '2024-03-05 09:00:00+00' AS period_start, "
                "TIMESTAMPTZ '2024-03-06 09:00:00+00' AS period_end"
            )
        build_pacs(store)
        T.harmonize_readings(store)
        D.build_registry(store)
        D.build_association(store)
    reg = {
        r[0]: list(r[1])
        for r in query(twin_home, "SELECT device_id, sources FROM harmonized.device_registry")
    }
    assert reg == {"dev-ct": ["fhir", "dicom"], "mon-1": ["fhir", "telemetry"]}
    assoc = query(
        twin_home,
        "SELECT device_id, patient_id, basis FROM harmonized.device_association ORDER BY basis",
    )
    assert assoc == [("mon-1", "pat-9", "encounter_location"), ("mon-1", "pat-9", "telemetry")]


@pytest.mark.parametrize("absent", [True])
def test_registry_without_ehr_tables(twin_home: Settings, absent: bool) -> None:
    with Store.open(twin_home) as store:
        assert D.build_registry(store) == 0
        assert D.build_association(store) == 0


def _norm(v: object) -> object:
    """DICOM JSON compared modulo value padding and empty sequences written as []."""
    if isinstance(v, dict):
        if v.get("vr") == "SQ" and v.get("Value") == []:
            return {"vr": "SQ"}
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v.strip() if isinstance(v, str) else v


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_bigendian.dcm", "test-SR.dcm", "rtdose_rle_1frame.dcm"]
)
def test_header_json_matches_pydicom(name: str) -> None:
    """The fast raw-bytes DICOM JSON equals pydicom's own for every element with a value."""
    import warnings

    from twin_pipeline.sources.dicom import _json_dicts, read_part10

    path = Path(get_testdata_file(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, _ = read_part10(path)
        public, private = _json_dicts(ds)
        ref = pydicom.dcmread(path, stop_before_pixels=True).to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=lambda e: None
        )
    mine = {**public, **private}
    compared = 0
    for key, item in ref.items():
        if "Value" in item and key in mine and not key.startswith("7FE0"):
            if item["vr"] == "SQ" and "7FE00010" in json.dumps(item):
                continue  # icon pixel data inside a sequence is left out on purpose
            assert _norm(mine[key]) == _norm(item), key
            compared += 1
    assert compared > 10
