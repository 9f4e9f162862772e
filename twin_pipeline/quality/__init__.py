"""Data-quality gates: expectation suites (Great Expectations 1.x) over the twin's tables."""

from __future__ import annotations

from twin_pipeline.quality.results import ExpectationResult, report_json
from twin_pipeline.quality.runner import SuiteRun, run_suite, run_suites
from twin_pipeline.quality.suite import ExpectationSpec, Suite, load_suite, load_suites

__all__ = [
    "ExpectationResult",
    "ExpectationSpec",
    "Suite",
    "SuiteRun",
    "load_suite",
    "load_suites",
    "report_json",
    "run_suite",
    "run_suites",
]
