"""On a generated hospital run through the real pipeline (raw -> harmonized -> checks):
every planted defect of ``twin generate --dirty-rate`` ends up caught by the rule meant for it
(at read, harmonize or quality stage), and a clean hospital passes every check."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline.defs.runner import RunSummary, run_pipeline
from twin_pipeline.generate import generate_hospital
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.quality import load_suites
from twin_pipeline.quality.results import latest
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow

# What catches each planted kind: (stage, rule) pairs, "*" = any quality expectation of the
# kind's family. A planted record may also be removed as an orphan when its patient was.
CATCHERS: dict[str, set[tuple[str, str]]] = {
    "broken_json": {("read", "broken_json"), ("read", "broken_record")},
    "truncated_dicom": {
        ("read", "truncated_dicom"),
        ("read", "missing_uid"),
        ("read", "not_dicom"),
    },
    "unknown_resource_type": {("read", "unknown_resource_type")},
    "missing_required": {
        ("read", "missing_required"),
        ("read", "validation_failed"),
        ("quality", "patient_gender_in_fhir_valueset"),
        ("quality", "observation_code_not_null"),
        ("quality", "observation_status_not_null"),
    },
    "bad_timestamp": {
        ("read", "bad_timestamp"),
        ("read", "missing_required"),
        ("quality", "observation_effective_at_present"),
        ("quality", "telemetry_ts_present"),
    },
    "unknown_code": {
        ("harmonize", "unknown_code"),
        ("read", "unknown_metric"),
        ("quality", "observation_code_in_loinc_valueset"),
        ("quality", "telemetry_metric_in_mdc_valueset"),
    },
    "bad_unit": {("harmonize", "bad_unit"), ("quality", "observation_unit_canonical_for_code")},
    "impossible_value": {
        ("harmonize", "impossible_value"),
        *(
            ("quality", e.name)
            for s in load_suites().values()
            for e in s.expectations
            if e.name.endswith("_plausible")
        ),
    },
    "duplicate": {
        ("harmonize", "duplicate"),
        ("quality", "observation_unique"),
        ("quality", "telemetry_reading_unique"),
    },
}
ORPHAN_RULES = {
    e.name for s in load_suites().values() for e in s.expectations if e.type == "twin.foreign_key"
}


def _selection() -> list[str]:
    from twin_pipeline.definitions import defs

    return sorted(
        k.to_user_string()
        for k in defs.resolve_all_asset_keys()
        if k.path[0] in {"raw", "harmonized", "governance"}
    )


def _run(
    tmp: Path, *, dirty_rate: float, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, dict[str, Any], RunSummary]:
    landing = tmp / "landing"
    generate_hospital(landing, patients=12, seed=11, dirty_rate=dirty_rate)
    manifest = json.loads((landing / "manifest.json").read_text())
    settings = Settings.from_env(tmp / "home").ensure()
    KeyRing(settings.keys_dir).init()
    monkeypatch.setenv("TWIN_HOME", str(settings.home))
    summary = run_pipeline(landing, settings, selection=_selection(), ephemeral=True)
    return settings, manifest, summary


@pytest.fixture(scope="module")
def dirty(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, dict[str, Any], RunSummary]]:
    with pytest.MonkeyPatch.context() as mp:
        yield _run(tmp_path_factory.mktemp("dirty"), dirty_rate=0.03, monkeypatch=mp)


def test_every_planted_defect_is_caught_by_its_rule(
    dirty: tuple[Settings, dict[str, Any], RunSummary],
) -> None:
    settings, manifest, summary = dirty
    assert summary.success, summary.failures
    planted = manifest["dirty"]
    assert {d["kind"] for d in planted} >= set(CATCHERS) - {"truncated_dicom"}
    with Store.open(settings, read_only=True) as store:
        q: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        for sf, pos, stage, rule in store.con.execute(
            "SELECT source_file, position, stage, rule FROM governance.quarantine"
        ).fetchall():
            q[(sf, pos)].add((stage, rule))
        fhir_status = {
            (sf, pos): st
            for sf, pos, st in store.con.execute(
                "SELECT source_file, position, status FROM harmonized.fhir_record_status"
            ).fetchall()
        }
    caught_in_quality: set[str] = set()
    for d in planted:
        where = (d["path"], d["position"])
        hits = set(q.get(where, set()))
        if d["kind"] == "duplicate":
            if fhir_status.get(where) == "duplicate":
                continue  # an exact FHIR duplicate, counted (not loaded) by harmonization
            # telemetry keeps one copy of a repeated reading: either line may be quarantined
            line = int(d["position"].split(":")[1])
            hits |= q.get((d["path"], f"line:{line - 1}"), set())
        allowed = CATCHERS[d["kind"]] | {("quality", r) for r in ORPHAN_RULES}
        assert hits & allowed, f"{d} not caught; quarantined as {hits or 'nothing'}"
        caught_in_quality |= {r for s, r in hits & CATCHERS[d["kind"]] if s == "quality"}
    # impossible telemetry values reach the table: the plausibility expectations catch them
    assert any(r.startswith("telemetry_") and r.endswith("_plausible") for r in caught_in_quality)


def test_dirty_hospital_gates_hold(dirty: tuple[Settings, dict[str, Any], RunSummary]) -> None:
    settings, _, _ = dirty
    with Store.open(settings, read_only=True) as store:
        rows = latest(store)
        blocked = [r["expectation"] for r in rows if r["action"] == "blocked"]
        assert not blocked, "row failures are quarantined, conservation still holds"
        conserved = [r for r in rows if r["expectation"].endswith("_rows_conserved")]
        assert conserved and all(r["passed"] for r in conserved)
        # quarantined rows are gone from the tables that were checked
        for table, n in store.con.execute(
            "SELECT table_name, count(*) FROM governance.quarantine WHERE stage = 'quality' "
            "GROUP BY ALL"
        ).fetchall():
            assert n > 0 and store.table_exists(table)


def test_clean_hospital_passes_every_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landing = tmp_path / "landing"
    generate_hospital(landing, patients=12, seed=11, dirty_rate=0.0)
    # Freshness is measured at the time the data was current: just after the newest reading.
    newest = max(
        json.loads(line)["ts"]
        for f in (landing / "telemetry").glob("*.ndjson")
        for line in f.read_text().splitlines()
    )
    from datetime import datetime

    monkeypatch.setenv(
        "TWIN_AS_OF", (datetime.fromisoformat(newest) + timedelta(hours=1)).isoformat()
    )
    settings = Settings.from_env(tmp_path / "home").ensure()
    KeyRing(settings.keys_dir).init()
    summary = run_pipeline(landing, settings, selection=_selection(), ephemeral=True)
    assert summary.success, summary.failures
    with Store.open(settings, read_only=True) as store:
        rows = latest(store)
        suites_run = {r["suite"] for r in rows}
        assert suites_run >= {
            "patient",
            "encounter",
            "observation",
            "telemetry_reading",
            "imaging_series",
        }
        failed = [(r["suite"], r["expectation"], r["observed"]) for r in rows if not r["passed"]]
        assert not failed
        assert store.con.execute(
            "SELECT count(*) FROM governance.quarantine WHERE stage = 'quality'"
        ).fetchone() == (0,)
