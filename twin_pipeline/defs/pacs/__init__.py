"""PACS assets: DICOM headers → imaging_series / imaging_instance, linked to the EHR."""

import dagster as dg

from twin_pipeline.defs.common import governed_run
from twin_pipeline.defs.resources import TwinResource
from twin_pipeline.harmonize.pacs import INSTANCE, SERIES, build_instances, build_series

RAW_DICOM = dg.AssetKey(["raw", "dicom"])
EHR_STUDY = dg.AssetKey(["harmonized", "imaging_study"])
EHR_PATIENT = dg.AssetKey(["harmonized", "patient"])


# Declared by key: the EHR stage defines them; before it does they are external assets and the
# tables read as absent (every series then has ehr_match = false).
EHR_DEPS = [EHR_STUDY, EHR_PATIENT]


@dg.asset(
    key=dg.AssetKey(["harmonized", "imaging_instance"]),
    deps=[RAW_DICOM],
    group_name="pacs",
    kinds={"duckdb", "dicom"},
    owners=["team:data-engineering"],
    description="One row per DICOM SOP instance (SOP class, rows/columns, frames, pixel "
    "spacing, slice thickness, acquisition time); the same instance twice is kept once.",
)
def imaging_instance(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    with governed_run(context, twin, inputs=["raw.dicom_header"]) as run:
        res = build_instances(run.store)
        run.outputs(INSTANCE)
        run.meta(instances=res.instances, quarantined=res.quarantined)
    return run.result()


@dg.asset(
    key=dg.AssetKey(["harmonized", "imaging_series"]),
    deps=[RAW_DICOM, *EHR_DEPS],
    group_name="pacs",
    kinds={"duckdb", "dicom"},
    owners=["team:data-engineering"],
    description="One row per DICOM series: modality, body part, study/series date-times "
    "(local, with the UTC offset when known), station, manufacturer/model/serial, accession; "
    "linked to the EHR ImagingStudy by StudyInstanceUID or accession and to the patient by "
    "MRN; ehr_match false (not dropped) when no EHR ImagingStudy matches.",
)
def imaging_series(context: dg.AssetExecutionContext, twin: TwinResource) -> dg.MaterializeResult:
    inputs = ["raw.dicom_header", "harmonized.imaging_study", "harmonized.patient"]
    with governed_run(context, twin, inputs=inputs) as run:
        res = build_series(run.store)
        run.outputs(SERIES)
        run.meta(
            series=res.series,
            ehr_matched=res.ehr_matched_series,
            unmatched=res.series - res.ehr_matched_series,
            quarantined=res.quarantined,
        )
    return run.result()


defs = dg.Definitions(assets=[imaging_instance, imaging_series])
