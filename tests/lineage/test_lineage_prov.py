"""PROV is written for every materialization and closed by a signed bundle per run."""

from pathlib import Path

import dagster as dg
import prov.model as pm
import pytest

from tests.lineage.conftest import Built
from twin_pipeline.activity import activities
from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.lineage import prov_build, runs, storage
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def _relations(doc: pm.ProvDocument, cls: type) -> list[pm.ProvRelation]:
    return list(doc.get_records(cls))


def _args(rel: pm.ProvRelation) -> tuple[str | None, ...]:
    return tuple(str(v) if v is not None else None for _, v in rel.formal_attributes)


def test_every_output_generated_every_file_used(built: Built) -> None:
    with Store.open(built.settings, read_only=True) as store:
        doc = storage.stored_document(store)
        recs = activities(store)
        files = store.con.execute("SELECT sha256 FROM governance.source_file").fetchall()
    generated = {_args(r)[0] for r in _relations(doc, pm.ProvGeneration)}
    used = {_args(r)[1] for r in _relations(doc, pm.ProvUsage)}
    outputs = {
        prov_build.table_version_id(tv["table"], tv["content_hash"])
        for rec in recs
        for tv in rec["outputs"]
    }
    assert outputs, "the mini graph wrote no tables"
    assert outputs <= generated, outputs - generated
    file_ids = {prov_build.file_id(sha) for (sha,) in files}
    assert len(file_ids) == 3
    assert file_ids <= used, file_ids - used
    for fid in file_ids:
        (entity,) = doc.get_record(fid)
        attrs = {str(k): v for k, v in entity.attributes}
        assert attrs["twin:sha256"] == fid.rsplit("/", 1)[1]
        assert attrs["twin:size"] > 0


def test_activities_agents_and_relations(built: Built) -> None:
    with Store.open(built.settings, read_only=True) as store:
        doc = storage.stored_document(store, built.run_ids[0])
    acts = {str(a.identifier): a for a in doc.get_records(pm.ProvActivity)}
    assert len(acts) == 4  # raw, harmonized, deid, validation
    for act in acts.values():
        attrs = {str(k): str(v) for k, v in act.attributes}
        assert attrs["twin:dagster_run_id"] == built.run_ids[0]
        assert len(attrs["twin:git_commit"]) >= 7
        assert attrs["twin:package"].startswith("twin-pipeline")
        assert act.get_startTime() is not None and act.get_endTime() is not None
    assoc = {(_args(r)[0], _args(r)[1]) for r in _relations(doc, pm.ProvAssociation)}
    person = prov_build.person_id("engineer")
    assert {(a, person) for a in acts} <= assoc
    persons = [a for a in doc.get_records(pm.ProvAgent) if str(a.identifier) == person]
    assert persons and pm.PROV["Person"] in persons[0].get_asserted_types()
    software = [
        a
        for a in doc.get_records(pm.ProvAgent)
        if pm.PROV["SoftwareAgent"] in a.get_asserted_types()
    ]
    assert len(software) == 1
    delegations = {(_args(r)[0], _args(r)[1]) for r in _relations(doc, pm.ProvDelegation)}
    assert (str(software[0].identifier), person) in delegations
    # harmonized was informed by raw, deid and validation by harmonized
    by_asset = {
        {str(k): str(v) for k, v in a.attributes}["twin:asset_key"]: i for i, a in acts.items()
    }
    informed = {(_args(r)[0], _args(r)[1]) for r in _relations(doc, pm.ProvCommunication)}
    assert (by_asset["harmonized/lt_observation"], by_asset["raw/lineage_test_obs"]) in informed
    assert (by_asset["deid/lt_observation"], by_asset["harmonized/lt_observation"]) in informed
    # derivations: deid table version from harmonized table version, raw from the files
    derived = {(_args(r)[0], _args(r)[1]) for r in _relations(doc, pm.ProvDerivation)}
    assert any(
        a.startswith("twin:table/deid.lt_observation/")
        and b.startswith("twin:table/harmonized.lt_observation/")
        for a, b in derived
    )
    assert any(
        a.startswith("twin:table/raw.lt_observation/") and b.startswith("twin:file/")
        for a, b in derived
    )


