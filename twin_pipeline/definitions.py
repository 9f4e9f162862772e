"""The single Dagster code location: every stage's ``defs`` merged into one ``Definitions``."""

from __future__ import annotations

import importlib
import pkgutil

import dagster as dg

from twin_pipeline import defs as defs_pkg
from twin_pipeline.defs.resources import twin_resource_from_env

ALL_JOB = "twin_all"


def _stage_defs() -> list[dg.Definitions]:
    found: list[dg.Definitions] = []
    for mod in sorted(pkgutil.iter_modules(defs_pkg.__path__), key=lambda m: m.name):
        if not mod.ispkg:
            continue
        module = importlib.import_module(f"{defs_pkg.__name__}.{mod.name}")
        stage = getattr(module, "defs", None)
        if isinstance(stage, dg.Definitions):
            found.append(stage)
    return found


def build_definitions() -> dg.Definitions:
    merged = dg.Definitions.merge(*_stage_defs())
    return dg.Definitions.merge(
        merged,
        dg.Definitions(
            jobs=[
                dg.define_asset_job(
                    ALL_JOB,
                    selection=dg.AssetSelection.all(),
                    description="Materialize the whole twin: raw → harmonized → deid → twin.",
                )
            ],
            resources={"twin": twin_resource_from_env()},
            executor=dg.in_process_executor,
        ),
    )


defs = build_definitions()
