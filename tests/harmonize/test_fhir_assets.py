"""The harmonized/* EHR assets: present in the code location, governed, and they materialize."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from twin_pipeline.activity import activities
from twin_pipeline.definitions import defs
from twin_pipeline.harmonize.fhir_spec import load_spec
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

from .conftest import FIXTURES


def test_every_table_has_an_asset_depending_on_the_versions() -> None:
    specs = {s.key: s for s in defs.resolve_all_asset_specs()}
    versions = dg.AssetKey(["harmonized", "fhir_resource"])
    assert dg.AssetKey(["raw", "fhir"]) in {d.asset_key for d in specs[versions].deps}
    for name in load_spec().tables:
        spec = specs[dg.AssetKey(["harmonized", name])]
        assert versions in {d.asset_key for d in spec.deps}
        assert spec.group_name == "harmonized"
    dangling = specs[dg.AssetKey(["harmonized", "dangling_reference"])]
    assert dg.AssetKey(["harmonized", "patient"]) in {d.asset_key for d in dangling.deps}


def test_pipeline_materializes_ehr_tables_with_activity_records(
    twin_home: Settings, tmp_path: Path
) -> None:
    from twin_pipeline.defs.runner import run_pipeline

    landing = tmp_path / "landing"
    shutil.copytree(FIXTURES, landing)
    selection = [
        "raw/fhir",
        "harmonized/fhir_resource",
        "harmonized/patient",
        "harmonized/observation",
        "harmonized/encounter",
    ]
    summary = run_pipeline(landing, twin_home, selection=selection, ephemeral=True)
    assert summary.success, summary.failures
    obs = summary.materializations["harmonized/observation"]
    assert obs["quarantined"] == 6  # 2 bad_unit, 3 impossible_value, 1 unknown_code
    assert obs["quarantined_impossible_value"] == 3
    with Store.open(twin_home, read_only=True) as store:
        assert store.row_count("harmonized.patient") == 2
        acts = {a["asset_key"]: a for a in activities(store, summary.run_id)}
    act = acts["harmonized/observation"]
    assert "harmonized.fhir_resource" in act["inputs"]
    assert act["outputs"][0]["table"] == "harmonized.observation"