def test_policy_key_and_validation_entities(built: Built) -> None:
    with Store.open(built.settings, read_only=True) as store:
        doc = storage.stored_document(store)
    types = {}
    for e in doc.get_records(pm.ProvEntity):
        for t in e.get_asserted_types():
            types.setdefault(str(t), []).append(e)
    assert "twin:ValidationResult" in types
    assert "twin:KeyVersion" in types
    for key in types["twin:KeyVersion"]:
        attrs = {str(k): str(v) for k, v in key.attributes}
        assert len(attrs["twin:fingerprint"]) == 16
        assert "PRIVATE" not in doc.serialize(format="provn")
    if any(Path("policies").glob("*.yaml")):
        assert "twin:PolicyVersion" in types


def test_bundle_matches_activity_records(built: Built) -> None:
    """The signed bundle is exactly the PROV of the run's ledger activity records."""
    with Store.open(built.settings, read_only=True) as store:
        for rid in built.run_ids:
            stored = storage.stored_document(store, rid)
            rebuilt = prov_build.build_document(activities(store, rid))
            assert prov_build.canonical_records(stored) == prov_build.canonical_records(rebuilt)


def test_second_run_uses_first_runs_table_versions(built: Built) -> None:
    """Runs connect: a table version used in run 2 is one generated in run 1 or run 2."""
    with Store.open(built.settings, read_only=True) as store:
        doc = storage.stored_document(store)
    generated = {_args(r)[0] for r in _relations(doc, pm.ProvGeneration)}
    used_tables = {
        _args(r)[1]
        for r in _relations(doc, pm.ProvUsage)
        if str(_args(r)[1]).startswith("twin:table/")
    }
    assert used_tables and used_tables <= generated


@dg.asset(key=["harmonized", "lt_broken"], group_name="harmonized", description="fails")
def _failing(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin) as run:
        run.store.con.execute("CREATE TABLE harmonized.lt_broken AS SELECT 1 AS x")
        run.outputs("harmonized.lt_broken")
        raise RuntimeError("boom after writing")
    return run.result()


def test_failed_asset_leaves_no_table_activity_or_prov(twin_home: Settings) -> None:
    result = dg.materialize(
        [_failing],
        resources={"twin": TwinResource(twin_home=str(twin_home.home))},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    with Store.open(twin_home) as store:
        assert not store.table_exists("harmonized.lt_broken")
        assert activities(store) == []
        assert runs.open_runs(store) == []
        fin = runs.finalize_run(store, result.run_id, failures={"harmonized/lt_broken": "boom"})
        assert fin.activities == 0
        from twin_pipeline.audit import verify_all

        assert verify_all(store).ok


def test_crashed_run_is_closed_by_next_finalize(built_copy: Built) -> None:
    with Store.open(built_copy.settings) as store:
        rid = built_copy.run_ids[0]
        store.con.execute("DELETE FROM governance.prov_bundle WHERE run_id = ?", [rid])
        assert runs.open_runs(store) == [rid]
        res = runs.finalize_run(store, "some-later-run")
        assert res.closed_earlier == [rid]
        assert storage.bundles(store, rid)


@pytest.mark.parametrize(
    "table,kind",
    [
        ("governance.validation_result", prov_build.VALIDATION_RESULT),
        ("governance.quarantine", prov_build.QUARANTINE),
        ("governance.snapshot", prov_build.SNAPSHOT),
        ("twin.simulation_result", prov_build.SIMULATION_RESULT),
        ("harmonized.patient", prov_build.TABLE_VERSION),
        ("twin.node", prov_build.TABLE_VERSION),
    ],
)
def test_table_kinds(table: str, kind: str) -> None:
    assert prov_build.table_kind(table) == kind
