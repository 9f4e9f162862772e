"""The twin graph is built from the tables the model names, tolerates gaps, and is stable."""

from __future__ import annotations

import json

from twin_pipeline.store import Store
from twin_pipeline.twin.graph import GraphReport, build_graph
from twin_pipeline.twin.model import TwinModel
from twin_pipeline.twin.state import build_device_state, build_patient_vitals, build_scanner_state


def _one(store: Store, sql: str) -> int:
    row = store.con.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_nodes_and_edges_match_the_source_tables(graph_store: tuple[Store, GraphReport]) -> None:
    store, report = graph_store
    assert report.warnings == []
    expected_nodes = {
        "Patient": _one(store, "SELECT count(*) FROM harmonized.patient"),
        "Encounter": _one(store, "SELECT count(*) FROM harmonized.encounter"),
        "Bed": _one(store, "SELECT count(*) FROM harmonized.location WHERE physical_type = 'bd'"),
        "CareUnit": _one(
            store, "SELECT count(*) FROM harmonized.location WHERE physical_type <> 'bd'"
        ),
        "ImagingStudy": _one(store, "SELECT count(*) FROM harmonized.imaging_study"),
        "ImagingModality": _one(
            store, "SELECT count(*) FROM harmonized.device WHERE device_type_code IN ('CT','MR')"
        ),
        "Device": _one(
            store, "SELECT count(*) FROM harmonized.device WHERE device_type_code = '706172005'"
        ),
    }
    got = dict(
        store.con.execute("SELECT twin_type, count(*) FROM twin.twin.node GROUP BY 1").fetchall()
    )
    for k, v in expected_nodes.items():
        assert got[k] == v == report.nodes[k], k
    assert report.edges["Encounter.subject"] == expected_nodes["Encounter"]
    assert report.edges["Device.attached_to"] == _one(
        store, "SELECT count(*) FROM harmonized.device_association"
    )
    # Every study is linked to the scanner that acquired it (via series serial -> device).
    assert report.edges["ImagingStudy.performed_on"] == expected_nodes["ImagingStudy"]
    # Validity periods are carried onto edges.
    row = store.con.execute(
        "SELECT e.valid_from = enc.period_start, e.valid_to = enc.period_end FROM twin.twin.edge e "
        "JOIN harmonized.encounter enc ON e.src = 'Encounter/' || enc.encounter_id "
        "WHERE e.rel = 'located_at' LIMIT 1"
    ).fetchone()
    assert row == (True, True)
    # Nodes carry the model id and lineage key of their source row.
    row = store.con.execute(
        "SELECT n.model_id, n.lineage_key = p.lineage_key FROM twin.twin.node n "
        "JOIN harmonized.patient p ON n.source_id = p.patient_id WHERE n.twin_type = 'Patient' LIMIT 1"
    ).fetchone()
    assert row == ("dtmi:twinpipeline:Patient;1", True)


