"""Raw ingestion assets: one asset per registered source reader, built from the registry."""

import dagster as dg

from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.ingest import files_of_kind, ingest_files, quarantine_unclaimed
from twin_pipeline.sources import SourceReader, load_readers


def _raw_asset(reader: SourceReader) -> dg.AssetsDefinition:
    @dg.asset(
        key=dg.AssetKey(["raw", reader.kind]),
        group_name="raw",
        kinds={"duckdb", "python"},
        owners=["team:data-engineering"],
        description=f"Records landed by the `{reader.kind}` reader (new files only), one row "
        "per source record with file, position and record hash; bad records quarantined.",
    )
    def _asset(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
        landing = twin.landing_dir()
        with governed_run(context, twin, params={"landing": str(landing)}) as run:
            files = files_of_kind(landing, reader.kind, run.store)
            result = ingest_files(run.store, reader, files)
            for rel, fs in result.stats.per_file.items():
                if not fs.balanced():
                    raise dg.Failure(
                        f"{rel}: conservation broken: in={fs.records_in} loaded={fs.loaded} "
                        f"quarantined={fs.quarantined}"
                    )
            new = {f.rel for f in files} & set(result.stats.per_file)
            run.source_files(
                [
                    {"path": f.rel, "sha256": f.sha256, "size": f.size, "kind": f.kind}
                    for f in files
                    if f.rel in new
                ]
            )
            run.outputs(*reader.raw_tables, changed=bool(result.files_new))
            run.meta(**result.metadata())
        return run.result()

    return _asset


@dg.asset(
    key=dg.AssetKey(["governance", "unclaimed_files"]),
    group_name="governance",
    kinds={"duckdb"},
    owners=["team:data-engineering"],
    description="Landed files that no reader handles, quarantined whole with a reason.",
)
def unclaimed_files(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, params={"landing": str(twin.landing_dir())}) as run:
        n = quarantine_unclaimed(run.store, twin.landing_dir())
        run.meta(files_quarantined=n)
    return run.result()


defs = dg.Definitions(assets=[*(_raw_asset(r) for r in load_readers().values()), unclaimed_files])
