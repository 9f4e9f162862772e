"""The suites run as Dagster asset checks: row failures are quarantined inside the check, an
error that survives quarantine fails a blocking check and gates downstream assets, and each
check run is an activity in the ledger (lineage)."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from tests.quality.fixtures import build_store
from twin_pipeline.activity import activities
from twin_pipeline.defs.quality import build_checks, defined_asset_keys
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.paths import Settings
from twin_pipeline.quality import docs, load_suites
from twin_pipeline.quality import gx as gxa
from twin_pipeline.store import Store


def _graph(twin_home: Settings, *, break_schema: bool) -> dg.Definitions:
    suites = load_suites()
    keys = {dg.AssetKey(["harmonized", "patient"]), dg.AssetKey(["harmonized", "encounter"])}

    @dg.multi_asset(
        specs=[dg.AssetSpec(k, skippable=True) for k in sorted(keys, key=str)],
        can_subset=True,
    )
    def harmonized(twin: TwinResource):  # type: ignore[no-untyped-def]
        with twin.open_store() as store:
            build_store(store)
            if break_schema:
                store.con.execute("ALTER TABLE harmonized.encounter DROP COLUMN period_end")
        for k in sorted(keys, key=str):
            yield dg.MaterializeResult(asset_key=k)

    @dg.asset(key=["deid", "encounter"], deps=[dg.AssetKey(["harmonized", "encounter"])])
    def deid_encounter() -> None:
        return None

    checks = build_checks(list(suites.values()), keys)
    return dg.Definitions(
        assets=[harmonized, deid_encounter],
        asset_checks=[checks],
        resources={"twin": TwinResource(twin_home=str(twin_home.home))},
    )


def _run(defs: dg.Definitions) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)


def test_checks_quarantine_rows_and_pass(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_gx() -> None:
        raise AssertionError("a check step must not need Great Expectations")

    monkeypatch.setattr(gxa, "_gx", no_gx)
    result = _run(_graph(twin_home, break_schema=False))
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evals) == {"patient_expectations", "encounter_expectations"}
    for ev in evals.values():
        assert ev.passed, ev.metadata
    assert evals["encounter_expectations"].metadata["quarantined_rows"].value == 3
    assert result.success
    assert "deid/encounter" in {
        e.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
        if e.asset_key is not None
    }
    with Store.open(twin_home, read_only=True) as store:
        rules = {
            r[0]
            for r in store.con.execute(
                "SELECT rule FROM governance.quarantine WHERE stage = 'quality'"
            ).fetchall()
        }
        assert {"encounter_end_after_start", "patient_gender_in_fhir_valueset"} <= rules
        acts = [a for a in activities(store) if a["params"].get("stage") == "quality"]
        assert len(acts) == 1
        (act,) = acts
        assert set(act["inputs"]) == {"harmonized.patient", "harmonized.encounter"}
        assert act["params"]["suites"][0] == "patient", "referenced tables are checked first"
        outputs = {o["table"] for o in act["outputs"]}
        assert {"governance.validation_result", "governance.quarantine"} <= outputs
        assert {"harmonized.patient", "harmonized.encounter"} <= outputs
        # The checks record results for Data Docs but leave rendering (and GX) to whoever
        # asks: the site is rendered on demand from the store.
        assert docs.status(store, twin_home.data_docs_dir) == "missing"
        monkeypatch.undo()
        index, rendered = docs.render(store, twin_home.data_docs_dir)
        assert rendered and "encounter" in index.read_text()
        assert docs.status(store, twin_home.data_docs_dir) == "current"
        # At the end of a run the site is rendered in a process of its own; nothing to do
        # when current, and a failure there is reported, not raised.
        assert docs.refresh_after_run(store, twin_home.data_docs_dir) == "Data Docs current"
        other = twin_home.home / "not-docs"
        other.mkdir()
        (other / "keep.txt").write_text("mine")
        job = docs.start_refresh(store, other)
        assert job.future is not None
        outcome = job.wait()
        assert outcome.startswith("Data Docs not rendered (ConfigError: ")
        assert "not a Data Docs folder" in outcome
        assert (other / "keep.txt").read_text() == "mine"
        renderer = docs._RENDERER
        assert renderer is not None
        # The runner may start the renderer's GX import early; the refresh then only renders.
        docs.prewarm()
        assert docs._RENDERER is renderer
        fresh = twin_home.home / "fresh-docs"
        assert docs.refresh_after_run(store, fresh) == f"Data Docs rendered: {fresh / 'index.html'}"
        assert docs.status(store, fresh) == "current"
        # one renderer process for the life of this one: GX is imported there once
        assert docs._RENDERER is renderer


def test_blocking_check_gates_downstream(twin_home: Settings) -> None:
    result = _run(_graph(twin_home, break_schema=True))
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    enc = evals["encounter_expectations"]
    assert not enc.passed and enc.severity == dg.AssetCheckSeverity.ERROR
    assert "encounter_columns_typed" in json.dumps(enc.metadata["blocking_failures"].value)
    materialized = {
        e.asset_key.to_user_string()
        for e in result.get_asset_materialization_events()
        if e.asset_key is not None
    }
    assert "deid/encounter" not in materialized, "a failed blocking gate stops de-identification"


def test_checks_only_target_defined_assets() -> None:
    from twin_pipeline.definitions import defs

    existing = defined_asset_keys()
    for check in defs.asset_checks or []:
        for key in check.check_keys:
            assert key.asset_key in existing
