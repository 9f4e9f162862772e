"""Runs launched outside ``twin run`` (Dagster UI, schedules) are closed by the run-status sensor."""

from pathlib import Path

import dagster as dg

from tests.lineage import minigraph
from twin_pipeline.audit import verify_all
from twin_pipeline.defs.lineage import prov_bundle_on_success
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.lineage import storage
from twin_pipeline.paths import Settings
from twin_pipeline.sources import READERS
from twin_pipeline.store import Store


def test_sensor_signs_a_ui_run_once(twin_home: Settings, tmp_path: Path) -> None:
    landing = minigraph.write_landing(tmp_path / "landing")
    twin = TwinResource(twin_home=str(twin_home.home), landing=str(landing), user="engineer")
    instance = dg.DagsterInstance.ephemeral()
    READERS[minigraph.KIND] = minigraph.ObsReader
    try:
        result = dg.materialize(minigraph.assets(), resources={"twin": twin}, instance=instance)
    finally:
        READERS.pop(minigraph.KIND, None)
    assert result.success
    with Store.open(twin_home, read_only=True) as store:
        assert not verify_all(store).ok  # activities recorded, run not yet signed
    event = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_SUCCESS)
    run = instance.get_run_by_id(result.run_id)
    assert run is not None

    def evaluate() -> object:
        ctx = dg.build_run_status_sensor_context(
            sensor_name=prov_bundle_on_success.name,
            dagster_event=event,
            dagster_instance=instance,
            dagster_run=run,
            resources={"twin": twin},
        )
        return prov_bundle_on_success(ctx)

    assert evaluate() is None
    with Store.open(twin_home, read_only=True) as store:
        assert verify_all(store).ok
        (bundle,) = storage.bundles(store, result.run_id)
    skipped = evaluate()
    assert isinstance(skipped, dg.SkipReason)
    with Store.open(twin_home, read_only=True) as store:
        assert [b.sha256 for b in storage.bundles(store, result.run_id)] == [bundle.sha256]
    assert (twin_home.home / "openlineage" / f"{result.run_id}.ndjson").exists()
