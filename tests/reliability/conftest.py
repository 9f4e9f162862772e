"""Fixtures shared by the reader fuzz tests: one seed corpus per session, a scratch folder."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from twin_pipeline.fuzz import TARGETS, check_inputs, seed_corpus

_work_ids = itertools.count()


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[bytes]]:
    """Valid records of every fuzz target (a small generated hospital + the shared HL7 feeds)."""
    corpus = seed_corpus(tmp_path_factory.mktemp("fuzz-seeds"))
    assert set(TARGETS) <= set(corpus)
    return corpus


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


def assert_fuzz_clean(work: Path, inputs: list[tuple[str, bytes]]) -> None:
    """Load every input through its reader: none crashes, hangs, loses or hides a record."""
    # one landing per example (file names restart at 0); the scratch store is rolled back per file
    report = check_inputs(inputs, work / f"ex{next(_work_ids)}", hang_s=30.0)
    assert report.tried == len(inputs)
    assert report.crashed == 0, report.failures
    assert report.hung == 0, report.failures
    assert report.unbalanced == 0, report.failures
    assert report.unexplained == 0, report.failures
