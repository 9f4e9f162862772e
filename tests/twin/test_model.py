"""The twin model file validates, and invalid models are refused with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR
from twin_pipeline.twin.model import TwinModel, load_model
from twin_pipeline.twin.scenario import SCENARIOS_DIR, load_scenario

REQUIRED = {
    "Patient",
    "Encounter",
    "CareUnit",
    "Bed",
    "Device",
    "ImagingModality",
    "ImagingStudy",
    "StaffRole",
}


def test_shipped_model_loads_with_every_interface(model: TwinModel) -> None:
    assert set(model.by_name) >= REQUIRED
    for iface in model.interfaces:
        assert iface.id.startswith("dtmi:twinpipeline:") and iface.version >= 1
    assert model.source_schema in ("harmonized", "deid")
    assert "harmonized.imaging_series" in model.source_tables()
    assert "harmonized.device_association" in model.source_tables()
    patient = model.interface("Patient")
    assert {t.name for t in patient.telemetry} >= {"heart_rate", "spo2"}
    # Twins carry no direct identifiers.
    cols = {p.column or p.name for i in model.interfaces for p in i.properties}
    assert not cols & {"family_name", "given_name", "mrn", "ssn", "phone", "email", "address_line"}


def _base() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ASSETS_DIR / "twin_model.yaml").read_text())
    return doc


def _mutate_bad_id(d: dict[str, Any]) -> None:
    d["interfaces"][0]["@id"] = "dtmi:twinpipeline:Patient"  # no version


def _mutate_unknown_target(d: dict[str, Any]) -> None:
    d["interfaces"][1]["relationships"][0]["target"] = "Nobody"


def _mutate_duplicate_content(d: dict[str, Any]) -> None:
    d["interfaces"][0]["properties"].append({"name": "gender", "schema": "string"})


def _mutate_bad_sql(d: dict[str, Any]) -> None:
    d["interfaces"][0]["properties"][1]["expr"] = "year(s.birth_date"


def _mutate_both_column_and_expr(d: dict[str, Any]) -> None:
    d["interfaces"][0]["properties"][0]["expr"] = "upper(s.gender)"
    d["interfaces"][0]["properties"][0]["column"] = "gender"


def _mutate_duplicate_interface(d: dict[str, Any]) -> None:
    d["interfaces"].append(dict(d["interfaces"][0]))


def _mutate_bad_schema(d: dict[str, Any]) -> None:
    d["source_schema"] = "raw"


def _mutate_unknown_key(d: dict[str, Any]) -> None:
    d["interfaces"][0]["colour"] = "blue"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_mutate_bad_id, "versioned DTMI"),
        (_mutate_unknown_target, "unknown target"),
        (_mutate_duplicate_content, "used twice"),
        (_mutate_bad_sql, "does not parse"),
        (_mutate_both_column_and_expr, "either column or expr"),
        (_mutate_duplicate_interface, "more than once"),
        (_mutate_bad_schema, "source_schema"),
        (_mutate_unknown_key, "colour"),
    ],
)
def test_invalid_models_are_refused(tmp_path: Path, mutate: Any, message: str) -> None:
    doc = _base()
    mutate(doc)
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_and_non_yaml_model_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_model(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("interfaces: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model(bad)


@pytest.mark.parametrize("path", sorted(SCENARIOS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_loads(path: Path) -> None:
    sc, resolved, sha = load_scenario(path)
    assert resolved == path.resolve()
    assert len(sha) == 64
    assert sc.name == path.stem


def test_bad_scenarios_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("name: x\nimaging: {set_scanners: {CT: 0}}\n")
    with pytest.raises(ConfigError, match="at least 1"):
        load_scenario(p)
    p.write_text("name: x\nimaging: {opening_hours: {CT: {open: 20, close: 8}}}\n")
    with pytest.raises(ConfigError, match="must be after open"):
        load_scenario(p)
    p.write_text(
        "name: x\nexplicit: {q: {arrival_rate_per_hour: 1, service_mean_min: 5, servers: 1}}\n"
    )
    with pytest.raises(ConfigError, match="horizon_days"):
        load_scenario(p)
    with pytest.raises(ConfigError, match="not found"):
        load_scenario(tmp_path / "missing.yaml")
