"""The DuckDB push-down gives the same outcome as Great Expectations for every expectation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


PROPERTY_SUITE = {
    "suite": "prop",
    "table": "harmonized.prop",
    "description": "random tables: both engines must agree",
    "expectations": [
        {
            "name": "a_not_null",
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "a"},
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "a_in_set",
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "a", "value_set": ["p", "q"]},
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "x_between_for_p",
            "type": "expect_column_values_to_be_between",
            "kwargs": {
                "column": "x",
                "min_value": 0,
                "max_value": 10,
                "strict_max": True,
                "row_condition": 'a=="p" or y.isnull()',
                "condition_parser": "pandas",
            },
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "a_unique",
            "type": "expect_column_values_to_be_unique",
            "kwargs": {"column": "a"},
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "ax_unique",
            "type": "expect_compound_columns_to_be_unique",
            "kwargs": {"column_list": ["a", "x"]},
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "x_ge_y",
            "type": "expect_column_pair_values_a_to_be_greater_than_b",
            "kwargs": {
                "column_A": "x",
                "column_B": "y",
                "or_equal": True,
                "ignore_row_if": "either_value_is_missing",
            },
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "a_y_pairs",
            "type": "expect_column_pair_values_to_be_in_set",
            "kwargs": {
                "column_A": "a",
                "column_B": "y",
                "value_pairs_set": [["p", 1.0], ["q", 2.0]],
            },
            "severity": "error",
            "why": "property test",
        },
        {
            "name": "x_max",
            "type": "expect_column_max_to_be_between",
            "kwargs": {"column": "x", "max_value": 5},
            "severity": "warning",
            "why": "property test",
        },
    ],
}
cell_a = st.one_of(st.none(), st.sampled_from(["p", "q", "r"]))
cell_n = st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 1.0, 2.0, 9.5, 10.0, 11.0]))


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(st.tuples(cell_a, cell_n, cell_n), min_size=1, max_size=12))
def test_engines_agree_on_random_tables(dirty_store: Store, rows: list[tuple[object, ...]]) -> None:
    from twin_pipeline.quality import runner
    from twin_pipeline.quality.suite import Suite

    suite = Suite.model_validate(PROPERTY_SUITE)
    con = dirty_store.con
    con.execute("CREATE OR REPLACE TABLE harmonized.prop (a VARCHAR, x DOUBLE, y DOUBLE)")
    con.executemany("INSERT INTO harmonized.prop VALUES (?, ?, ?)", rows)
    now = datetime.now(UTC)
    specs = suite.expectations
    gx = runner._run_gx(dirty_store, suite, specs, now=now, as_of=now, push_down=False)
    sql = runner._run_gx(dirty_store, suite, specs, now=now, as_of=now, push_down=True)
    for name, out in gx.items():
        got = sql[name]
        assert (got.success, got.unexpected, sorted(got.index)) == (
            out.success,
            out.unexpected,
            sorted(out.index),
        ), (name, rows)


def test_data_docs_render_both_engines_without_row_values(
    dirty_store: Store, tmp_path: Path
) -> None:
    from twin_pipeline.quality import docs, results

    suites = load_suites()
    for table, engine in (("harmonized.encounter", "gx"), ("harmonized.observation", "sql")):
        run_suite(
            dirty_store, suites[table], as_of=AS_OF, quarantine=False, record=True, engine=engine
        )
    # Both engines record the same GX configuration (tokens resolved, datetimes kept).
    recorded = {r["expectation"]: r for r in results.latest(dirty_store)}
    config = results.decode_config(recorded["encounter_end_after_start"]["gx_config"])
    assert (
        config is not None and config["type"] == "expect_column_pair_values_a_to_be_greater_than_b"
    )
    assert config["meta"]["severity"] == "error"
    assert recorded["observation_patient_exists"]["gx_config"] is None  # twin.foreign_key
    target = tmp_path / "docs"
    assert docs.status(dirty_store, target) == "missing"
    index, rendered = docs.render(dirty_store, target)
    assert rendered and index.is_file()
    assert docs.status(dirty_store, target) == "current"
    assert docs.render(dirty_store, target) == (index, False), "a current site is not redone"
    pages = {p.relative_to(target).as_posix(): p.read_text() for p in target.rglob("*.html")}
    assert any(k.startswith("validations/encounter/") for k in pages)
    assert any(k.startswith("validations/observation/") for k in pages)
    text = "\n".join(pages.values())
    assert "encounter_class_in_actcode_valueset" in text or "class_code" in text
    # planted bad values (an unknown class code, an unknown LOINC code) never reach the docs
    assert "XYZ" not in text and "99999-9" not in text
    # A new run of a suite makes the site stale until it is rendered again.
    first_run, dirty_store.run_id = dirty_store.run_id, "later-run"
    try:
        run_suite(dirty_store, suites["harmonized.encounter"], as_of=AS_OF, quarantine=False)
    finally:
        dirty_store.run_id = first_run
    assert docs.status(dirty_store, target) == "stale"
    assert docs.render(dirty_store, target)[1]
    assert any("later-run" in str(p) for p in target.rglob("*.html"))


def test_data_docs_refuse_to_replace_a_foreign_folder(dirty_store: Store, tmp_path: Path) -> None:
    from twin_pipeline.errors import ConfigError
    from twin_pipeline.quality import docs

    run_suite(dirty_store, load_suites()["harmonized.patient"], as_of=AS_OF, quarantine=False)
    (tmp_path / "mine.txt").write_text("not Data Docs")
    with pytest.raises(ConfigError, match="not a Data Docs folder"):
        docs.render(dirty_store, tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "not Data Docs"
