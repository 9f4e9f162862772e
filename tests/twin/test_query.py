"""Graph queries: neighbours, k-hop, paths, filters and time-windowed chain patterns."""

from __future__ import annotations

from datetime import timedelta

import pytest

from twin_pipeline.store import Store
from twin_pipeline.twin.graph import GraphReport
from twin_pipeline.twin.query import (
    QueryError,
    filter_nodes,
    k_hop,
    match,
    neighbours,
    parse_pattern,
    paths,
)

ICU_DEVICES = (
    "Device -attached_to-> Patient <-subject- Encounter -located_at-> * "
    '-part_of*0..2-> CareUnit{name="Intensive Care Unit"}'
)


def test_devices_attached_to_patients_in_a_unit_in_the_last_24h(
    graph_store: tuple[Store, GraphReport],
) -> None:
    store, _ = graph_store
    now = store.con.execute("SELECT max(ts_utc) FROM harmonized.telemetry_reading").fetchone()[0]
    since = now - timedelta(hours=24)
    # Expected straight from the harmonized tables.
    expected = {
        r[0]
        for r in store.con.execute(
            """
            SELECT DISTINCT 'Device/' || a.device_id FROM harmonized.device_association a
            JOIN harmonized.encounter e ON e.patient_id = a.patient_id
            JOIN harmonized.location l ON l.location_id = e.location_id
            WHERE l.part_of_id = 'loc-icu'
              AND a.valid_to >= ? AND a.valid_from <= ?
              AND e.period_end >= ? AND e.period_start <= ?
            """,
            [since, now, since, now],
        ).fetchall()
    }
    assert expected, "fixture should have ICU devices in use at the end of the data"
    res = match(store, ICU_DEVICES, since=since, until=now)
    assert {r[0] for r in res.rows} == expected
    assert all(r[-1] == "CareUnit/loc-icu" for r in res.rows)
    # A window long before any data matches nothing.
    assert (
        match(
            store, ICU_DEVICES, since=now - timedelta(days=400), until=now - timedelta(days=399)
        ).rows
        == []
    )
    # Without a window every attachment ever counts: at least as many devices.
    assert {r[0] for r in match(store, ICU_DEVICES).rows} >= expected


def test_neighbours_khop_and_paths(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    bed = "Bed/loc-icu-01"
    nb = neighbours(store, bed)
    assert {"rel": "part_of", "node_id": "CareUnit/loc-icu", "direction": "out"}.items() <= next(
        n for n in nb if n["rel"] == "part_of"
    ).items()
    assert any(n["rel"] == "located_in" and n["node_id"] == "Device/mon-00" for n in nb)
    out_only = neighbours(store, bed, direction="out")
    assert [n["node_id"] for n in out_only] == ["CareUnit/loc-icu"]
    hop = {
        h["node_id"]: h["distance"]
        for h in k_hop(store, "Device/mon-00", 2, rels=["located_in", "part_of"])
    }
    assert hop == {"Bed/loc-icu-01": 1, "CareUnit/loc-icu": 2}
    wider = {
        h["node_id"]: h["distance"]
        for h in k_hop(store, "Device/mon-00", 3, rels=["located_in", "part_of"])
    }
    assert wider["Bed/loc-icu-02"] == 3 and wider["Bed/loc-icu-01"] == 1
    directed = k_hop(store, "Device/mon-00", 3, rels=["located_in", "part_of"], directed=True)
    assert [h["node_id"] for h in directed] == ["Bed/loc-icu-01", "CareUnit/loc-icu"]
    ps = paths(store, "Device/mon-00", "CareUnit/loc-icu", max_hops=3)
    assert ps[0] == {
        "nodes": ["Device/mon-00", "Bed/loc-icu-01", "CareUnit/loc-icu"],
        "rels": ["located_in", "part_of"],
        "hops": 2,
    }
    assert all(
        p["nodes"][-1] == "CareUnit/loc-icu" and len(set(p["nodes"])) == len(p["nodes"]) for p in ps
    )
    assert paths(store, "Device/mon-00", "CareUnit/loc-icu", max_hops=1) == []


def test_filters(graph_store: tuple[Store, GraphReport]) -> None:
    store, _ = graph_store
    ct = filter_nodes(store, "ImagingModality", where=["modality=CT"])
    assert [n["node_id"] for n in ct] == ["ImagingModality/dev-ct1", "ImagingModality/dev-ct2"]
    icu = filter_nodes(store, "CareUnit", where=["name~intensive"])
    assert [n["node_id"] for n in icu] == ["CareUnit/loc-icu"]
    assert filter_nodes(store, "Patient", where=["id=p000003"])[0]["node_id"] == "Patient/p000003"
    assert filter_nodes(store, "Nope") == []


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("-attached_to-> Patient", "must start with a node"),
        ("Device attached_to Patient", "expected an edge"),
        ("Device <-attached_to-> Patient", "exactly one direction"),
        ("Device -attached_to->", "expected a node"),
        ("Device -part_of*3..1-> CareUnit", "hop range"),
        ("Device -part_of*0..9-> CareUnit", "hop range"),
        ("CareUnit{name} -part_of-> *", "bad property filter"),
    ],
)
def test_bad_patterns(pattern: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_pattern(pattern)


def test_pattern_parse() -> None:
    pat = parse_pattern('A{x="a, b",y~c} <-r- * -s*0..3-> B')
    assert pat.nodes[0].filters == (("x", "=", "a, b"), ("y", "~", "c"))
    assert pat.nodes[1].twin_type is None
    assert (pat.edges[0].rel, pat.edges[0].outgoing) == ("r", False)
    assert (pat.edges[1].min_hops, pat.edges[1].max_hops, pat.edges[1].variable) == (0, 3, True)
