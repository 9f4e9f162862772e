"""The DuckDB push-down gives the same outcome as Great Expectations for every expectation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.quality.fixtures import build_store
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.quality import load_suites, run_suite
from twin_pipeline.quality.sqlengine import compile_expectation, translate_condition
from twin_pipeline.store import Store

AS_OF = datetime(2024, 1, 2, tzinfo=UTC)
SUITES = sorted(load_suites())


@pytest.fixture(scope="module")
def dirty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    settings = Settings.from_env(tmp_path_factory.mktemp("engines") / "home").ensure()
    KeyRing(settings.keys_dir).init()
    with Store.open(settings) as store:
        build_store(store)
        yield store


def _outcomes(store: Store, table: str, engine: str) -> dict[str, tuple[bool, int, int]]:
    run = run_suite(
        store, load_suites()[table], as_of=AS_OF, quarantine=False, record=False, engine=engine
    )
    return {r.expectation: (r.passed, r.evaluated_rows, r.failed_rows) for r in run.results}


@pytest.mark.parametrize(
    "table",
    [
        "harmonized.patient",
        "harmonized.encounter",
        "harmonized.observation",
        "harmonized.telemetry_reading",
    ],
)
def test_sql_engine_agrees_with_gx(dirty_store: Store, table: str) -> None:
    gx = _outcomes(dirty_store, table, "gx")
    sql = _outcomes(dirty_store, table, "sql")
    assert sql == gx
    assert any(not passed for passed, _, _ in gx.values()), "the fixture must exercise failures"


def test_sql_engine_finds_the_same_rows(dirty_store: Store) -> None:
    from twin_pipeline.quality import runner

    suite = load_suites()["harmonized.observation"]
    specs = [e for e in suite.expectations if e.is_gx]
    now = datetime.now(UTC)
    gx = runner._run_gx(dirty_store, suite, specs, now=now, as_of=AS_OF, push_down=False)
    sql = runner._run_gx(dirty_store, suite, specs, now=now, as_of=AS_OF, push_down=True)
    for name, out in gx.items():
        assert sorted(sql[name].index) == sorted(out.index), name


@pytest.mark.parametrize(
    ("cond", "sql"),
    [
        ('code=="8867-4"', "coalesce(\"code\" = '8867-4', FALSE)"),
        ("value.notnull()", '"value" IS NOT NULL'),
        (
            'code=="a" or component_code=="b"',
            "coalesce(\"code\" = 'a', FALSE) OR coalesce(\"component_code\" = 'b', FALSE)",
        ),
        (
            '(code!="a") and value.isnull()',
            '( coalesce("code" <> \'a\', TRUE) ) AND "value" IS NULL',
        ),
        ("value > 3", None),
        ('nope=="a"', None),
        ("__import__('os')", None),
    ],
)
def test_row_condition_translation(cond: str, sql: str | None) -> None:
    assert translate_condition(cond, ["code", "component_code", "value"]) == sql


def test_uncompilable_expectations_fall_back_to_gx() -> None:
    cols = ["x"]
    assert (
        compile_expectation("expect_column_values_to_be_dateutil_parseable", {"column": "x"}, cols)
        is None
    )
    assert (
        compile_expectation(
            "expect_column_values_to_not_be_null", {"column": "x", "mostly": 0.9}, cols
        )
        is None
    )
    assert compile_expectation("expect_column_values_to_not_be_null", {"column": "y"}, cols) is None
    assert (
        compile_expectation("expect_column_values_to_not_be_null", {"column": "x"}, cols)
        is not None
    )
