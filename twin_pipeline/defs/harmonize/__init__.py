"""Harmonization assets for the EHR: ``harmonized/fhir_resource`` (versions, history, deletes,
reference index), one ``harmonized/<table>`` asset per mapped resource type, and
``harmonized/dangling_reference``. Thin wrappers over :mod:`twin_pipeline.harmonize.fhir`.
"""

import dagster as dg

from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.harmonize import fhir as ehr
from twin_pipeline.harmonize.fhir_spec import load_spec

RAW_FHIR = dg.AssetKey(["raw", "fhir"])
VERSIONS = dg.AssetKey(["harmonized", "fhir_resource"])
OWNERS = ["team:data-engineering"]


@dg.asset(
    key=VERSIONS,
    deps=[RAW_FHIR],
    group_name="harmonized",
    kinds={"duckdb", "sql"},
    owners=OWNERS,
    description="Current version of every FHIR resource (newest meta.lastUpdated/versionId, "
    "then arrival), older versions in harmonized.fhir_history, exact duplicates counted, "
    "Bundle DELETE entries applied as deleted = true, and the reference index "
    "(Type/id, urn:uuid fullUrl, Type?identifier=system|value).",
)
def fhir_resource(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=[ehr.RAW]) as run:
        counts = ehr.build_versions(run.store)
        run.outputs(*ehr.VERSION_TABLES)
        run.meta(**{f"records_{k}": v for k, v in sorted(counts.items())})
    return run.result()


def _table_asset(name: str) -> dg.AssetsDefinition:
    spec = load_spec()
    tspec = spec.tables[name]
    qualified = f"harmonized.{name}"

    @dg.asset(
        key=dg.AssetKey(["harmonized", name]),
        deps=[VERSIONS],
        group_name="harmonized",
        kinds={"duckdb", "sql"},
        owners=OWNERS,
        description=f"FHIR {tspec.resource} resources mapped to `{qualified}` "
        f"({len(tspec.columns)} columns per assets/ehr_fhir.yaml), latest version, "
        "deleted rows flagged"
        + (
            "; canonical UCUM unit per LOINC code (original beside), panels one row per "
            "component; bad units, impossible values and unknown codes quarantined."
            if name == "observation"
            else "."
        ),
    )
    def _asset(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
        # also refreshes this table's rows of the work table harmonized.fhir_reference (not
        # hashed here: dangling_reference records its version as an input)
        with governed_run(context, twin, inputs=[ehr.CURRENT, ehr.REF_INDEX, ehr.RAW]) as run:
            stats = ehr.build_table(run.store, name)
            run.outputs(qualified)
            run.meta(
                resources=stats.resources,
                quarantined=stats.quarantined,
                **{f"quarantined_{k}": v for k, v in sorted(stats.reasons.items())},
            )
        return run.result()

    return _asset


TABLE_KEYS = [dg.AssetKey(["harmonized", n]) for n in load_spec().tables]


@dg.asset(
    key=dg.AssetKey(["harmonized", "dangling_reference"]),
    deps=[VERSIONS, *TABLE_KEYS],
    group_name="harmonized",
    kinds={"duckdb", "sql"},
    owners=OWNERS,
    description="References (from table/id/column to target) whose target was missing when "
    "the record arrived or is missing now; resolved = true once the target has arrived. "
    "Recomputed every run.",
)
def dangling_reference(
    context: dg.AssetExecutionContext, twin: TwinResource
) -> dg.MaterializeResult:
    inputs = [ehr.CURRENT, ehr.REF_INDEX, ehr.STATUS, ehr.REFERENCES]
    with governed_run(context, twin, inputs=inputs) as run:
        n = ehr.build_dangling(run.store)
        unresolved = run.store.con.execute(
            f"SELECT count(*) FROM {ehr.DANGLING} WHERE NOT resolved"
        ).fetchone()
        balance = ehr.conservation(run.store)
        run.outputs(ehr.DANGLING)
        run.meta(
            references=n,
            unresolved=int(unresolved[0]) if unresolved else 0,
            files_unbalanced=sum(1 for f in balance if not f["balanced"]),
        )
    return run.result()


defs = dg.Definitions(
    assets=[fhir_resource, *(_table_asset(n) for n in load_spec().tables), dangling_reference]
)
