"""A small governed asset graph for lineage tests: NDJSON reader → harmonized → de-identified.

It uses the project's own machinery (``SourceReader``, ``ingest_files`` through the raw-asset
factory, ``governed_run``, the store), registered only for the duration of a test, so lineage is
tested end to end without depending on the other stages' tables.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import dagster as dg

from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.ingest import _raw_asset
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.keys import KeyRing
from twin_pipeline.lineage.runs import finalize_run
from twin_pipeline.paths import Settings
from twin_pipeline.sources import READERS, LoadStats, SourceFile, SourceReader
from twin_pipeline.store import QuarantineRow, Store, lineage_key

KIND = "lineage_test_obs"


class ObsReader(SourceReader):
    """One JSON observation per line of ``obs/*.ndjson``; broken lines are quarantined."""

    kind: ClassVar[str] = KIND
    raw_tables: ClassVar[tuple[str, ...]] = ("raw.lt_observation",)

    def matches(self, rel: str) -> bool:
        return rel.startswith("obs/") and rel.endswith(".ndjson")

    def ensure_tables(self, store: Store) -> None:
        store.con.execute(
            "CREATE TABLE IF NOT EXISTS raw.lt_observation (lineage_key VARCHAR, "
            "source_file VARCHAR, position VARCHAR, record_hash VARCHAR, payload VARCHAR)"
        )

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        stats = LoadStats(self.kind)
        rows, bad = [], []
        for f in files:
            fs = stats.file(f.rel)
            for n, line in enumerate(f.path.read_bytes().splitlines(), start=1):
                if not line.strip():
                    continue
                fs.records_in += 1
                pos = f"line:{n}"
                rh = hashlib.sha256(line).hexdigest()
                try:
                    json.loads(line)
                except ValueError:
                    fs.quarantined += 1
                    bad.append(
                        QuarantineRow(
                            "read",
                            "raw.lt_observation",
                            KIND,
                            f.rel,
                            pos,
                            "broken_json",
                            f"{f.rel} [{pos}]: not JSON",
                            line.decode(errors="replace"),
                        )
                    )
                    continue
                fs.loaded += 1
                rows.append((lineage_key(f.sha256, pos, rh), f.rel, pos, rh, line.decode()))
        if rows:
            store.con.executemany("INSERT INTO raw.lt_observation VALUES (?,?,?,?,?)", rows)
        store.quarantine(bad)
        return stats


@dg.asset(
    key=["harmonized", "lt_observation"],
    deps=[["raw", KIND]],
    group_name="harmonized",
    description="test: observations harmonized from raw",
)
def harmonized_obs(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=["raw.lt_observation"]) as run:
        run.store.con.execute(
            """CREATE OR REPLACE TABLE harmonized.lt_observation AS
            SELECT payload->>'id' AS observation_id, payload->>'patient' AS patient_id,
                   CAST(payload->>'value' AS DOUBLE) AS value, payload->>'unit' AS unit,
                   lineage_key
            FROM raw.lt_observation"""
        )
        run.outputs("harmonized.lt_observation")
    return run.result()


@dg.asset(
    key=["deid", "lt_observation"],
    deps=[["harmonized", "lt_observation"]],
    group_name="deid",
    description="test: de-identified observations",
)
def deid_obs(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=["harmonized.lt_observation"]) as run:
        run.store.con.execute(
            """CREATE OR REPLACE TABLE deid.lt_observation AS
            SELECT observation_id, substr(sha256('salt' || patient_id), 1, 16) AS patient_id,
                   value, unit, lineage_key, 'v1' AS key_version
            FROM harmonized.lt_observation"""
        )
        run.outputs("deid.lt_observation")
    return run.result()


@dg.asset(
    key=["governance", "lt_validation_result"],
    deps=[["harmonized", "lt_observation"]],
    group_name="governance",
    description="test: validation result of harmonized observations",
)
def validation(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=["harmonized.lt_observation"]) as run:
        run.store.con.execute(
            """CREATE OR REPLACE TABLE governance.lt_validation_result AS
            SELECT 'value_not_null' AS expectation, count(*) FILTER (value IS NULL) = 0 AS success,
                   count(*) AS checked FROM harmonized.lt_observation"""
        )
        run.outputs("governance.lt_validation_result")
    return run.result()


def write_landing(landing: Path, n: int = 12, *, broken: bool = True) -> Path:
    (landing / "obs").mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"id": f"obs-{i}", "patient": f"p{i % 4}", "value": 60 + i, "unit": "/min"})
        for i in range(n)
    ]
    if broken:
        lines.insert(3, '{"id": "obs-broken", ')
    (landing / "obs" / "a.ndjson").write_text("\n".join(lines[: n // 2]) + "\n")
    (landing / "obs" / "b.ndjson").write_text("\n".join(lines[n // 2 :]) + "\n")
    return landing


def assets() -> list[dg.AssetsDefinition]:
    return [_raw_asset(ObsReader()), harmonized_obs, deid_obs, validation]


def materialize(
    settings: Settings, landing: Path, *, user: str = "engineer", role: str = "data_engineer"
) -> str:
    """Run the mini graph once and close the run with a signed bundle; returns the run id."""
    READERS[KIND] = ObsReader
    try:
        result = dg.materialize(
            assets(),
            resources={
                "twin": TwinResource(
                    twin_home=str(settings.home), landing=str(landing), user=user, role=role
                )
            },
            instance=dg.DagsterInstance.ephemeral(),
        )
    finally:
        READERS.pop(KIND, None)
    assert result.success
    with Store.open(settings, run_id=result.run_id) as store:
        finalize_run(store, result.run_id, keyring=KeyRing(settings.keys_dir))
    return result.run_id
