"""UCUM conversion, the mapping spec, and which files the FHIR reader claims."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from twin_pipeline.errors import ConfigError
from twin_pipeline.harmonize.fhir_spec import EHR_SPEC, load_spec, load_spec_file
from twin_pipeline.harmonize.units import UnitError, convert, parse_unit
from twin_pipeline.sources.fhir import FhirReader, validate_resource


@pytest.mark.parametrize(
    ("value", "src", "dst", "molar_mass", "expected"),
    [
        (150, "[lb_av]", "kg", None, 68.0388555),
        (70500, "g", "kg", None, 70.5),
        (98.6, "[degF]", "Cel", None, 37.0),
        (37, "Cel", "[degF]", None, 98.6),
        (310.15, "K", "Cel", None, 37.0),
        (70, "[in_i]", "cm", None, 177.8),
        (12, "kPa", "mm[Hg]", None, 90.0074),
        (72, "{beats}/min", "/min", None, 72),
        (1.2, "/s", "/min", None, 72),
        (5.5, "mmol/L", "mg/dL", 180.156, 99.0858),
        (88.4, "umol/L", "mg/dL", 113.12, 1.0),
        (1, "g/L", "mg/dL", None, 100),
        (25, "kg/m2", "kg/m2", None, 25),
        (97, "%", "%", None, 97),
    ],
)
def test_conversions(
    value: float, src: str, dst: str, molar_mass: float | None, expected: float
) -> None:
    assert math.isclose(convert(value, src, dst, molar_mass=molar_mass), expected, rel_tol=1e-4)


@pytest.mark.parametrize(
    ("src", "dst", "molar_mass"),
    [
        ("kg", "mm[Hg]", None),
        ("mmol/L", "mg/dL", None),  # needs a molar mass
        ("Cel", "kg", None),
        ("furlong", "m", None),
        ("", "kg", None),
    ],
)
def test_unconvertible_units_raise(src: str, dst: str, molar_mass: float | None) -> None:
    with pytest.raises(UnitError):
        convert(1.0, src, dst, molar_mass=molar_mass)


def test_parse_unit_dimensions() -> None:
    assert parse_unit("mg/dL").dim == parse_unit("g/L").dim
    assert parse_unit("/min").dim == (("T", -1),)


def test_spec_loads_and_names_the_model() -> None:
    spec = load_spec()
    assert spec.model.module == "fhir.resources.R4B"
    expected = {
        "patient", "encounter", "observation", "condition", "procedure", "medication_request",
        "allergy_intolerance", "location", "device", "imaging_study", "document_reference",
        "immunization", "organization", "practitioner", "practitioner_role",
    }  # fmt: skip
    assert set(spec.tables) == expected
    assert spec.observation.vocabulary["29463-7"].unit == "kg"
    assert spec.observation.vocabulary["85354-9"].components == ["8480-6", "8462-4"]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("unit: kg, min: 0.2", "unit: furlongs, min: 0.2", "unknown UCUM unit"),
        (
            "- {name: mrn, kind: identifier, type_code: MR}",
            "- {name: mrn, kind: identifier}",
            "identifier needs system or type_code",
        ),
        ("resource: Location", "resource: Patient", "mapped twice"),
        ('components: ["8480-6", "8462-4"]}', 'components: ["8480-6", "0000-0"]}', "component"),
    ],
)
def test_invalid_spec_is_rejected(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = EHR_SPEC.read_text()
    assert old in text
    bad = tmp_path / "ehr_fhir.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_spec_file(bad)


@pytest.mark.parametrize(
    ("rel", "claimed"),
    [
        ("ehr/bundles/bundle-00001.json", True),
        ("ehr/bulk/Observation.ndjson", True),
        ("ehr/bulk/Observation.ndjson.gz", True),
        ("exports/fhir/anything.ndjson", True),
        ("export/Patient.000.ndjson", True),
        ("Condition.ndjson", True),
        ("synthea/Practitioner.000.ndjson.gz", True),
        ("telemetry/monitors-000.ndjson", False),
        ("telemetry/ehr/odd.ndjson", False),
        ("exports/log.ndjson", False),
        ("exports/Monitors.ndjson", False),
        ("pacs/1.2.3/4.5/6.dcm", False),
        ("ehr/notes.txt", False),
    ],
)
def test_reader_claims(rel: str, claimed: bool) -> None:
    assert FhirReader().matches(rel) is claimed


@pytest.mark.parametrize(
    ("resource", "rule", "fragment"),
    [
        ({"resourceType": "Patient", "id": "a", "gender": "M"}, "validation_failed", "Patient.gender"),
        ({"resourceType": "Patient", "id": "a", "birthDate": "1999-02-30"}, "bad_timestamp", "birthDate"),
        ({"resourceType": "Observation", "id": "o", "status": "final"}, "missing_required", "Observation.code"),
        ({"resourceType": "Patient", "id": "a", "active": "maybe"}, "validation_failed", "Patient.active"),
        ({"resourceType": "Patient", "id": "a b"}, "validation_failed", "Patient.id"),
        ({"resourceType": "Unicorn", "id": "u"}, "unknown_resource_type", "Unicorn"),
    ],
)  # fmt: skip
def test_validation_verdicts(resource: dict[str, object], rule: str, fragment: str) -> None:
    verdict = validate_resource(resource)
    assert verdict is not None
    assert verdict[0] == rule
    assert fragment in verdict[1]


def test_valid_resource_passes() -> None:
    assert validate_resource({"resourceType": "Patient", "id": "a", "gender": "female"}) is None