def test_no_direct_identifiers_in_twin_nodes(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    names = {
        r[0] for r in store.con.execute("SELECT given_name FROM harmonized.patient").fetchall()
    }
    mrns = {r[0] for r in store.con.execute("SELECT mrn FROM harmonized.patient").fetchall()}
    blob = " ".join(
        r[0]
        for r in store.con.execute("SELECT CAST(props AS VARCHAR) FROM twin.twin.node").fetchall()
    )
    assert not any(f'"{n}"' in blob for n in names)
    assert not any(m in blob for m in mrns)


def test_rebuild_is_idempotent(graph_store: tuple[Store, GraphReport], model: TwinModel) -> None:
    store, _ = graph_store
    before = (store.content_hash("twin.node"), store.content_hash("twin.edge"))
    build_graph(store, model)
    assert (store.content_hash("twin.node"), store.content_hash("twin.edge")) == before
    assert store.row_count("twin.node") > 0


def test_missing_tables_and_columns_are_tolerated(hospital_store: Store, model: TwinModel) -> None:
    store = hospital_store
    store.con.execute("DROP TABLE harmonized.practitioner_role")
    store.con.execute("DROP TABLE harmonized.device_association")
    store.con.execute("ALTER TABLE harmonized.patient DROP COLUMN research_consent")
    report = build_graph(store, model)
    assert report.nodes["StaffRole"] == 0
    assert report.edges["Device.attached_to"] == 0
    assert report.nodes["Patient"] == 120
    text = "\n".join(report.warnings)
    assert "harmonized.practitioner_role does not exist" in text
    assert "device_association does not exist" in text
    assert "Patient.research_consent: NULL" in text
    consent = store.con.execute(
        "SELECT count(*) FROM twin.twin.node WHERE twin_type = 'Patient' AND (props->>'research_consent') IS NOT NULL"
    ).fetchone()
    assert consent == (0,)


def test_dangling_references_are_counted_not_linked(
    hospital_store: Store, model: TwinModel
) -> None:
    store = hospital_store
    store.con.execute(
        "UPDATE harmonized.encounter SET patient_id = 'ghost' WHERE encounter_id = 'e0000000'"
    )
    store.con.execute(
        "UPDATE harmonized.encounter SET patient_id = 'Patient/p000001' WHERE encounter_id = 'e0000001'"
    )
    report = build_graph(store, model)
    assert report.dangling.get("Encounter.subject") == 1
    # 'Patient/<id>' references are normalized to the bare id and still link.
    row = store.con.execute(
        "SELECT dst FROM twin.twin.edge WHERE src = 'Encounter/e0000001' AND rel = 'subject'"
    ).fetchone()
    assert row == ("Patient/p000001",)


def test_empty_store_builds_an_empty_graph(twin_home, model: TwinModel) -> None:  # type: ignore[no-untyped-def]
    with Store.open(twin_home) as store:
        report = build_graph(store, model)
        assert report.node_count == 0 and report.edge_count == 0
        assert len(report.warnings) >= len(model.interfaces)
        for builder in (build_patient_vitals, build_device_state, build_scanner_state):
            assert builder(store, model).rows == 0 or builder is build_scanner_state


def test_state_tables(graph_store: tuple[Store, GraphReport], model: TwinModel) -> None:
    store, _ = graph_store
    vit = build_patient_vitals(store, model)
    assert vit.rows > 0
    # The latest heart rate of a monitored patient is its latest telemetry or observation value.
    pid, ts, value = store.con.execute(
        "SELECT patient_id, ts, value FROM (SELECT patient_id, ts_utc AS ts, value FROM harmonized.telemetry_reading "
        "WHERE metric = 'MDC_ECG_HEART_RATE' UNION ALL SELECT patient_id, effective_at, value "
        "FROM harmonized.observation WHERE code = '8867-4') "
        "QUALIFY row_number() OVER (PARTITION BY patient_id ORDER BY ts DESC) = 1 ORDER BY patient_id LIMIT 1"
    ).fetchone()
    got = store.con.execute(
        "SELECT value, observed_at FROM twin.twin.state_patient_vitals WHERE patient_id = ? AND vital = 'heart_rate'",
        [pid],
    ).fetchone()
    assert got is not None and abs(got[0] - value) < 1e-9 and got[1] == ts

    dev = build_device_state(store, model)
    rows = store.con.execute(
        "SELECT status, last_reading_at, as_of, attached_patient FROM twin.twin.state_device"
    ).fetchall()
    assert dev.rows == len(rows) == 6
    assert {r[0] for r in rows} <= {"streaming", "idle", "offline", "no_data"}
    streaming = [r for r in rows if r[0] == "streaming"]
    assert streaming, "the device with the latest reading is streaming at the as-of time"
    assert all(r[1] == r[2] or (r[2] - r[1]).total_seconds() <= 900 for r in streaming)
    assert all(r[3] and r[3].startswith("Patient/") for r in streaming)

    sc = build_scanner_state(store, model)
    rows = store.con.execute(
        "SELECT node_id, day, studies_today, busy_minutes_today, utilization_today, studies_total "
        "FROM twin.twin.state_scanner ORDER BY node_id"
    ).fetchall()
    assert sc.rows == 3
    day = rows[0][1]
    expected_today = _one(
        store,
        f"SELECT count(*) FROM harmonized.imaging_study WHERE CAST(started AS DATE) = DATE '{day}'",
    )
    assert sum(r[2] for r in rows) == expected_today
    assert sum(r[5] for r in rows) == _one(store, "SELECT count(*) FROM harmonized.imaging_study")
    for r in rows:
        assert 0 <= r[4] <= 1 and abs(r[4] - r[3] / 1440) < 1e-9
    json.dumps(sc.to_dict())


def test_graph_from_deid_tables_when_the_model_says_so(
    hospital_store: Store, model: TwinModel
) -> None:
    store = hospital_store
    pid = "'d-' || substr(sha256('salt|' || patient_id), 1, 12)"
    for table in model.source_tables():
        name = table.split(".")[1]
        cols = [c for c, _ in store.columns(table)]
        select = ", ".join(f"{pid} AS patient_id" if c == "patient_id" else f'"{c}"' for c in cols)
        store.con.execute(f"CREATE TABLE deid.{name} AS SELECT {select} FROM {table}")
    deid_model = model.model_copy(update={"source_schema": "deid"})
    assert all(t.startswith("deid.") for t in deid_model.source_tables())
    report = build_graph(store, deid_model)
    assert report.warnings == [] and report.dangling == {}
    assert report.nodes["Patient"] == 120
    ids = [
        r[0]
        for r in store.con.execute(
            "SELECT source_id FROM twin.twin.node WHERE twin_type = 'Patient'"
        ).fetchall()
    ]
    assert all(i.startswith("d-") for i in ids)
    tables = {
        r[0]
        for r in store.con.execute("SELECT DISTINCT source_table FROM twin.twin.node").fetchall()
    }
    assert tables and all(t.startswith("deid.") for t in tables)
    # Relationships still resolve through the pseudonymized ids.
    assert report.edges["Encounter.subject"] == store.row_count("deid.encounter")
