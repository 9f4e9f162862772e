"""The ``no_raw_identifiers`` check runs inside each ``deid/<table>`` asset's own step and
still blocks: a leaking table fails its check, fails the run, and nothing downstream runs."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

from tests.deid.test_structured import PATIENT_DDL
from twin_pipeline.defs import deid as deid_defs
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

PATIENT = dg.AssetKey(["deid", "patient"])


def _deid_patient() -> dg.AssetsDefinition:
    for a in deid_defs.defs.assets or []:
        if isinstance(a, dg.AssetsDefinition) and PATIENT in a.keys:
            return a
    raise AssertionError("no deid/patient asset")


def _run(twin_home: Settings, ran: list[str]) -> dg.ExecuteInProcessResult:
    @dg.asset(key=["twin", "downstream_of_deid"], deps=[PATIENT])
    def downstream() -> None:
        ran.append("downstream")

    with Store.open(twin_home) as store:
        store.con.execute(PATIENT_DDL)
    return dg.materialize(
        [_deid_patient(), downstream],
        resources={"twin": TwinResource(twin_home=str(twin_home.home))},
        instance=dg.DagsterInstance.ephemeral(),
        tags={"twin/user": "engineer"},
        raise_on_error=False,
    )


def _check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    evals = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert len(evals) == 1
    ev = evals[0]
    assert isinstance(ev, dg.AssetCheckEvaluation)
    assert ev.asset_key == PATIENT and ev.check_name == "no_raw_identifiers"
    return ev


def test_check_is_a_spec_of_the_asset_not_a_step_of_its_own() -> None:
    asset = _deid_patient()
    assert dg.AssetCheckKey(PATIENT, "no_raw_identifiers") in asset.check_keys
    assert [s.blocking for s in asset.check_specs] == [True]
    assert not deid_defs.defs.asset_checks  # no separate check step per table


def test_clean_table_passes_and_downstream_runs(twin_home: Settings) -> None:
    ran: list[str] = []
    result = _run(twin_home, ran)
    assert result.success
    ev = _check(result)
    assert ev.passed
    md: dict[str, Any] = {k: getattr(v, "value", v) for k, v in ev.metadata.items()}
    assert md["hits"] == 0 and md["checked_columns"] > 0
    assert ran == ["downstream"]


def test_leaking_table_fails_its_check_and_blocks_downstream(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = deid_defs.deidentify_table

    def leaky(store: Store, policy: Any, table: str) -> Any:
        result = real(store, policy, table)
        store.con.execute("UPDATE deid.patient SET state = '10000002'")  # an MRN verbatim
        return result

    monkeypatch.setattr(deid_defs, "deidentify_table", leaky)
    ran: list[str] = []
    result = _run(twin_home, ran)
    assert not result.success
    ev = _check(result)
    assert not ev.passed and ev.severity == dg.AssetCheckSeverity.ERROR
    md = {k: getattr(v, "value", v) for k, v in ev.metadata.items()}
    assert md["hits"] == 1
    assert "deid.patient.state" in str(md["where"]) and "10000002" not in str(md["where"])
    failed = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failed] == ["deid__patient"]
    assert "no_raw_identifiers" in str(failed[0].event_specific_data.error.message)  # type: ignore[union-attr]
    assert ran == []  # downstream of the leaking table did not run
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert started == {"deid__patient"}
    mats = [e.asset_key for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
    assert mats == [PATIENT]
    # The table itself was written (as with a separate check step): the check reports it.
    with Store.open(twin_home, read_only=True) as store:
        assert store.table_exists("deid.patient")
