"""The golden fixture landing (tests/fixtures/fhir): bundle + bulk NDJSON with planted defects."""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline.harmonize import fhir as ehr
from twin_pipeline.ingest import files_of_kind, ingest_files
from twin_pipeline.sources import load_readers
from twin_pipeline.store import Store

from .conftest import FIXTURES, Ehr, private_env

OBS = "ehr/bulk/Observation.ndjson"
BUNDLE = "ehr/bundles/tx-0001.json"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Ehr:
    env = private_env(tmp_path_factory.mktemp("fixtures"))
    env.copy_fixtures()
    env.run()
    return env


@pytest.mark.parametrize(
    ("position", "rule"),
    [
        ("line:6", "bad_unit"),
        ("line:7", "bad_unit"),
        ("line:8", "impossible_value"),
        ("line:9", "impossible_value"),
        ("line:10", "unknown_code"),
        ("line:11", "broken_json"),
        ("line:12", "missing_required"),
        ("line:13", "bad_timestamp"),
        ("line:14", "validation_failed"),
        ("line:15", "unknown_resource_type"),
        ("line:18", "impossible_value"),
    ],
)
def test_bad_records_are_quarantined_with_rule_and_position(
    loaded: Ehr, position: str, rule: str
) -> None:
    assert loaded.quarantine()[(OBS, position)] == rule


def test_quarantine_reasons_name_file_position_and_field(loaded: Ehr) -> None:
    reasons = dict(
        loaded.rows(
            "SELECT position, reason FROM governance.quarantine WHERE source_file = ?", [OBS]
        )
    )
    assert reasons["line:12"].startswith(f"{OBS} [line:12]: Observation.code")
    assert "Observation.flavour" in reasons["line:14"]
    assert "Observation.effectiveDateTime" in reasons["line:13"]
    assert "kg" in reasons["line:6"] and "/min" in reasons["line:6"]
    assert "outside the plausible range" in reasons["line:8"]
    # the payload is kept as received, for review
    payload = loaded.rows(
        "SELECT payload FROM governance.quarantine WHERE source_file = ? AND position = 'line:11'",
        [OBS],
    )[0][0]
    assert payload.startswith('{"resourceType": "Observation"')


def test_only_planted_records_are_quarantined(loaded: Ehr) -> None:
    assert len(loaded.quarantine()) == 11


@pytest.mark.parametrize(
    ("observation_id", "component", "value", "unit", "original_value", "original_unit"),
    [
        ("obs-t-f", None, 37.0, "Cel", 98.6, "[degF]"),
        ("obs-glu", None, 99.0858, "mg/dL", 5.5, "mmol/L"),
        ("obs-wg", None, 70.5, "kg", 70500, "g"),
        ("obs-hr-alias", None, 80.0, "/min", 80, "beats/minute"),
        ("6f1b8a52-0000-4000-8000-000000000004", None, 69.9896, "kg", 154.3, "[lb_av]"),
        ("6f1b8a52-0000-4000-8000-000000000003", "8480-6", 128.0, "mm[Hg]", 128, "mm[Hg]"),
        ("6f1b8a52-0000-4000-8000-000000000003", "8462-4", 82.5071, "mm[Hg]", 11, "kPa"),
    ],
)
def test_observation_units_are_canonical_with_original_beside(
    loaded: Ehr,
    observation_id: str,
    component: str | None,
    value: float,
    unit: str,
    original_value: float,
    original_unit: str,
) -> None:
    rows = loaded.dicts(
        "SELECT * FROM harmonized.observation WHERE observation_id = ? "
        "AND component_code IS NOT DISTINCT FROM ?",
        [observation_id, component],
    )
    assert len(rows) == 1
    row = rows[0]
    assert math.isclose(row["value"], value, rel_tol=1e-4)
    assert row["unit"] == unit
    assert row["original_value"] == original_value
    assert row["original_unit"] == original_unit
    assert row["code_system"] == "http://loinc.org"


