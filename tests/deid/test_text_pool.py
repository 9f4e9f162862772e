"""Free text in the pipeline over worker processes: byte-identical to one process.

The notes are a generated hospital's (realistic PHI: names in capitals, MRNs, dates, addresses),
loaded into ``harmonized.document_reference``; deny-lists come from ``harmonized.patient`` as in
the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline.deid import text as text_mod
from twin_pipeline.deid.policy import load_policy
from twin_pipeline.deid.structured import default_text_fn, deidentify_table
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

DOC_COLUMNS = (
    "document_id, patient_id, encounter_id, date, status, type_system, type_code, type_display, "
    "author_display, content_type, note_text, version_id, last_updated, deleted, source_file, "
    "source_position, lineage_key"
)
PATIENT_COLUMNS = (
    "patient_id, mrn, ssn, family_name, given_name, gender, birth_date, deceased_at, "
    "address_line, city, state, postal_code, phone, email, research_consent, "
    "managing_organization_id, version_id, last_updated, deleted, source_file, source_position, "
    "lineage_key"
)


def _patients(ehr: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(ehr.rglob("*.json")):
        for e in json.loads(path.read_text()).get("entry", []):
            if e.get("resource", {}).get("resourceType") == "Patient":
                out.append(e["resource"])
    return out


def _patient_row(res: dict[str, Any], n: int) -> tuple[Any, ...]:
    name = res["name"][0]
    ids = {
        c.get("code"): i["value"]
        for i in res.get("identifier", [])
        for c in i.get("type", {}).get("coding", [])
    }
    tel = {t["system"]: t["value"] for t in res.get("telecom", [])}
    addr = (res.get("address") or [{}])[0]
    return (
        res["id"],
        ids.get("MR"),
        ids.get("SS"),
        name.get("family"),
        " ".join(name.get("given", [])),
        res.get("gender"),
        res.get("birthDate"),
        None,
        " ".join(addr.get("line", [])),
        addr.get("city"),
        addr.get("state"),
        addr.get("postalCode"),
        tel.get("phone"),
        tel.get("email"),
        True,
        None,
        "1",
        "2024-01-01 00:00:00+00",
        False,
        "ehr/bundles/b.json",
        f"entry:{n}",
        f"lkp{n}",
    )


@pytest.fixture(scope="module")
def notes_home(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from twin_pipeline.generate.core import generate_hospital
    from twin_pipeline.keys import KeyRing

    root = tmp_path_factory.mktemp("deid_pool")
    generate_hospital(root / "landing", patients=5, seed=5)
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    notes = [json.loads(x) for x in (root / "landing/labels/phi.jsonl").read_text().splitlines()]
    patients = _patients(root / "landing" / "ehr")
    with Store.open(settings) as store, store.transaction():
        store.con.execute(
            f"CREATE TABLE harmonized.patient ({PATIENT_COLUMNS.replace(',', ' VARCHAR,')} VARCHAR)"
        )
        store.con.executemany(
            f"INSERT INTO harmonized.patient VALUES ({', '.join('?' * 22)})",
            [_patient_row(p, i) for i, p in enumerate(patients)],
        )
        store.con.execute(
            f"CREATE TABLE harmonized.document_reference ({DOC_COLUMNS.replace(',', ' VARCHAR,')} "
            "VARCHAR)"
        )
        store.con.executemany(
            f"INSERT INTO harmonized.document_reference VALUES ({', '.join('?' * 17)})",
            [
                (
                    n["note_id"],
                    n["patient_id"],
                    None,
                    "2024-03-01T08:00:00+00:00",
                    "current",
                    "http://loinc.org",
                    "11506-3",
                    "Progress note",
                    None,
                    "text/plain",
                    n["text"],
                    "1",
                    None,
                    "false",
                    "ehr/bundles/b.json",
                    f"entry:{i}",
                    f"lk{i}",
                )
                for i, n in enumerate(notes)
            ],
        )
    assert len(notes) >= 10 and len(patients) == 5
    return settings


@pytest.fixture
def store(notes_home: Settings) -> Iterator[Store]:
    with Store.open(notes_home) as s:
        yield s


def _notes(store: Store) -> list[tuple[str, str]]:
    return store.con.execute(
        "SELECT lineage_key, note_text FROM deid.document_reference ORDER BY lineage_key"
    ).fetchall()


def test_two_worker_processes_write_byte_identical_notes(store: Store) -> None:
    policy = load_policy()
    one_fn = default_text_fn(store, policy.date_shift.max_days, workers=1, batch_size=3)
    deidentify_table(store, policy, "document_reference", text_fn=one_fn)
    one, one_hash = _notes(store), store.content_hash("deid.document_reference")
    two_fn = default_text_fn(store, policy.date_shift.max_days, workers=2, batch_size=3)
    deidentify_table(store, policy, "document_reference", text_fn=two_fn)
    two = _notes(store)
    assert [t.encode() for _, t in two] == [t.encode() for _, t in one]
    assert store.content_hash("deid.document_reference") == one_hash
    raw = dict(
        store.con.execute(
            "SELECT lineage_key, note_text FROM harmonized.document_reference"
        ).fetchall()
    )
    # the notes were really de-identified (not passed through), in their own rows
    assert all(t != raw[lk] for lk, t in two)
    names = store.con.execute("SELECT family_name FROM harmonized.patient").fetchall()
    for (family,) in names:
        assert all(family.upper() not in t.upper() for _, t in two), family


def test_pipeline_path_forks_workers_past_the_threshold(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asset's default path (no text_fn) uses the pool once there are enough notes. (The
    text cache is off: with it, the same notes again would not reach the engine at all.)"""
    policy = load_policy()
    monkeypatch.setenv("TWIN_DEID_WORKERS", "1")
    deidentify_table(store, policy, "document_reference", text_cache=False)
    single = _notes(store)

    started: list[int] = []
    from twin_pipeline.deid import pool as pool_mod

    real_pool = pool_mod.TextPool

    class SpyPool(real_pool):  # type: ignore[misc,valid-type]
        def __init__(self, key: bytes, *, workers: int = 2, **kw: Any) -> None:
            started.append(workers)
            super().__init__(key, workers=workers, **kw)

    monkeypatch.setattr(pool_mod, "TextPool", SpyPool)
    monkeypatch.setenv("TWIN_DEID_WORKERS", "2")
    monkeypatch.setattr(text_mod, "POOL_MIN_NOTES", 1000)
    res = deidentify_table(store, policy, "document_reference", text_cache=False)
    assert started == [] and res.text_workers == 1  # too few notes: one process
    monkeypatch.setattr(text_mod, "POOL_MIN_NOTES", 4)
    monkeypatch.setattr(text_mod, "BATCH_SIZE", 4)
    res = deidentify_table(store, policy, "document_reference", text_cache=False)
    assert started == [2] and res.text_workers == 2
    assert res.metadata()["text_workers"] == 2
    assert _notes(store) == single and res.texts_redacted == len(single)


@pytest.mark.parametrize(
    ("env", "notes", "cores", "expected"),
    [
        ("", 10_000, 2, 2),  # default: every usable core
        ("", 10_000, 1, 1),
        ("", 50, 2, 1),  # below the threshold: one process
        ("4", 10_000, 2, 4),
        ("4", 200, 2, 4),  # 200 notes = 4 batches of 64: one each
        ("8", 200, 2, 4),  # no more workers than batches
        ("1", 10_000, 2, 1),
        ("0", 10_000, 2, 1),
        ("two", 10_000, 2, 1),  # not a number: one process (warned)
    ],
)
def test_pool_workers(
    monkeypatch: pytest.MonkeyPatch, env: str, notes: int, cores: int, expected: int
) -> None:
    monkeypatch.setenv("TWIN_DEID_WORKERS", env)
    monkeypatch.setattr(text_mod, "usable_cores", lambda: cores)
    assert text_mod.pool_workers(notes) == expected
