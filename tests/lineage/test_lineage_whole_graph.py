"""Done-when test: the whole asset graph over a generated hospital leaves complete, signed PROV.

Every output table version has ``wasGeneratedBy``, every registered source file a ``used``, and
a random de-identified observation traces back to bytes whose sha256 matches the registered
source file.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import prov.model as pm
import pytest

from twin_pipeline.activity import activities
from twin_pipeline.audit import verify_all
from twin_pipeline.keys import KeyRing
from twin_pipeline.lineage import openlineage, prov_build, storage, trace
from twin_pipeline.lineage.report import build_report
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow


@dataclass
class Hospital:
    settings: Settings
    landing: Path
    run_id: str
    failures: list[str]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Hospital:
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.generate import generate_hospital

    root = tmp_path_factory.mktemp("lineage_hospital")
    landing = root / "landing"
    generate_hospital(landing, patients=6, seed=5)
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    summary = run_pipeline(landing, settings, user="engineer", role="data_engineer", ephemeral=True)
    # Lineage must be complete for whatever materialized, also when another stage's blocking
    # check stops part of the graph; failed steps get OpenLineage FAIL events (checked below).
    with Store.open(settings, read_only=True) as store:
        assert store.table_exists("deid.observation"), summary.failures
    return Hospital(settings, landing, summary.run_id, list(summary.failures))


def _formal(rec: pm.ProvRecord) -> list[str]:
    return [str(v) for _, v in rec.formal_attributes]


def test_every_table_version_generated_and_every_file_used(hospital: Hospital) -> None:
    with Store.open(hospital.settings, read_only=True) as store:
        doc = storage.stored_document(store, hospital.run_id)
        recs = activities(store, hospital.run_id)
        files = store.con.execute("SELECT path, sha256 FROM governance.source_file").fetchall()
    assert len(recs) >= 20
    generated = {_formal(r)[0] for r in doc.get_records(pm.ProvGeneration)}
    outputs = {
        prov_build.table_version_id(tv["table"], tv["content_hash"])
        for r in recs
        for tv in r["outputs"]
    }
    assert {o for o in outputs if "/deid." in o}, "no de-identified table was materialized"
    missing = outputs - generated
    assert not missing, sorted(missing)[:5]
    used = {_formal(r)[1] for r in doc.get_records(pm.ProvUsage)}
    file_ids = {prov_build.file_id(sha) for _, sha in files}
    assert len(file_ids) >= 10
    assert not file_ids - used
    acts = list(doc.get_records(pm.ProvActivity))
    assert len(acts) == len(recs)


def test_random_deid_observation_traces_to_source_bytes(hospital: Hospital) -> None:
    with Store.open(hospital.settings, read_only=True) as store:
        keys = [
            r[0]
            for r in store.con.execute(
                "SELECT lineage_key FROM deid.observation ORDER BY lineage_key"
            ).fetchall()
        ]
        assert keys
        key = random.Random(20261125).choice(keys)
        result = trace.trace(store, "deid.observation", key)
        registered = dict(
            store.con.execute("SELECT path, sha256 FROM governance.source_file").fetchall()
        )
    tables = [s.table for s in result.steps]
    assert tables[0] == "deid.observation" and tables[-1].startswith("raw.")
    assert "harmonized.observation" in tables
    src = result.source
    assert src is not None
    data = (hospital.landing / src.path).read_bytes()
    assert hashlib.sha256(data).hexdigest() == registered[src.path] == src.sha256
    assert src.lineage_key_ok
    assert src.position != "file"
    assert src.record_hash_ok, src  # the record re-read from the file hashes to the raw row
    assert result.verified, result.to_dict()


def test_signed_verified_and_reported(hospital: Hospital) -> None:
    with Store.open(hospital.settings, read_only=True) as store:
        report = verify_all(store)
        page = build_report(store)
        n_acts = len(activities(store, hospital.run_id))
    assert report.ok, report.to_dict()
    assert report.bundles == 1
    for needle in ('class="node node-source"', 'class="node node-asset"', "deid.observation"):
        assert needle in page
    events = openlineage.read_events(
        openlineage.events_path_for(hospital.settings, hospital.run_id)
    )
    assert len(events) == n_acts + len(hospital.failures)
    assert sum(e["eventType"] == "FAIL" for e in events) == len(hospital.failures)
    deid = [e for e in events if e["job"]["name"] == "deid/patient"]
    assert deid, [e["job"]["name"] for e in events]
    cl = deid[0]["outputs"][0]["facets"]["columnLineage"]["fields"]
    assert cl["patient_id"]["transformationType"] == "MASKED"
