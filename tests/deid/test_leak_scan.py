"""Leak scan after a full ``twin run`` of a generated hospital: no raw identifier survives."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hospital_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.generate.core import generate_hospital

    root = tmp_path_factory.mktemp("deid_leak")
    landing = root / "landing"
    generate_hospital(landing, patients=8, seed=21)
    home = root / "home"
    old = os.environ.get("TWIN_HOME")
    os.environ["TWIN_HOME"] = str(home)
    try:
        settings = Settings.from_env(home).ensure()
        KeyRing(settings.keys_dir).init()
        summary = run_pipeline(landing, settings, ephemeral=True)
        manifest = json.loads((landing / "manifest.json").read_text())
        yield {"settings": settings, "summary": summary, "manifest": manifest}
    finally:
        if old is None:
            os.environ.pop("TWIN_HOME", None)
        else:
            os.environ["TWIN_HOME"] = old


def test_deid_assets_ran(hospital_run: dict[str, Any]) -> None:
    summary = hospital_run["summary"]
    deid_failures = [f for f in summary.failures if f.startswith("deid")]
    assert deid_failures == []
    tables = summary.status["tables"]
    for t in (
        "patient",
        "document_reference",
        "observation",
        "imaging_series",
        "telemetry_reading",
    ):
        assert tables.get(f"deid.{t}", {}).get("rows", 0) > 0, t
    assert "deid.fhir_resource" not in tables  # withheld by policy


def _scan(store: Store, values: dict[str, list[str]], tables: list[str]) -> list[str]:
    """Every raw identifier searched in every column of every deid table (as text)."""
    con = store.con
    rows: list[tuple[str, str, str]] = []
    for kind, vals in values.items():
        for v in vals:
            if kind == "names":
                given, _, family = v.partition(" ")
                for variant in {v, f"{family}, {given}"}:
                    rows.append((kind, variant.lower(), "substring"))
            elif kind in ("mrns", "ssns", "phones", "birth_dates"):
                rows.append((kind, v, "digits"))
            else:
                rows.append((kind, v.lower(), "substring"))
    con.execute("CREATE OR REPLACE TEMP TABLE __ids (kind VARCHAR, value VARCHAR, how VARCHAR)")
    con.executemany("INSERT INTO __ids VALUES (?, ?, ?)", rows)
    hits: list[str] = []
    for table in tables:
        for col, dtype in store.columns(table):
            textual = dtype in ("VARCHAR", "JSON") or dtype.endswith("[]")
            if not textual and dtype not in ("DATE",) and "TIMESTAMP" not in dtype:
                continue  # numbers and booleans cannot hold these identifiers
            cell = f'lower(CAST("{col}" AS VARCHAR))'
            found = con.execute(
                f"""
                SELECT DISTINCT i.kind, i.value FROM {table} d JOIN __ids i ON
                  CASE WHEN i.how = 'substring' THEN contains({cell}, i.value)
                       ELSE regexp_matches({cell}, '(^|[^0-9])' || i.value || '([^0-9]|$)')
                  END
                WHERE d."{col}" IS NOT NULL AND (i.kind <> 'birth_dates' OR {textual})
                """
            ).fetchall()
            hits += [f"{table}.{col}: {k} {v!r}" for k, v in found]
    return hits


def test_no_raw_identifier_in_any_deid_table(hospital_run: dict[str, Any]) -> None:
    ids = hospital_run["manifest"]["identifiers"]
    assert all(ids[k] for k in ("names", "mrns", "phones", "ssns", "emails", "addresses"))
    with Store.open(hospital_run["settings"], read_only=True) as store:
        assert store.tables(["deid"])
        hits = _scan(store, ids, store.tables(["deid"]))
    assert hits == []


def test_scan_would_catch_a_leak(hospital_run: dict[str, Any]) -> None:
    """The scanner itself works: the harmonized (identified) tables are full of hits."""
    ids = hospital_run["manifest"]["identifiers"]
    with Store.open(hospital_run["settings"], read_only=True) as store:
        hits = _scan(store, ids, ["harmonized.patient", "harmonized.document_reference"])
    assert any("mrns" in h for h in hits) and any("names" in h for h in hits)
    assert any("document_reference.note_text: phones" in h for h in hits)


def test_every_deid_table_records_lineage_and_key_version(hospital_run: dict[str, Any]) -> None:
    from twin_pipeline.activity import activities

    with Store.open(hospital_run["settings"], read_only=True) as store:
        for table in store.tables(["deid"]):
            cols = {c for c, _ in store.columns(table)}
            assert "key_version" in cols, table
            if not table.endswith("device_association"):
                assert "lineage_key" in cols, table
            assert store.con.execute(f"SELECT DISTINCT key_version FROM {table}").fetchall() in (
                [],
                [(1,)],
            )
        acts = [a for a in activities(store) if a["asset_key"].startswith("deid/")]
    assert acts
    for a in acts:
        assert a["key_versions"]["pseudonym"].startswith("v1:")
        assert any(p.endswith("deid.yaml") for p in a["policy_versions"])
    # never the key itself
    key_hex = KeyRing(hospital_run["settings"].keys_dir).pseudonym_key().hex()
    assert key_hex not in json.dumps(acts)


def test_deid_notes_keep_clinical_content(hospital_run: dict[str, Any]) -> None:
    with Store.open(hospital_run["settings"], read_only=True) as store:
        notes = [
            r[0]
            for r in store.con.execute("SELECT note_text FROM deid.document_reference").fetchall()
        ]
    assert notes and all("mg" in n or "Vitals" in n or "HPI" in n for n in notes)


def test_blocking_leak_check_passes_on_the_full_run(hospital_run: dict[str, Any]) -> None:
    from twin_pipeline.deid.leaks import leak_check
    from twin_pipeline.deid.policy import load_policy

    policy = load_policy()
    with Store.open(hospital_run["settings"]) as store:
        reports = [leak_check(store, policy, t) for t in policy.released_tables()]
    assert sum(r.checked_columns for r in reports) > 20
    assert [h for r in reports for h in r.hits] == []
