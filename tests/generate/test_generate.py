"""Tests for the deterministic sample-hospital generator."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class

from twin_pipeline.generate import GenerationReport, generate_hospital
from twin_pipeline.generate.vocab import DIRTY_KINDS, KNOWN_LOINC, KNOWN_METRICS

CLEAN_PATIENTS = 70  # 4 bundles: every (collection|transaction) x (urn|literal) combination
TELEMETRY_KEYS = {"device_id", "patient_id", "metric", "value", "unit", "ts"}
PHI_LABELS = {
    "PERSON", "DATE", "AGE", "PHONE", "SSN", "EMAIL", "URL", "IP_ADDRESS", "ADDRESS", "ZIP",
    "MRN", "ACCESSION", "DEVICE_SERIAL", "LOCATION",
}  # fmt: skip
FHIR_DATETIME = re.compile(
    r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|"
    r"3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?)?)?"
    r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)?)?)?$"
)
ALLOWED_UNITS = {
    "29463-7": {"kg", "[lb_av]", "g"},
    "8302-2": {"cm", "[in_i]"},
    "8310-5": {"Cel", "[degF]"},
    "8867-4": {"/min"},
    "9279-1": {"/min"},
    "59408-5": {"%"},
    "2708-6": {"%"},
    "2339-0": {"mg/dL", "mmol/L"},
    "2160-0": {"mg/dL"},
}
PLAUSIBLE_OBS = {
    "kg": (0.2, 500), "[lb_av]": (0.5, 1100), "g": (200, 500000), "cm": (30, 250),
    "[in_i]": (12, 100), "Cel": (25, 45), "[degF]": (77, 113), "%": (40, 100),
    "mg/dL": (0.05, 2000), "mmol/L": (0.5, 100),
}  # fmt: skip
PLAUSIBLE_OBS_BY_CODE = {"8867-4": (15, 300), "9279-1": (2, 80)}
PLAUSIBLE_METRIC = {
    "MDC_PULS_OXIM_SAT_O2": (40, 100), "MDC_ECG_HEART_RATE": (15, 300),
    "MDC_RESP_RATE": (2, 80), "MDC_PRESS_BLD_NONINV_SYS": (40, 300),
    "MDC_PRESS_BLD_NONINV_DIA": (15, 200), "MDC_TEMP_BODY": (25, 45),
}  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def all_resources(root: Path) -> list[dict[str, Any]]:
    """Every resource of a clean run, from bundles and bulk files."""
    out: list[dict[str, Any]] = []
    for f in sorted((root / "ehr" / "bundles").glob("*.json")):
        out.extend(e["resource"] for e in json.loads(f.read_text())["entry"])
    for f in sorted((root / "ehr" / "bulk").glob("*.ndjson")):
        out.extend(json.loads(line) for line in f.read_text().splitlines())
    return out


def by_type(resources: list[dict[str, Any]], rtype: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["resourceType"] == rtype]


def ref_id(ref: str) -> str:
    return ref.rsplit(":", 1)[-1] if ref.startswith("urn:uuid:") else ref.split("/", 1)[1]


def parse_fhir_dt(value: str) -> datetime:
    assert FHIR_DATETIME.match(value), value
    return datetime.fromisoformat(value)


def dicom_intact(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1))
        expected = ds.Rows * ds.Columns * (ds.BitsAllocated // 8) * frames
        return "PixelData" in ds and len(ds.PixelData) >= expected
    except Exception:
        return False


def telemetry_rows(root: Path) -> list[tuple[str, int, dict[str, Any]]]:
    rows: list[tuple[str, int, dict[str, Any]]] = []
    for f in sorted((root / "telemetry").glob("*.ndjson")):
        for n, line in enumerate(f.read_text().splitlines(), start=1):
            rows.append((f.name, n, json.loads(line)))
    for f in sorted((root / "telemetry").glob("*.csv")):
        with f.open(newline="") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                rows.append((f.name, n, {**row, "value": float(row["value"])}))
    return rows


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerationReport]:
    root = tmp_path_factory.mktemp("clean") / "hospital"
    calls: list[tuple[str, int, int]] = []
    report = generate_hospital(root, CLEAN_PATIENTS, 7, progress=lambda *a: calls.append(a))
    assert calls and calls[-1] == ("done", CLEAN_PATIENTS, CLEAN_PATIENTS)
    return root, report


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dirty") / "hospital"
    generate_hospital(root, 20, 11, dirty_rate=0.1)
    return root


# -- tests -----------------------------------------------------------------------------------


def test_deterministic(tmp_path: Path) -> None:
    generate_hospital(tmp_path / "a", 20, 3, dirty_rate=0.05)
    generate_hospital(tmp_path / "b", 20, 3, dirty_rate=0.05)
    generate_hospital(tmp_path / "c", 20, 4, dirty_rate=0.05)
    a, b, c = (tree_hashes(tmp_path / x) for x in "abc")
    assert a == b
    assert len(a) > 20
    assert a != c
    assert a["manifest.json"] != c["manifest.json"]
    # regenerating into an existing generated tree replaces it exactly
    generate_hospital(tmp_path / "a", 20, 3, dirty_rate=0.05)
    assert tree_hashes(tmp_path / "a") == a


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_hospital(tmp_path / "x", 0, 1)
    with pytest.raises(ValueError):
        generate_hospital(tmp_path / "x", 5, 1, dirty_rate=1.5)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("not ours")
    with pytest.raises(ValueError):
        generate_hospital(tmp_path / "foreign", 5, 1)


def test_fhir_resources_validate(clean: tuple[Path, GenerationReport]) -> None:
    root, _ = clean
    bundles = sorted((root / "ehr" / "bundles").glob("*.json"))
    assert len(bundles) == 4
    styles = set()
    for f in bundles:
        bundle = json.loads(f.read_text())
        get_fhir_model_class("Bundle").model_validate(bundle)
        entries = bundle["entry"]
        assert all(e["fullUrl"] == f"urn:uuid:{e['resource']['id']}" for e in entries)
        if bundle["type"] == "transaction":
            assert all(e["request"]["method"] in ("PUT", "POST") for e in entries)
        subj = {
            e["resource"]["subject"]["reference"].split(":")[0].split("/")[0]
            for e in entries
            if "subject" in e["resource"]
        }
        assert len(subj) == 1
        styles.add((bundle["type"], subj.pop()))
    assert styles == {(t, s) for t in ("collection", "transaction") for s in ("urn", "Patient")}
    n = 0
    for f in sorted((root / "ehr" / "bulk").glob("*.ndjson")):
        for line in f.read_text().splitlines():
            res = json.loads(line)
            assert res["resourceType"] == f.stem
            get_fhir_model_class(res["resourceType"]).model_validate(res)
            n += 1
    assert n > 1000


def test_resources_are_realistic(clean: tuple[Path, GenerationReport]) -> None:
    root, _ = clean
    resources = all_resources(root)
    ids = [r["id"] for r in resources]
    assert len(ids) == len(set(ids))
    types = Counter(r["resourceType"] for r in resources)
    for t in (
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "Procedure",
        "MedicationRequest",
        "AllergyIntolerance",
        "Location",
        "Device",
        "ImagingStudy",
        "DocumentReference",
    ):
        assert types[t] > 0, t
    assert 30 * CLEAN_PATIENTS < sum(types.values()) < 100 * CLEAN_PATIENTS
    manifest = json.loads((root / "manifest.json").read_text())
    ref_now = datetime.fromisoformat(manifest["reference_datetime"])
    loinc = Counter()
    units = Counter()
    for r in resources:
        for key in ("effectiveDateTime", "authoredOn", "performedDateTime", "started", "date"):
            if key in r:
                assert parse_fhir_dt(r[key]) <= ref_now, (key, r[key])
        if r["resourceType"] == "Encounter":
            start, end = (parse_fhir_dt(r["period"][k]) for k in ("start", "end"))
            assert ref_now - timedelta(days=740) < start < end <= ref_now
        if r["resourceType"] == "Observation":
            code = r["code"]["coding"][-1]["code"]
            loinc[code] += 1
            q = r.get("valueQuantity")
            if q:
                assert q["system"] == "http://unitsofmeasure.org"
                assert q["code"] in ALLOWED_UNITS[code]
                units[q["code"]] += 1
            else:
                assert code == "85354-9"
                assert {c["code"]["coding"][0]["code"] for c in r["component"]} == {
                    "8480-6",
                    "8462-4",
                }
    assert set(loinc) == {
        "29463-7",
        "8310-5",
        "8867-4",
        "9279-1",
        "59408-5",
        "85354-9",
        "2339-0",
        "8302-2",
        "2160-0",
    }
    assert {"[lb_av]", "[degF]", "mmol/L", "[in_i]"} <= set(units)
    for p in by_type(resources, "Patient"):
        systems = {i["system"] for i in p["identifier"]}
        assert {"urn:oid:2.16.840.1.113883.19.5", "http://hl7.org/fhir/sid/us-ssn"} <= systems
        assert re.fullmatch(r"\d{5}", p["address"][0]["postalCode"])
        assert p["extension"][0]["valueBoolean"] in (True, False)
    beds = [loc for loc in by_type(resources, "Location") if "partOf" in loc]
    assert len(beds) > 20
    scanners = [d for d in by_type(resources, "Device") if "patient" not in d]
    assert 3 <= len(scanners) <= 4
    assert all(d["serialNumber"] for d in by_type(resources, "Device"))


def test_dicom_matches_imaging_studies(clean: tuple[Path, GenerationReport]) -> None:
    root, report = clean
    resources = all_resources(root)
    mrn = {
        p["id"]: next(i["value"] for i in p["identifier"] if i["type"]["coding"][0]["code"] == "MR")
        for p in by_type(resources, "Patient")
    }
    scanner_serials = {d["id"]: d["serialNumber"] for d in by_type(resources, "Device")}
    files = sorted((root / "pacs").rglob("*.dcm"))
    assert len(files) == report.dicom_files > 0
    seen: set[str] = set()
    for study in by_type(resources, "ImagingStudy"):
        uid = next(i["value"] for i in study["identifier"] if i["system"] == "urn:dicom:uid")
        assert uid.startswith("urn:oid:2.25.")
        uid = uid.removeprefix("urn:oid:")
        acc = next(
            i["value"]
            for i in study["identifier"]
            if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"
        )
        for series in study["series"]:
            started = parse_fhir_dt(series["started"])
            serial = scanner_serials[series["performer"][0]["actor"]["reference"].split("/")[1]]
            assert series["numberOfInstances"] == len(series["instance"])
            for inst in series["instance"]:
                path = root / "pacs" / uid / series["uid"] / f"{inst['uid']}.dcm"
                ds = pydicom.dcmread(path)
                assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
                assert ds.StudyInstanceUID == uid
                assert ds.SeriesInstanceUID == series["uid"]
                assert ds.SOPInstanceUID == inst["uid"]
                assert ds.SOPClassUID == inst["sopClass"]["code"].removeprefix("urn:oid:")
                assert ds.AccessionNumber == acc
                assert ds.Modality == series["modality"]["code"]
                assert ds.PatientID == mrn[ref_id(study["subject"]["reference"])]
                assert ds.DeviceSerialNumber == serial
                assert f"{ds.SeriesDate}{ds.SeriesTime}" == started.strftime("%Y%m%d%H%M%S")
                assert ds.pixel_array.shape[-2:] == (8, 8)
                seen.add(str(path))
    assert seen == {str(f) for f in files}


def test_telemetry_matches_devices(clean: tuple[Path, GenerationReport]) -> None:
    root, report = clean
    resources = all_resources(root)
    monitors = {d["id"]: d for d in by_type(resources, "Device") if "patient" in d}
    encounters = by_type(resources, "Encounter")
    rows = telemetry_rows(root)
    assert len(rows) == report.telemetry_readings
    assert (
        (root / "telemetry" / "legacy-gateway.csv")
        .read_text()
        .startswith("device_id,patient_id,metric,value,unit,ts\n")
    )
    assert any(f.endswith(".csv") for f, _, _ in rows)
    monitored = {r["patient_id"] for _, _, r in rows}
    assert 0.15 < len(monitored) / CLEAN_PATIENTS < 0.5
    last: dict[tuple[str, str], datetime] = {}
    gaps = 0
    for _, _, r in rows:
        assert set(r) == TELEMETRY_KEYS
        assert r["metric"] in KNOWN_METRICS
        dev = monitors[r["device_id"]]
        assert ref_id(dev["patient"]["reference"]) == r["patient_id"]
        ts = datetime.fromisoformat(r["ts"])
        assert ts.utcoffset() is not None
        assert any(
            e["class"]["code"] == "IMP"
            and ref_id(e["subject"]["reference"]) == r["patient_id"]
            and parse_fhir_dt(e["period"]["start"]) <= ts <= parse_fhir_dt(e["period"]["end"])
            for e in encounters
        )
        key = (r["device_id"], r["metric"])
        if (
            key in last
            and ts - last[key] > timedelta(minutes=5)
            and r["metric"] in ("MDC_ECG_HEART_RATE",)
        ):
            gaps += 1
        last[key] = ts
    assert gaps >= 1
    per_patient = Counter(r["patient_id"] for _, _, r in rows)
    assert min(per_patient.values()) > 100


def test_phi_labels(clean: tuple[Path, GenerationReport]) -> None:
    root, report = clean
    resources = all_resources(root)
    patients = {p["id"]: p for p in by_type(resources, "Patient")}
    docs = {d["id"]: d for d in by_type(resources, "DocumentReference")}
    manifest = json.loads((root / "manifest.json").read_text())
    idents = manifest["identifiers"]
    lines = (root / "labels" / "phi.jsonl").read_text().splitlines()
    assert len(lines) == len(docs) == report.notes
    labels_seen: Counter[str] = Counter()
    for line in lines:
        note = json.loads(line)
        doc = docs[note["note_id"]]
        text = note["text"]
        assert base64.b64decode(doc["content"][0]["attachment"]["data"]).decode() == text
        assert doc["content"][0]["attachment"]["contentType"] == "text/plain"
        assert 700 < len(text) < 2000
        p = patients[note["patient_id"]]
        mrn = next(i["value"] for i in p["identifier"] if i["system"].startswith("urn:oid"))
        ssn = next(i["value"] for i in p["identifier"] if i["system"].endswith("us-ssn"))
        given, family = p["name"][0]["given"][0], p["name"][0]["family"]
        name_forms = {f"{given} {family}", f"{family}, {given}", family}
        end = -1
        for span in note["spans"]:
            assert span["label"] in PHI_LABELS
            assert span["start"] >= end and span["end"] > span["start"]
            end = span["end"]
            value = text[span["start"] : span["end"]]
            assert value == value.strip() and value
            labels_seen[span["label"]] += 1
            label = span["label"]
            if label == "MRN":
                assert value == mrn and value in idents["mrns"]
            elif label == "SSN":
                assert value == ssn and value in idents["ssns"]
            elif label == "EMAIL":
                assert value == p["telecom"][1]["value"] and value in idents["emails"]
            elif label == "ZIP":
                assert value == p["address"][0]["postalCode"]
            elif label == "LOCATION":
                assert value == p["address"][0]["city"]
            elif label == "ADDRESS":
                assert value == p["address"][0]["line"][0] and value in idents["addresses"]
            elif label == "PHONE":
                assert value in idents["phones"]
            elif label == "AGE":
                assert int(value.split("-")[0]) > 89
            elif label == "PERSON":
                assert (
                    value.title() in {n.title() for n in name_forms}
                    or value.title() in {n.title() for n in idents["names"]}
                    or " ".join(reversed(value.split(", "))).title()
                    in {n.title() for n in idents["names"]}
                ), value
            elif label == "DATE":
                assert any(
                    _parses(value, f) for f in ("%Y-%m-%d", "%m/%d/%Y", "%d %b %Y", "%B %d, %Y")
                ), value
        assert f"{given} {family}" in idents["names"]
        assert p["birthDate"] in idents["birth_dates"]
        # unlabelled text holds no planted identifier
        masked = "".join(
            "#" if any(s["start"] <= i < s["end"] for s in note["spans"]) else ch
            for i, ch in enumerate(text)
        )
        for secret in (
            mrn,
            ssn,
            p["telecom"][1]["value"],
            p["address"][0]["line"][0],
            f"{given} {family}",
        ):
            assert secret not in masked
    for label in (
        "PERSON",
        "DATE",
        "MRN",
        "PHONE",
        "ADDRESS",
        "ZIP",
        "LOCATION",
        "EMAIL",
        "ACCESSION",
        "DEVICE_SERIAL",
        "IP_ADDRESS",
        "URL",
        "SSN",
    ):
        assert labels_seen[label] > 0, label


def _parses(value: str, fmt: str) -> bool:
    try:
        datetime.strptime(value, fmt)
    except ValueError:
        return False
    return True


def test_manifest_counts_match_files(clean: tuple[Path, GenerationReport]) -> None:
    root, report = clean
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["patients"] == CLEAN_PATIENTS
    assert manifest["dirty_rate"] == 0.0 and manifest["dirty"] == []
    counts = manifest["counts"]
    assert counts == report.counts()
    actual = Counter(r["resourceType"] for r in all_resources(root))
    assert counts["resources"] == dict(sorted(actual.items()))
    assert counts["resources"]["Patient"] == CLEAN_PATIENTS
    assert counts["dicom_files"] == len(list((root / "pacs").rglob("*.dcm")))
    assert counts["telemetry_readings"] == len(telemetry_rows(root))
    assert counts["notes"] == len((root / "labels" / "phi.jsonl").read_text().splitlines())
    for area in ("ehr", "pacs", "telemetry"):
        assert counts["bytes"][area] == sum(
            f.stat().st_size for f in (root / area).rglob("*") if f.is_file()
        )
    assert len(manifest["identifiers"]["mrns"]) == CLEAN_PATIENTS
    assert report.to_dict()["total_resources"] == sum(actual.values())


def test_dirty_records_are_defective(dirty: Path) -> None:
    manifest = json.loads((dirty / "manifest.json").read_text())
    records = manifest["dirty"]
    assert {r["kind"] for r in records} == set(DIRTY_KINDS)
    assert len(records) > 100
    for rec in records:
        _assert_defective(dirty, rec)


def _assert_defective(root: Path, rec: dict[str, str]) -> None:
    kind, path, pos = rec["kind"], root / rec["path"], rec["position"]
    if pos == "file":
        if kind == "broken_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(path.read_text())
        else:
            assert kind == "truncated_dicom"
            assert not dicom_intact(path)
        return
    where, n_text = pos.split(":")
    n = int(n_text)
    if where == "entry":
        entries = json.loads(path.read_text())["entry"]
        record, prev = entries[n]["resource"], entries[n - 1]["resource"] if n else None
        raw = prev_raw = None
    else:
        lines = path.read_text().splitlines()
        raw, prev_raw = lines[n - 1], lines[n - 2] if n >= 2 else None
        if kind == "broken_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(raw)
            return
        if path.suffix == ".csv":
            cells = dict(zip(lines[0].split(","), raw.split(","), strict=True))
            record = {**cells, "value": float(cells["value"])}
        else:
            record = json.loads(raw)
        prev = None
    if kind == "duplicate":
        assert (raw == prev_raw) if raw is not None else (record == prev)
        return
    if kind == "unknown_resource_type":
        assert record["resourceType"] == "Spaceship"
        return
    if "metric" in record:  # telemetry reading
        if kind == "unknown_code":
            assert record["metric"] not in KNOWN_METRICS
        elif kind == "impossible_value":
            lo, hi = PLAUSIBLE_METRIC[record["metric"]]
            assert not lo <= float(record["value"]) <= hi
        elif kind == "bad_timestamp":
            with pytest.raises(ValueError):
                datetime.fromisoformat(record["ts"])
        else:
            pytest.fail(f"unexpected telemetry defect {kind}")
        return
    if kind == "missing_required":
        if record["resourceType"] == "Patient":
            assert record["gender"] not in ("male", "female", "other", "unknown")
        else:
            assert "code" not in record or "status" not in record
        return
    code = record["code"]["coding"][-1]["code"]
    if kind == "unknown_code":
        assert code not in KNOWN_LOINC
    elif kind == "bad_unit":
        q = record["valueQuantity"]
        assert "code" not in q or q["code"] not in ALLOWED_UNITS[code]
    elif kind == "impossible_value":
        q = record["valueQuantity"]
        lo, hi = PLAUSIBLE_OBS_BY_CODE.get(code, PLAUSIBLE_OBS[q["code"]])
        assert not lo <= q["value"] <= hi
    elif kind == "bad_timestamp":
        value = record["effectiveDateTime"]
        bad = not FHIR_DATETIME.match(value)
        if not bad:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                bad = True
        assert bad, value
    else:
        pytest.fail(f"unexpected defect {kind}")


def test_dirty_run_keeps_clean_records_valid(dirty: Path) -> None:
    manifest = json.loads((dirty / "manifest.json").read_text())
    flagged = {(r["path"], r["position"]) for r in manifest["dirty"]}
    bulk = dirty / "ehr" / "bulk" / "Observation.ndjson"
    model = get_fhir_model_class("Observation")
    checked = 0
    for n, line in enumerate(bulk.read_text().splitlines(), start=1):
        if ("ehr/bulk/Observation.ndjson", f"line:{n}") in flagged:
            continue
        res = json.loads(line)
        model.model_validate(res)
        assert res["code"]["coding"][-1]["code"] in KNOWN_LOINC
        checked += 1
    assert checked > 100


def test_cli_register(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from twin_pipeline.cli.generate import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["generate", "--patients", "3", "--seed", "5", "--out", str(tmp_path / "h"), "--quiet"]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["patients"] == 3 and summary["resources"] > 50
    assert (tmp_path / "h" / "manifest.json").is_file()
