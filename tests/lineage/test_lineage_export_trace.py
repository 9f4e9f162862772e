"""Export round trips through prov's readers; trace reaches the source bytes; OpenLineage events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lineage.conftest import Built
from twin_pipeline.cli import main
from twin_pipeline.lineage import openlineage, prov_build, serialize, storage, trace
from twin_pipeline.store import Store


@pytest.mark.parametrize("fmt", sorted(serialize.SERIALIZERS))
@pytest.mark.parametrize("whole", [True, False], ids=["all-runs", "one-run"])
def test_export_round_trips(
    built_copy: Built, tmp_path: Path, fmt: str, whole: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"prov.{fmt}"
    run = None if whole else built_copy.run_ids[1][:8]
    argv = ["lineage", "export", "--format", fmt, "-o", str(out)] + (
        [] if whole else ["--run", run]
    )
    assert main(argv) == 0, capsys.readouterr().err
    with Store.open(built_copy.settings, read_only=True) as store:
        stored = storage.stored_document(store, run)
    text = out.read_text()
    ser = serialize.get(fmt)
    if ser.read is not None:
        back = ser.read(text)
        assert prov_build.canonical_records(back) == prov_build.canonical_records(stored)
    else:  # PROV-N: prov has no reader; every identifier and relation must be written
        assert text.startswith("document")
        for rec in stored.get_records():
            if rec.identifier is not None:
                assert str(rec.identifier).split(":", 1)[1].split("/")[0] in text
        assert text.count("wasGeneratedBy(") == len(
            [r for r in stored.get_records() if r.get_type().localpart == "Generation"]
        )
    acts = [r for r in stored.get_records() if r.get_type().localpart == "Activity"]
    assert len(acts) == (8 if whole else 4)


def test_export_unknown_run_is_an_error(built_copy: Built, tmp_path: Path) -> None:
    assert main(["lineage", "export", "--run", "nope", "-o", str(tmp_path / "x.json")]) == 2


def _random_deid_key(store: Store, seed: int) -> tuple[str, str]:
    row = store.con.execute(
        "SELECT observation_id, lineage_key FROM deid.lt_observation ORDER BY hash(observation_id || ?) "
        "LIMIT 1",
        [str(seed)],
    ).fetchone()
    return str(row[0]), str(row[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_deid_row_traces_to_source_bytes(built: Built, seed: int) -> None:
    with Store.open(built.settings, read_only=True) as store:
        obs_id, key = _random_deid_key(store, seed)
        result = trace.trace(store, "deid.lt_observation", key)
        registered = dict(
            store.con.execute("SELECT path, sha256 FROM governance.source_file").fetchall()
        )
    assert [s.table for s in result.steps] == [
        "deid.lt_observation",
        "harmonized.lt_observation",
        "raw.lt_observation",
    ]
    src = result.source
    assert src is not None
    import hashlib

    on_disk = hashlib.sha256((built.landing / src.path).read_bytes()).hexdigest()
    assert on_disk == src.sha256 == registered[src.path]
    line = trace.read_line(built.landing / src.path, int(src.position.split(":")[1]))
    assert line is not None and json.loads(line)["id"] == obs_id
    assert src.record_hash_ok and src.lineage_key_ok and src.file_sha256_ok
    assert result.verified
    assert {s.activity["asset_key"] for s in result.steps} == {
        "deid/lt_observation",
        "harmonized/lt_observation",
        "raw/lineage_test_obs",
    }


def test_trace_by_id_and_json_shape(built_copy: Built, capsys: pytest.CaptureFixture[str]) -> None:
    with Store.open(built_copy.settings, read_only=True) as store:
        obs_id, key = _random_deid_key(store, 7)
    assert main(["lineage", "trace", "deid.lt_observation", obs_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["source"]) >= {"path", "sha256", "position"}
    assert doc["key"] == key and doc["verified"] is True
    assert isinstance(doc["steps"], list) and len(doc["steps"]) == 3
    prov_doc = prov_build.from_json(json.dumps(doc["prov"]))
    ids = {str(r.identifier) for r in prov_doc.get_records() if r.identifier is not None}
    assert prov_build.record_id("deid.lt_observation", key) in ids
    assert prov_build.file_id(doc["source"]["sha256"]) in ids
    assert main(["lineage", "trace", "deid.lt_observation", key]) == 0
    text = capsys.readouterr().out
    assert "← raw.lt_observation" in text and doc["source"]["path"] in text and "verified" in text


def test_trace_flags_changed_source_and_table(
    built_copy: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    landing = tmp_path / "landing"
    shutil.copytree(built_copy.landing, landing)
    with Store.open(built_copy.settings) as store:
        store.con.execute(
            "UPDATE governance.source_file SET abs_path = replace(abs_path, ?, ?)",
            [str(built_copy.landing), str(landing)],
        )
        _, key = _random_deid_key(store, 1)
        src = trace.trace(store, "deid.lt_observation", key).source
        assert src is not None
        with (landing / src.path).open("ab") as fh:
            fh.write(b"\n")
        store.con.execute(
            "UPDATE harmonized.lt_observation SET value = value + 1 WHERE lineage_key = ?", [key]
        )
        result = trace.trace(store, "deid.lt_observation", key)
    assert result.source is not None and result.source.file_sha256_ok is False
    assert [s.version_recorded for s in result.steps] == [True, False, True]
    assert not result.verified
    assert main(["lineage", "trace", "deid.lt_observation", key]) == 1
    assert "CHANGED since its recorded materialization" in capsys.readouterr().out


def test_trace_unknown_key(built_copy: Built, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lineage", "trace", "deid.lt_observation", "no-such-key"]) == 2
    assert "no row of deid.lt_observation" in capsys.readouterr().err
    assert main(["lineage", "trace", "deid.x; DROP TABLE y", "k"]) == 2


def test_openlineage_events_per_materialization(built: Built) -> None:
    for rid in built.run_ids:
        events = openlineage.read_events(built.settings.home / "openlineage" / f"{rid}.ndjson")
        assert [e["eventType"] for e in events] == ["COMPLETE"] * 4
        assert {e["job"]["name"] for e in events} == {
            "raw/lineage_test_obs",
            "harmonized/lt_observation",
            "deid/lt_observation",
            "governance/lt_validation_result",
        }
        for e in events:
            assert e["run"]["facets"]["parent"]["run"]["runId"] == rid
            assert e["job"]["namespace"] == openlineage.NAMESPACE
            assert e["producer"] and e["schemaURL"].startswith("https://openlineage.io/spec/")
        deid = next(e for e in events if e["job"]["name"] == "deid/lt_observation")
        (out,) = deid["outputs"]
        assert out["name"] == "deid.lt_observation"
        assert out["outputFacets"]["outputStatistics"]["rowCount"] > 0
        assert {f["name"] for f in out["facets"]["schema"]["fields"]} >= {
            "patient_id",
            "lineage_key",
        }
        cl = out["facets"]["columnLineage"]["fields"]
        assert cl["patient_id"]["transformationType"] == "MASKED"
        assert cl["patient_id"]["inputFields"][0]["transformations"][0]["masking"] is True
        assert cl["value"]["transformationType"] == "IDENTITY"
        assert cl["value"]["inputFields"][0]["name"] == "harmonized.lt_observation"
        raw = next(e for e in events if e["job"]["name"] == "raw/lineage_test_obs")
        files = [i for i in raw["inputs"] if i["namespace"] == "file"]
        assert files and all(Path(i["name"]).is_absolute() for i in files)


def test_column_map_follows_the_deid_policy() -> None:
    from twin_pipeline.lineage import policy_columns

    m = policy_columns.column_map(
        "deid.patient", ["patient_id", "gender", "birth_year", "postal_code", "lineage_key"]
    )
    assert m["patient_id"][1] and m["patient_id"][1].startswith("pseudonymize")
    assert m["birth_year"] == ("birth_date", "generalize to year")
    assert m["gender"] == ("gender", None)
    assert m["lineage_key"] == ("lineage_key", None)


def test_events_are_written_as_the_openlineage_client_serializes_them(built: Built) -> None:
    """Our event writer's text is openlineage-python's own ``Serde.to_json``, for every event
    of the runs and for one with the values its serializer treats specially."""
    from openlineage.client.event_v2 import InputDataset, Job, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import dataset_version_dataset, schema_dataset
    from openlineage.client.serde import Serde

    from twin_pipeline.activity import activities

    with Store.open(built.settings, read_only=True) as store:
        files = openlineage._file_locations(store)
        cat = openlineage.Catalog(store)
        events = [
            openlineage.event_for(store, rec, files, cat)
            for rid in built.run_ids
            for rec in activities(store, rid)
        ]
    events.append(openlineage.fail_event(built.run_ids[0], "raw/x", "boom"))
    events.append(
        RunEvent(
            eventType=RunState.RUNNING,
            eventTime="2024-03-09T12:00:00+00:00",
            run=Run(runId="0190e5c2-5a0b-7cc9-8b84-a1f0f1b1d5c3", facets={}),
            job=Job(namespace="ns", name="j", facets=None),
            inputs=[
                InputDataset(
                    namespace="file",
                    name="a b/ü.ndjson",
                    facets={
                        "schema": schema_dataset.SchemaDatasetFacet(
                            fields=[
                                schema_dataset.SchemaDatasetFacetFields(name="x", type=None),
                                schema_dataset.SchemaDatasetFacetFields(name="y", type="INT"),
                            ]
                        ),
                        "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                            datasetVersion="v1"
                        ),
                    },
                )
            ],
            outputs=[],
            producer=openlineage.PRODUCER,
        )
    )
    assert len(events) >= 10
    for event in events:
        assert openlineage.to_json(event) == Serde.to_json(event)


def test_an_events_file_that_cannot_be_written_is_logged_not_fatal(
    built_copy: Built, caplog: pytest.LogCaptureFixture
) -> None:
    """The signed PROV bundle is the record; the OpenLineage file is an export. A write that
    fails (here a folder where the file goes) is a warning and the run still finalizes."""
    from twin_pipeline.lineage.runs import finalize_run

    rid = built_copy.run_ids[-1]
    path = openlineage.events_path_for(built_copy.settings, rid)
    path.unlink()
    path.mkdir()
    with Store.open(built_copy.settings) as store:
        result = finalize_run(store, rid)
    assert result.openlineage_events == -1 and result.activities == 4
    assert f"OpenLineage events of run {rid} not written" in caplog.text