def test_blood_pressure_panel_splits_into_component_rows(loaded: Ehr) -> None:
    rows = loaded.rows(
        "SELECT code, component_code, patient_id, encounter_id FROM harmonized.observation "
        "WHERE observation_id = '6f1b8a52-0000-4000-8000-000000000003' ORDER BY component_index"
    )
    assert rows == [
        (
            "85354-9",
            "8480-6",
            "6f1b8a52-0000-4000-8000-000000000001",
            "6f1b8a52-0000-4000-8000-000000000002",
        ),
        (
            "85354-9",
            "8462-4",
            "6f1b8a52-0000-4000-8000-000000000001",
            "6f1b8a52-0000-4000-8000-000000000002",
        ),
    ]


def test_urn_uuid_references_resolve_inside_the_bundle(loaded: Ehr) -> None:
    (enc,) = loaded.dicts("SELECT * FROM harmonized.encounter")
    assert enc["encounter_id"] == "6f1b8a52-0000-4000-8000-000000000002"
    assert enc["patient_id"] == "6f1b8a52-0000-4000-8000-000000000001"
    assert enc["class_code"] == "IMP"
    assert str(enc["period_start"]) == "2024-03-01 13:00:00+00:00"
    dangling = loaded.dicts("SELECT * FROM harmonized.dangling_reference")
    # Location/loc-icu-01 was never landed: flagged, id still filled from the reference
    assert [(d["from_column"], d["reference"], d["resolved"]) for d in dangling] == [
        ("location_id", "Location/loc-icu-01", False)
    ]
    assert enc["location_id"] == "loc-icu-01"


def test_patient_mapping_from_transaction_bundle(loaded: Ehr) -> None:
    pats = {p["patient_id"]: p for p in loaded.dicts("SELECT * FROM harmonized.patient")}
    p = pats["6f1b8a52-0000-4000-8000-000000000001"]
    assert p["mrn"] == "MRN-0001"
    assert p["ssn"] == "999-11-2222"
    assert (p["family_name"], p["given_name"]) == ("Rivera", "Ana Lucia")
    assert str(p["birth_date"]) == "1961-07-04"
    assert p["address_line"] == "12 Elm St, Apt 3"
    assert (p["phone"], p["email"]) == ("508-555-0101", "ana@example.org")
    assert p["research_consent"] is True
    assert p["version_id"] == "1"
    assert str(pats["p1"]["birth_date"]) == "1950-01-01"  # partial date kept as first day


def test_delete_entry_marks_the_resource_not_drops_it(loaded: Ehr) -> None:
    rows = loaded.rows(
        "SELECT deleted, value FROM harmonized.observation WHERE observation_id = 'obs-old'"
    )
    assert rows == [(True, 71.0)]
    others = loaded.rows("SELECT count(*) FROM harmonized.observation WHERE deleted")
    assert others == [(1,)]


def test_exact_duplicate_is_one_row_and_counted(loaded: Ehr) -> None:
    assert loaded.rows(
        "SELECT count(*) FROM harmonized.observation WHERE observation_id = 'obs-t-f'"
    ) == [(1,)]
    status = dict(
        loaded.rows(
            "SELECT position, status FROM harmonized.fhir_record_status WHERE source_file = ?",
            [OBS],
        )
    )
    assert status["line:2"] == "current"
    assert status["line:16"] == "duplicate"


def test_conservation_balances_per_file(loaded: Ehr) -> None:
    with loaded.store() as store:
        report = {r["file"]: r for r in ehr.conservation(store)}
    obs = report[OBS]
    assert obs["in"] == 17  # 18 lines, one blank
    assert (obs["harmonized"], obs["quarantined"], obs["duplicate"]) == (5, 11, 1)
    bundle = report[BUNDLE]
    assert (bundle["in"], bundle["harmonized"], bundle["deletes"]) == (5, 4, 1)
    assert all(r["balanced"] for r in report.values()), report


def test_rerun_on_same_files_changes_nothing(ehr_env: Ehr) -> None:
    ehr_env.copy_fixtures()
    first = ehr_env.run()
    before = ehr_env.hashes()
    q_before = ehr_env.quarantine()
    # unchanged inputs: the rebuild is skipped and reports the same figures
    again = ehr_env.run()
    assert {k: (v.rows, v.quarantined, v.reasons) for k, v in again.items()} == {
        k: (v.rows, v.quarantined, v.reasons) for k, v in first.items()
    }
    assert ehr_env.hashes() == before
    # a forced full rebuild from the same raw rows gives the same content hashes
    ehr_env.run(force=True)
    assert ehr_env.hashes() == before
    assert ehr_env.quarantine() == q_before


