"""Every suite under expectations/ loads, is valid for Great Expectations, and bad suites fail."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import EXPECTATIONS_DIR
from twin_pipeline.quality import gx as gxa
from twin_pipeline.quality.suite import load_suite, load_suites, resolve_tokens

SUITE_FILES = sorted(EXPECTATIONS_DIR.glob("*.yaml"))
NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)


def test_there_are_suites_for_the_core_tables() -> None:
    tables = set(load_suites())
    assert {
        "harmonized.patient",
        "harmonized.encounter",
        "harmonized.observation",
        "harmonized.telemetry_reading",
        "harmonized.imaging_series",
        "harmonized.imaging_instance",
    } <= tables


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.stem for p in SUITE_FILES])
def test_suite_loads_and_gx_accepts_every_expectation(path: Path) -> None:
    suite = load_suite(path)
    assert suite.suite == path.stem, "file name and suite name must agree"
    objs = [
        gxa.build_expectation(
            e.type, resolve_tokens(e.kwargs, now=NOW, as_of=NOW), {"name": e.name, "why": e.why}
        )
        for e in suite.expectations
        if e.is_gx
    ]
    gx_suite = gxa.build_suite(suite.suite, objs)
    assert len(gx_suite.expectations) == sum(1 for e in suite.expectations if e.is_gx)
    for e in suite.expectations:
        assert e.why.strip(), e.name
        if e.row_level:
            assert e.severity == "error", f"{e.name}: row-level checks quarantine (error)"


def _write(tmp_path: Path, expectations: list[dict[str, object]]) -> Path:
    doc = {
        "suite": "t",
        "table": "harmonized.t",
        "description": "a test suite for one table",
        "expectations": expectations,
    }
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


GOOD = {
    "name": "x_not_null",
    "type": "expect_column_values_to_not_be_null",
    "kwargs": {"column": "x"},
    "severity": "error",
    "row_level": True,
    "why": "x identifies the row",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "expect_table_row_count_to_be_between"}, "row_level must be false"),
        ({"severity": "fatal"}, "severity"),
        ({"name": "Bad Name"}, "snake_case"),
        ({"kwargs": {"column": "x", "max_value": "@tomorrow"}}, "bad time token"),
        ({"keep": "first"}, "keep: first"),
        ({"type": "twin.foreign_key", "kwargs": {"column": "x"}}, "needs kwargs"),
        ({"type": "drop_table"}, "unknown expectation type"),
        ({"why": "short"}, "why"),
    ],
)
def test_invalid_suites_are_rejected(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_suite(_write(tmp_path, [{**GOOD, **change}]))


def test_duplicate_expectation_names_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        load_suite(_write(tmp_path, [GOOD, GOOD]))


def test_gx_rejects_wrong_kwargs() -> None:
    with pytest.raises(ConfigError, match="GX rejects"):
        gxa.build_expectation(
            "expect_column_values_to_be_between", {"colum": "x"}, {"name": "typo"}
        )
    with pytest.raises(ConfigError, match="no expectation"):
        gxa.build_expectation("expect_the_moon", {}, {"name": "moon"})


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("@now", NOW),
        ("@now+PT1H", NOW + timedelta(hours=1)),
        ("@as_of-P2D", NOW - timedelta(days=33)),
        ("@as_of-P1DT30M", NOW - timedelta(days=32, minutes=30)),
        (date(1900, 1, 1), datetime(1900, 1, 1, tzinfo=UTC)),
        ("plain", "plain"),
    ],
)
def test_time_tokens(token: object, expected: object) -> None:
    as_of = NOW - timedelta(days=31)
    assert resolve_tokens({"v": [token]}, now=NOW, as_of=as_of) == {"v": [expected]}
