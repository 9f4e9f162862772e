"""Deterministic sample-hospital generator (EHR, PACS, telemetry, notes, PHI labels)."""

from __future__ import annotations

from twin_pipeline.generate.core import GenerationReport, ProgressFn, generate_hospital

__all__ = ["GenerationReport", "ProgressFn", "generate_hospital"]
