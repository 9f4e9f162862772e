"""Dagster definitions, thin wrappers over the library, one sub-package per stage.

Each stage package (``ingest``, ``harmonize``, ``deid``, ...) exposes a module-level
``defs: dg.Definitions``; :mod:`twin_pipeline.definitions` merges them all.
Asset keys follow the store: ``[schema, table]`` (``raw/fhir``, ``harmonized/patient``, ...).
"""
