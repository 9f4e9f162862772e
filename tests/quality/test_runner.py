"""Suites run over store tables: planted defects are caught by the expectation meant for them,
failing rows are quarantined with the expectation's name, and a clean store passes everything."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.quality.fixtures import CLEAN_KEYS, PLANTED, Planted, build_store
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.quality import load_suites, run_suite
from twin_pipeline.quality.results import latest, report_json
from twin_pipeline.quality.runner import SuiteRun
from twin_pipeline.quality.suite import Suite
from twin_pipeline.store import Store

AS_OF = datetime(2024, 1, 2, tzinfo=UTC)
TABLES = [
    "harmonized.patient",
    "harmonized.encounter",
    "harmonized.observation",
    "harmonized.telemetry_reading",
]


@pytest.fixture
def store(twin_home: Settings) -> Iterator[Store]:
    with Store.open(twin_home) as s:
        yield s


@pytest.fixture
def dirty_runs(store: Store) -> dict[str, SuiteRun]:
    build_store(store)
    suites = load_suites()
    return {t: run_suite(store, suites[t], as_of=AS_OF) for t in TABLES}


@pytest.fixture(scope="module")
def dirty_module(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Store, dict[str, SuiteRun]]]:
    """One dirty store validated once, shared by the read-only planted-defect tests."""
    settings = Settings.from_env(tmp_path_factory.mktemp("dirty") / "home").ensure()
    KeyRing(settings.keys_dir).init()
    with Store.open(settings) as s:
        build_store(s)
        suites = load_suites()
        yield s, {t: run_suite(s, suites[t], as_of=AS_OF) for t in TABLES}


@pytest.mark.parametrize("planted", PLANTED, ids=[f"{p.lineage_key}-{p.what}" for p in PLANTED])
def test_planted_defect_is_caught_by_its_expectation(
    dirty_module: tuple[Store, dict[str, SuiteRun]], planted: Planted
) -> None:
    store, runs = dirty_module
    run = runs[planted.table]
    result = next(r for r in run.results if r.expectation == planted.expectation)
    assert not result.passed
    assert result.failed_rows >= 1
    assert result.action == "quarantined"
    rows = store.con.execute(
        "SELECT source_file, position, reason, payload FROM governance.quarantine "
        "WHERE stage = 'quality' AND table_name = ? AND rule = ? AND lineage_key = ?",
        [planted.table, planted.expectation, planted.lineage_key],
    ).fetchall()
    assert len(rows) == 1, f"{planted.lineage_key} not quarantined under {planted.expectation}"
    source_file, position, reason, payload = rows[0]
    assert source_file.endswith(".ndjson") and position.startswith("line:")
    assert planted.expectation in reason and source_file in reason
    assert json.loads(payload)
    left = store.con.execute(
        f"SELECT count(*) FROM {planted.table} WHERE lineage_key = ?", [planted.lineage_key]
    ).fetchone()
    assert left == (0,), "quarantined rows leave the table"


def test_only_clean_rows_remain_and_no_gate_blocks(
    dirty_module: tuple[Store, dict[str, SuiteRun]],
) -> None:
    store, dirty_runs = dirty_module
    for table, keys in CLEAN_KEYS.items():
        remaining = {r[0] for r in store.con.execute(f"SELECT lineage_key FROM {table}").fetchall()}
        assert remaining == keys, table
        assert dirty_runs[table].passed, [r.expectation for r in dirty_runs[table].blocking]
    # the two panel components of one source record both stay
    assert store.con.execute(
        "SELECT count(*) FROM harmonized.observation WHERE lineage_key = 'obs-2'"
    ).fetchone() == (2,)


def test_warnings_are_recorded_not_quarantined(
    store: Store, dirty_runs: dict[str, SuiteRun]
) -> None:
    store.con.execute("UPDATE harmonized.patient SET mrn = NULL WHERE patient_id = 'p2'")
    run = run_suite(store, load_suites()["harmonized.patient"], as_of=AS_OF)
    mrn = next(r for r in run.results if r.expectation == "patient_mrn_present")
    assert (mrn.passed, mrn.failed_rows, mrn.action) == (False, 1, "recorded")
    assert run.passed and run.rows_after == run.rows_before == 2


def test_clean_store_passes_every_expectation(store: Store) -> None:
    build_store(store, clean=True)
    suites = load_suites()
    for table in TABLES:
        run = run_suite(store, suites[table], as_of=AS_OF)
        failed = [(r.expectation, r.observed) for r in run.results if not r.passed]
        assert run.clean, failed
        assert run.rows_after == run.rows_before
    assert store.con.execute("SELECT count(*) FROM governance.quarantine").fetchone() == (0,)


def test_stale_feed_is_a_warning(store: Store) -> None:
    build_store(store, clean=True)
    later = datetime(2024, 6, 1, tzinfo=UTC)
    run = run_suite(store, load_suites()["harmonized.telemetry_reading"], as_of=later)
    fresh = next(r for r in run.results if r.expectation == "telemetry_feed_fresh")
    assert not fresh.passed and fresh.action == "recorded"
    assert run.passed and not run.clean


def test_schema_failure_blocks(store: Store) -> None:
    build_store(store, clean=True)
    store.con.execute("ALTER TABLE harmonized.encounter DROP COLUMN period_end")
    run = run_suite(store, load_suites()["harmonized.encounter"], as_of=AS_OF)
    blocked = {r.expectation for r in run.blocking}
    assert "encounter_columns_typed" in blocked
    assert "encounter_end_after_start" in blocked  # could not be evaluated
    assert not run.passed


def test_missing_table_blocks(store: Store) -> None:
    run = run_suite(store, load_suites()["harmonized.encounter"])
    assert not run.passed and all(not r.passed for r in run.results)


def test_rerun_is_idempotent_and_keeps_quarantine(store: Store) -> None:
    build_store(store)
    suite = load_suites()["harmonized.observation"]
    run_suite(store, suite, as_of=AS_OF)
    q1 = store.con.execute(
        "SELECT lineage_key, rule FROM governance.quarantine ORDER BY ALL"
    ).fetchall()
    h1 = store.content_hash("harmonized.observation")
    again = run_suite(store, suite, as_of=AS_OF)
    assert again.clean, "the second run sees only rows that passed"
    assert (
        store.con.execute(
            "SELECT lineage_key, rule FROM governance.quarantine ORDER BY ALL"
        ).fetchall()
        == q1
    )
    assert store.content_hash("harmonized.observation") == h1
    # A rebuild brings the rows back; they are quarantined again, without duplicates.
    build_store(store)
    run_suite(store, suite, as_of=AS_OF)
    assert (
        store.con.execute(
            "SELECT lineage_key, rule FROM governance.quarantine ORDER BY ALL"
        ).fetchall()
        == q1
    )


def _conservation_suite(history: bool = False) -> Suite:
    kwargs: dict[str, object] = {
        "raw_table": "raw.fhir_resource",
        "raw_filter": "resource_type = 'Observation'",
    }
    if history:
        kwargs["history_table"] = "harmonized.observation_history"
    return Suite.model_validate(
        {
            "suite": "observation",
            "table": "harmonized.observation",
            "description": "conservation only, for the test",
            "expectations": [
                {
                    "name": "observation_rows_conserved",
                    "type": "twin.row_conservation",
                    "kwargs": kwargs,
                    "severity": "error",
                    "why": "every raw Observation is harmonized or quarantined",
                }
            ],
        }
    )


def test_conservation_holds_after_quarantine_and_breaks_on_silent_loss(store: Store) -> None:
    build_store(store)
    run_suite(store, load_suites()["harmonized.observation"], as_of=AS_OF)
    ok = run_suite(store, _conservation_suite())
    assert ok.passed, ok.results[0].observed
    # A row that disappears without a quarantine record breaks conservation for its file.
    store.con.execute("DELETE FROM harmonized.observation WHERE lineage_key = 'obs-3'")
    bad = run_suite(store, _conservation_suite())
    res = bad.results[0]
    assert not bad.passed and res.action == "blocked" and res.failed_rows == 1
    assert "ehr/bulk/Observation.ndjson: 1 of" in (res.observed or "")
    # ... unless it was superseded by a newer version (counted in a history table).
    store.con.execute(
        "CREATE TABLE harmonized.observation_history AS SELECT 'obs-3' AS lineage_key"
    )
    assert run_suite(store, _conservation_suite(history=True)).passed
    # Rows with no raw source record (an unknown key, or none) are phantoms, each counted once.
    store.con.execute(
        "INSERT INTO harmonized.observation BY NAME SELECT * REPLACE ('no-such-key' AS "
        "lineage_key) FROM harmonized.observation LIMIT 1"
    )
    store.con.execute(
        "INSERT INTO harmonized.observation BY NAME SELECT * REPLACE (NULL AS lineage_key) "
        "FROM harmonized.observation LIMIT 2"
    )
    phantom = run_suite(store, _conservation_suite(history=True))
    res = phantom.results[0]
    assert not phantom.passed and res.failed_rows == 3
    assert "3 rows without a raw source record" in (res.observed or "")


def test_results_table_and_report(dirty_module: tuple[Store, dict[str, SuiteRun]]) -> None:
    store = dirty_module[0]
    rows = latest(store)
    n_expectations = sum(len(load_suites()[t].expectations) for t in TABLES)
    assert len(rows) == n_expectations
    assert {r["run_id"] for r in rows} == {store.run_id}
    doc = report_json(store)
    check = next(c for c in doc["checks"] if c["expectation"] == "observation_heart_rate_plausible")
    assert check["suite"] == "observation" and check["severity"] == "error"
    assert check["passed"] is False and check["failed_rows"] == 1
    for c in doc["checks"]:
        assert isinstance(c["suite"], str) and isinstance(c["expectation"], str)
        assert c["severity"] in {"error", "warning"} and isinstance(c["passed"], bool)
        assert isinstance(c["failed_rows"], int)


def test_cli_report_json(
    twin_home: Settings, dirty_runs: dict[str, SuiteRun], store: Store
) -> None:
    store.close()
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "quality", "report", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert {c["expectation"] for c in doc["checks"] if not c["passed"]} >= {
        p.expectation for p in PLANTED
    }
    text = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "quality", "report", "--failed"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "observation_heart_rate_plausible" in text and "patient_id_not_null" not in text


def test_cli_run_and_suites(twin_home: Settings, store: Store) -> None:
    build_store(store)
    store.close()
    env_run = [sys.executable, "-m", "twin_pipeline", "quality"]
    dry = subprocess.run(
        [*env_run, "run", "--table", "harmonized.patient", "--no-quarantine", "--no-docs"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr  # row failures are not blocking
    assert "patient" in dry.stdout and "rows         6 ->         6" in dry.stdout
    real = subprocess.run(
        [*env_run, "run", "--table", "harmonized.patient", "--as-of", "2024-01-02"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert real.returncode == 0, real.stderr
    assert "rows         6 ->         2" in real.stdout
    assert (twin_home.data_docs_dir / "index.html").is_file()
    # `run` rendered the docs for its results: `docs` finds the site current, `report` says so.
    docs = subprocess.run([*env_run, "docs"], capture_output=True, text=True, check=False)
    assert docs.returncode == 0 and "already current" in docs.stdout, docs.stderr
    report = subprocess.run([*env_run, "report"], capture_output=True, text=True, check=False)
    assert f"Data Docs: {twin_home.data_docs_dir / 'index.html'}" in report.stdout
    assert "render with" not in report.stdout
    bad = subprocess.run(
        [*env_run, "run", "--table", "harmonized.nope"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "no suite for harmonized.nope" in bad.stderr
    listing = subprocess.run(
        [*env_run, "suites"], capture_output=True, text=True, check=True
    ).stdout
    assert "harmonized.telemetry_reading" in listing and "telemetry_spo2_plausible" in listing