def test_gzip_ndjson_loads_like_plain(ehr_env: Ehr) -> None:
    data = (FIXTURES / OBS).read_bytes()
    ehr_env.write("ehr/bulk/Observation.ndjson.gz", gzip.compress(data))
    ehr_env.run()
    q = ehr_env.quarantine()
    assert q[("ehr/bulk/Observation.ndjson.gz", "line:11")] == "broken_json"
    assert ehr_env.rows("SELECT count(DISTINCT observation_id) FROM harmonized.observation") == [
        (5,)
    ]


def test_chunked_load_gives_identical_tables(
    loaded: Ehr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setattr(fhir_source, "CHUNK_BYTES", 1)  # one file per chunk
    env = private_env(tmp_path)
    env.copy_fixtures()
    env.run()
    assert env.hashes() == loaded.hashes()
    assert env.quarantine() == loaded.quarantine()


def test_process_pool_gives_identical_tables(
    loaded: Ehr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setattr(fhir_source, "PARALLEL_MIN", 1)
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN_BYTES", 1 << 40)  # bundles read here
    monkeypatch.setattr(fhir_source, "CHUNK", 3)
    monkeypatch.setattr(fhir_source, "PRIME_PER_FILE", 1)  # most lines go to the workers
    monkeypatch.setattr(fhir_source, "FLUSH_ROWS", 2)  # rows inserted while workers check
    monkeypatch.setenv("TWIN_FHIR_WORKERS", "2")
    fhir_source.reset_validation()
    env = private_env(tmp_path)
    env.copy_fixtures()
    try:
        env.run()
    finally:
        fhir_source.shutdown_pool()
    assert env.hashes() == loaded.hashes()
    assert env.quarantine() == loaded.quarantine()


def test_bundle_files_in_the_pool_give_identical_tables(
    loaded: Ehr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setattr(fhir_source, "PARALLEL_MIN", 1)
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(fhir_source, "CHUNK", 3)
    monkeypatch.setenv("TWIN_FHIR_WORKERS", "2")
    env = private_env(tmp_path)
    env.copy_fixtures()
    try:
        env.run()
    finally:
        fhir_source.shutdown_pool()
    assert env.hashes() == loaded.hashes()
    assert env.quarantine() == loaded.quarantine()


_DIE_ONCE: dict[str, Any] = {}


def _die_once(arg: Any) -> Any:
    """In a forked pool worker, the first call kills its own process (a module-level function:
    the pool sends it by name)."""
    import os
    import signal

    if os.getpid() != _DIE_ONCE["parent"] and not _DIE_ONCE["marker"].exists():
        _DIE_ONCE["marker"].touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return _DIE_ONCE["real"](arg)


@pytest.mark.parametrize("path", ["lines", "bundles"])
def test_a_killed_validation_worker_loses_nothing(
    path: str, loaded: Ehr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool worker killed mid-load (the OOM killer, a SIGKILL): its records are validated
    in the step's process. Before, the NDJSON path failed the step (BrokenProcessPool) and a
    Bundle file was quarantined as "could not be validated": bad data it was not."""
    import os

    from twin_pipeline.sources import fhir as fhir_source

    marker = tmp_path / "killed"
    target = "_process_texts" if path == "lines" else "_prepare_file"
    monkeypatch.setitem(_DIE_ONCE, "parent", os.getpid())
    monkeypatch.setitem(_DIE_ONCE, "marker", marker)
    monkeypatch.setitem(_DIE_ONCE, "real", getattr(fhir_source, target))
    monkeypatch.setattr(fhir_source, target, _die_once)  # the forked workers inherit it
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN", 1)
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN_BYTES", 1 if path == "bundles" else 1 << 40)
    monkeypatch.setattr(fhir_source, "CHUNK", 3)
    monkeypatch.setattr(fhir_source, "PRIME_PER_FILE", 1)
    monkeypatch.setenv("TWIN_FHIR_WORKERS", "2")
    fhir_source.reset_validation()
    env = private_env(tmp_path)
    env.copy_fixtures()
    try:
        with pytest.warns(UserWarning, match="validation worker process died"):
            env.run()
    finally:
        fhir_source.shutdown_pool()
    assert marker.exists()  # a worker was killed
    assert env.hashes() == loaded.hashes()
    assert env.quarantine() == loaded.quarantine()


@pytest.mark.parametrize(("asked", "busy", "expected"), [("3", 0.0, 3), ("", 0.0, 2),
                         ("", 1.0, 1), ("", 7.0, 1), ("x", 0.0, 2), ("", 0.4, 2)])  # fmt: skip
def test_workers_are_the_cores_idle_now_unless_asked(
    asked: str, busy: float, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setenv("TWIN_FHIR_WORKERS", asked)
    monkeypatch.setattr(fhir_source, "_busy", lambda: busy)
    monkeypatch.setattr(fhir_source.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert fhir_source._workers() == expected


def test_pool_size_is_decided_only_for_a_chunk_that_could_use_a_pool(
    loaded: Ehr, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding the pool size watches the machine for up to 0.1 s: a load too small for a
    pool (a watch round's file, a fuzz input) must not pay it on every call."""
    from twin_pipeline.sources import fhir as fhir_source

    watched: list[int] = []

    def busy() -> float:
        watched.append(1)
        return 1.0  # one core taken: no pool, whatever the chunk size

    monkeypatch.delenv("TWIN_FHIR_WORKERS", raising=False)
    monkeypatch.setattr(fhir_source, "_busy", busy)
    env = private_env(tmp_path / "small")
    env.copy_fixtures()
    with Store.open(env.settings) as store:
        res = ingest_files(store, load_readers()["fhir"], files_of_kind(env.landing, "fhir"))
    assert watched == []  # the fixtures are far below PARALLEL_MIN lines / PARALLEL_MIN_BYTES
    assert res.stats.workers == 1  # what the step's metadata reports: no pool
    env.run()
    assert env.hashes() == loaded.hashes()
    # The same files with the thresholds at one line / one byte: the machine is watched.
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN", 1)
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN_BYTES", 1)
    env = private_env(tmp_path / "large")
    env.copy_fixtures()
    env.run()
    assert watched
    assert env.hashes() == loaded.hashes()


def test_busy_is_the_fewest_other_tasks_seen_in_a_short_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task that runs for a moment (a memory monitor's sample) does not halve the pool."""
    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setattr(fhir_source, "BUSY_INTERVAL", 0.0)
    monkeypatch.setattr(fhir_source, "_own_running", lambda: 1)

    def looks(counts: list[int | None]) -> list[int]:
        seen = iter(counts)
        taken: list[int] = []

        def running() -> int | None:
            n = next(seen)
            if n is not None:
                taken.append(n)
            return n

        monkeypatch.setattr(fhir_source, "_running_now", running)
        return taken

    taken = looks([2, 2, 1, 5])
    assert fhir_source._busy() == 0.0 and taken == [2, 2, 1]  # an idle look ends the watch
    taken = looks([3] * 20)
    assert fhir_source._busy() == 2.0 and len(taken) == fhir_source.BUSY_SAMPLES
    taken = looks([3, 2, 3, 2, 3, 2, 3, 2, 3, 2])
    assert fhir_source._busy() == 1.0
    looks([None])
    monkeypatch.setattr(fhir_source.os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    assert fhir_source._busy() == 0.5  # no /proc/loadavg: the 1-minute load average


def test_busy_sees_a_process_that_keeps_a_core() -> None:
    import subprocess
    import sys
    import time

    from twin_pipeline.sources import fhir as fhir_source

    assert fhir_source._own_running() >= 1
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert fhir_source._busy() >= 1.0
    finally:
        spin.kill()
        spin.wait()


def test_pool_ends_with_the_load_and_releases_inherited_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forked workers inherit open files, the run lock's ``flock`` included: a pool kept after
    the load would block the next run in the same process (``twin watch``)."""
    import fcntl

    from twin_pipeline.sources import fhir as fhir_source

    monkeypatch.setattr(fhir_source, "PARALLEL_MIN", 1)
    monkeypatch.setattr(fhir_source, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setenv("TWIN_FHIR_WORKERS", "2")
    lock = tmp_path / "run.lock"
    env = private_env(tmp_path)
    env.copy_fixtures()
    with lock.open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        env.run()
        assert fhir_source._POOL is None
    with lock.open("a+") as again:  # the first holder is closed: nobody else may hold it
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
