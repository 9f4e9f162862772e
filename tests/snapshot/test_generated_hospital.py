"""End to end: a generated hospital, a full ``twin run`` (ingest, harmonize, de-identify, ...),
then researcher snapshots of the real ``deid.*`` tables, checked against the generator's list of
every raw identifier it planted."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from twin_pipeline.errors import AccessDenied
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.snapshot import SnapshotPolicy, create_snapshot, load_snapshot_policy, verify
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow


@dataclass
class Hospital:
    settings: Settings
    landing: Path
    identifiers: dict[str, list[str]]


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Hospital:
    from twin_pipeline.defs.runner import run_pipeline
    from twin_pipeline.generate import generate_hospital

    root = tmp_path_factory.mktemp("snapshot_hospital")
    landing = root / "landing"
    generate_hospital(landing, patients=40, seed=7)
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    summary = run_pipeline(landing, settings, user="engineer", role="data_engineer", ephemeral=True)
    # Failures of other stages (a blocked imaging check, say) are their tests' business; the
    # snapshot needs the core de-identified tables, and exports whatever else was built.
    with Store.open(settings, read_only=True) as store:
        for table in ("deid.patient", "deid.encounter", "deid.observation", "deid.condition"):
            assert store.table_exists(table) and store.row_count(table), (
                table,
                summary.failures,
            )
    ids = json.loads((landing / "manifest.json").read_text())["identifiers"]
    return Hospital(settings, landing, ids)


def _coarse_policy() -> SnapshotPolicy:
    """The shipped policy with k = 2 over 40-year age bands and gender, so that a 40-patient
    hospital releases patients (the shipped k = 5 over age band, sex and ZIP3 suppresses
    nearly everyone in a hospital this small, as it should)."""
    p = load_snapshot_policy()
    age, gender = p.k_anonymity.quasi_identifiers[:2]
    ka = p.k_anonymity.model_copy(
        update={"k": 2, "quasi_identifiers": [age.model_copy(update={"width": 40}), gender]}
    )
    return p.model_copy(update={"k_anonymity": ka})


def _cells(out: Path) -> tuple[list[Any], str]:
    """Every decoded Parquet cell value, and the text of every other file."""
    cells: list[Any] = []
    texts: list[str] = []
    for path in sorted(out.rglob("*")):
        if path.suffix == ".parquet":
            for row in pq.read_table(path).to_pylist():
                cells.extend(v for v in row.values() if v is not None)
        elif path.is_file():
            texts.append(path.read_text())
    return cells, "\n".join(texts)


@pytest.fixture(scope="module")
def snapshot(hospital: Hospital, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "coarse"
    create_snapshot("researcher", out, settings=hospital.settings, snapshot_policy=_coarse_policy())
    return out


def test_snapshot_of_generated_hospital(hospital: Hospital, snapshot: Path) -> None:
    assert verify(snapshot).ok
    m = json.loads((snapshot / "manifest.json").read_text())
    tables = {t["table"]: t for t in m["tables"]}
    for name in ("deid.patient", "deid.encounter", "deid.observation", "deid.condition"):
        assert tables[name]["rows"] > 0, name
    dc = m["disclosure_control"]
    assert dc["patients_released"] > 0
    assert dc["smallest_class_size"] >= 2
    patients = pq.read_table(snapshot / "data" / "patient.parquet").to_pylist()
    assert min(Counter((p["age_band"], p["gender"]) for p in patients).values()) >= 2
    released = {p["patient_id"] for p in patients}
    with Store.open(hospital.settings, read_only=True) as store:
        consenting = {
            r[0]
            for r in store.con.execute(
                "SELECT patient_id FROM deid.patient WHERE research_consent IS TRUE"
            ).fetchall()
        }
        run_ids = {
            r[0]
            for r in store.con.execute(
                "SELECT DISTINCT run_id FROM governance.table_version"
            ).fetchall()
        }
    assert released <= consenting
    for name, t in tables.items():
        cols = {f["name"] for f in t["schema"]}
        if "patient_id" in cols:
            ids = {r["patient_id"] for r in pq.read_table(snapshot / t["file"]).to_pylist()}
            assert ids <= released, name
    assert set(m["source_run_ids"]) <= run_ids and m["source_run_ids"]


def test_no_raw_identifier_in_snapshot(hospital: Hospital, snapshot: Path) -> None:
    cells, text = _cells(snapshot)
    strings = "\n".join(str(c) for c in cells if isinstance(c, str)) + "\n" + text
    dates = {c for c in cells if isinstance(c, dt.date) and not isinstance(c, dt.datetime)}
    values = {str(c) for c in cells if isinstance(c, str)}
    planted = hospital.identifiers
    assert planted["names"] and planted["mrns"] and planted["ssns"]
    for kind in ("names", "mrns", "phones", "ssns", "emails", "addresses"):
        leaked = [v for v in planted[kind] if str(v) in strings]
        assert not leaked, (kind, leaked[:5])
    # a birth date may coincide with a (shifted) event day, so dates are compared as whole
    # values: no DATE cell and no text cell equal to a planted birth date
    for birth in planted["birth_dates"]:
        assert dt.date.fromisoformat(birth) not in dates
        assert birth not in values


def test_shipped_policy_and_reproducibility(hospital: Hospital, tmp_path: Path) -> None:
    a = create_snapshot("researcher", tmp_path / "a", settings=hospital.settings)
    b = create_snapshot("researcher", tmp_path / "b", settings=hospital.settings)
    assert a.manifest_sha256 == b.manifest_sha256
    for t in a.tables:
        assert (tmp_path / "a" / t["file"]).read_bytes() == (
            tmp_path / "b" / t["file"]
        ).read_bytes()
    smallest = a.disclosure["smallest_class_size"]
    assert smallest is None or smallest >= 5
    assert verify(tmp_path / "a").ok


def test_engineer_cannot_snapshot_identified_tables(hospital: Hospital, tmp_path: Path) -> None:
    for tables in (["harmonized.patient"], None):
        with pytest.raises(AccessDenied):
            create_snapshot("engineer", tmp_path / "x", settings=hospital.settings, tables=tables)
    assert not (tmp_path / "x").exists()
