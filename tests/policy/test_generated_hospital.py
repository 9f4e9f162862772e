"""The gateway on a generated hospital: real harmonized tables from the FHIR reader and mapper,
real de-identified tables from the de-identification policy (``policies/deid.yaml``).

The sample hospital's planted identifiers (``manifest.json``) must not come out of the auditor's
or the researcher's views, and the researcher's consent filter must follow the patients'
research-consent extension.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twin_pipeline.deid.policy import load_policy
from twin_pipeline.deid.structured import deidentify_table
from twin_pipeline.generate import generate_hospital
from twin_pipeline.harmonize import fhir as ehr
from twin_pipeline.ingest import files_of_kind, ingest_files
from twin_pipeline.paths import Settings
from twin_pipeline.policy import Gateway
from twin_pipeline.sources import load_readers
from twin_pipeline.store import Store

DEID_TABLES = ("patient", "observation", "encounter", "condition")


def _no_free_text(items: list[tuple[str, str]], key: bytes) -> list[str]:
    raise AssertionError("these tables have no free-text columns")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict[str, list[str]]]:
    from twin_pipeline.keys import KeyRing

    root = tmp_path_factory.mktemp("hospital")
    landing = root / "landing"
    generate_hospital(landing, patients=12, seed=11)
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    with Store.open(settings) as store:
        ingest_files(store, load_readers()["fhir"], files_of_kind(landing, "fhir"))
        ehr.build_all(store)
        policy = load_policy()
        with store.transaction():
            for table in DEID_TABLES:
                result = deidentify_table(store, policy, table, text_fn=_no_free_text)
                assert result.status == "written", (table, result)
    manifest = json.loads((Path(landing) / "manifest.json").read_text())
    return settings, manifest["identifiers"]


def test_auditor_sees_no_planted_identifier(
    hospital: tuple[Settings, dict[str, list[str]]],
) -> None:
    settings, ids = hospital
    with Gateway(settings) as gw:
        engineer = gw.query("engineer", "SELECT * FROM harmonized.patient").to_csv()
        auditor = gw.query("auditor", "SELECT * FROM harmonized.patient").to_csv()
    planted = [v for kind in ("ssns", "mrns", "emails", "addresses") for v in ids[kind]]
    assert sum(v in engineer for v in planted) >= len(ids["ssns"])  # engineer: unmasked
    leaked = [v for v in planted if v in auditor]
    assert leaked == []
    assert "***" in auditor and "[REDACTED]" in auditor


def test_researcher_sees_consenting_patients_only(
    hospital: tuple[Settings, dict[str, list[str]]],
) -> None:
    settings, _ = hospital
    with Gateway(settings) as gw:
        consent = gw.query(
            "engineer",
            "SELECT count(*) FILTER (research_consent IS TRUE), count(*) FROM harmonized.patient",
        ).rows[0]
        obs_expected = gw.query(
            "engineer",
            "SELECT count(*) FROM harmonized.observation o JOIN harmonized.patient p "
            "ON o.patient_id = p.patient_id WHERE p.research_consent IS TRUE",
        ).rows[0][0]
        seen = gw.query("researcher", "SELECT count(*) FROM deid.patient").rows[0][0]
        obs = gw.query("researcher", "SELECT count(*) FROM deid.observation").rows[0][0]
    consenting, total = consent
    assert 0 < consenting < total  # the generator plants both kinds
    assert seen == consenting
    assert obs == obs_expected


def test_researcher_sees_no_planted_identifier(
    hospital: tuple[Settings, dict[str, list[str]]],
) -> None:
    settings, ids = hospital
    with Gateway(settings) as gw:
        text = "".join(
            gw.query("researcher", f"SELECT * FROM deid.{t}").to_csv() for t in DEID_TABLES
        )
    planted = [v for kind in ("ssns", "mrns", "emails", "addresses", "phones") for v in ids[kind]]
    assert [v for v in planted if v in text] == []
    assert [n for n in ids["names"] if n in text] == []


def test_every_real_table_reads_through_its_policy(
    hospital: tuple[Settings, dict[str, list[str]]],
) -> None:
    """The masks and filters compile against the real column types of every table."""
    settings, _ = hospital
    with Gateway(settings) as gw:
        tables = sorted(gw._relations)
        assert "harmonized.patient" in tables and "harmonized.observation" in tables
        for user in ("engineer", "auditor", "researcher"):
            _, role = gw.policies.role_of(user)
            readable = [t for t in tables if role.may_read(t)]
            assert readable, user
            for t in readable:
                res = gw.query(user, f"SELECT * FROM {t} LIMIT 3")
                assert len(res.rows) <= 3
