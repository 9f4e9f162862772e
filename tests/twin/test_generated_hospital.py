"""The twin on a generated hospital: real harmonized tables from the EHR, PACS and telemetry
readers and mappers (not our own synthetic tables)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from twin_pipeline.generate import generate_hospital
from twin_pipeline.harmonize import devices, pacs, telemetry
from twin_pipeline.harmonize import fhir as ehr
from twin_pipeline.ingest import files_of_kind, ingest_files
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.sources import load_readers
from twin_pipeline.store import Store
from twin_pipeline.twin.graph import GraphReport, build_graph
from twin_pipeline.twin.model import load_model
from twin_pipeline.twin.query import match
from twin_pipeline.twin.scenario import load_scenario
from twin_pipeline.twin.simulate import run_simulation
from twin_pipeline.twin.state import build_device_state, build_patient_vitals, build_scanner_state


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, GraphReport]:
    root = tmp_path_factory.mktemp("gen_hospital")
    landing = root / "landing"
    generate_hospital(landing, patients=40, seed=5)
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    readers = load_readers()
    with Store.open(settings) as store:
        for kind in ("fhir", "dicom", "telemetry"):
            ingest_files(store, readers[kind], files_of_kind(landing, kind))
        ehr.build_all(store)
        pacs.build_pacs(store)
        telemetry.harmonize_readings(store)
        devices.build_registry(store)
        devices.build_association(store)
        report = build_graph(store, load_model())
    return settings, report


def test_graph_from_generated_tables(generated: tuple[Settings, GraphReport]) -> None:
    settings, report = generated
    assert report.warnings == []
    with Store.open(settings, read_only=True) as store:
        n_studies = store.row_count("harmonized.imaging_study")
        scanners = store.con.execute(
            "SELECT count(DISTINCT device_serial) FROM harmonized.imaging_series"
        ).fetchone()
    for iface in ("Patient", "Encounter", "CareUnit", "Bed", "Device", "ImagingStudy"):
        assert report.nodes[iface] > 0, iface
    assert report.nodes["ImagingModality"] == 4  # CT, MR, X-ray room (CR+DX), ultrasound
    assert scanners is not None and scanners[0] <= 4
    assert report.nodes["ImagingStudy"] == n_studies
    # Every study whose series were received links to the scanner that acquired it.
    assert report.edges["ImagingStudy.performed_on"] > 0
    assert report.edges["Device.attached_to"] > 0
    assert report.edges["Bed.part_of"] == report.nodes["Bed"]
    assert report.dangling == {}


def test_state_and_query_on_generated_tables(generated: tuple[Settings, GraphReport]) -> None:
    settings, _ = generated
    model = load_model()
    with Store.open(settings) as store:
        vit = build_patient_vitals(store, model)
        dev = build_device_state(store, model)
        scn = build_scanner_state(store, model)
        assert vit.rows > 0 and dev.rows > 0 and scn.rows == 4
        vitals = {
            r[0]
            for r in store.con.execute(
                "SELECT DISTINCT vital FROM twin.twin.state_patient_vitals"
            ).fetchall()
        }
        assert {"heart_rate", "spo2"} <= vitals
        assert dev.as_of is not None
        # Monitors in use at the end of the telemetry, on any unit, through the pattern query.
        res = match(
            store,
            "Device -attached_to-> Patient <-subject- Encounter -located_at-> Bed -part_of-> CareUnit",
            since=dev.as_of - timedelta(days=3),
            until=dev.as_of,
        )
        streaming = {
            r[0]
            for r in store.con.execute(
                "SELECT node_id FROM twin.twin.state_device WHERE status = 'streaming'"
            ).fetchall()
        }
        assert streaming and streaming <= {r[0] for r in res.rows}


def test_baseline_reproduces_generated_history(generated: tuple[Settings, GraphReport]) -> None:
    settings, _ = generated
    sc, _, _ = load_scenario("add_ct_scanner")
    with Store.open(settings, read_only=True) as store:
        r = run_simulation(store, sc)
    assert r["status"] == "ok"
    assert r["history"]["timezone"] == "UTC-05:00"  # from the DICOM timezone offset
    assert "CR+DX" in r["stations"]  # one X-ray room acquires both
    assert r["baseline_error_pct"] < 10
    assert (
        r["stations"]["CT"]["scenario_setup"]["servers"]
        == r["stations"]["CT"]["baseline_setup"]["servers"] + 1
    )
