"""Free text de-identified incrementally: a rerun sends only new or changed (person, text) pairs
through the engine and writes the same table as a fresh run.

The notes are a generated hospital's, in the store of ``test_text_pool``'s fixture (a module of
their own here: these tests change notes, patients and keys).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.deid.test_text_pool import notes_home  # noqa: F401 - the fixture, a copy per module
from twin_pipeline.deid import structured
from twin_pipeline.deid.policy import load_policy
from twin_pipeline.deid.structured import TEXT_CACHE, DeidResult, deidentify_table
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

SCOPE = "document_reference.note_text"


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, str]]]:
    """Every batch of (person, text) pairs the Presidio engine is given."""
    calls: list[list[tuple[str, str]]] = []
    real = structured.PresidioText.__call__

    def spy(self: structured.PresidioText, items: list[tuple[str, str]], key: bytes) -> list[str]:
        calls.append(list(items))
        return real(self, items, key)

    monkeypatch.setattr(structured.PresidioText, "__call__", spy)
    return calls


@pytest.fixture
def store(notes_home: Settings) -> Iterator[Store]:  # noqa: F811
    with Store.open(notes_home) as s:
        yield s


def _deid(store: Store, **kw: Any) -> DeidResult:
    with store.transaction():
        return deidentify_table(store, load_policy(), "document_reference", **kw)


def _notes(store: Store) -> dict[str, str]:
    return dict(
        store.con.execute("SELECT lineage_key, note_text FROM deid.document_reference").fetchall()
    )


def _pairs(store: Store) -> set[tuple[str, str]]:
    return {
        (str(p), str(t))
        for p, t in store.con.execute(
            "SELECT patient_id, note_text FROM harmonized.document_reference"
        ).fetchall()
    }


def _fresh(store: Store) -> tuple[dict[str, str], str]:
    """The table a run without the cache writes from the same data (the reference)."""
    _deid(store, text_cache=False)
    return _notes(store), store.content_hash("deid.document_reference")


def test_rerun_takes_every_note_from_the_cache(
    store: Store, engine_calls: list[list[tuple[str, str]]]
) -> None:
    store.con.execute(f"DROP TABLE IF EXISTS {TEXT_CACHE}")
    first = _deid(store)
    n = len(_pairs(store))
    assert first.texts_analyzed == n >= 10 and first.texts_cached == 0
    assert [len(c) for c in engine_calls] == [n]
    notes, digest = _notes(store), store.content_hash("deid.document_reference")

    again = _deid(store)
    assert again.texts_analyzed == again.texts_cached == n
    assert again.metadata()["texts_cached"] == n
    assert len(engine_calls) == 1  # the engine saw nothing new
    assert _notes(store) == notes
    assert store.content_hash("deid.document_reference") == digest
    # the cache holds redactions under keyed digests, never the notes or the names in them
    rows = store.con.execute(f"SELECT scope, digest, redacted FROM {TEXT_CACHE}").fetchall()
    assert len(rows) == n and {r[0] for r in rows} == {SCOPE}
    assert all(len(d) == 64 and int(d, 16) >= 0 for _, d, _ in rows)
    assert {r[2] for r in rows} == set(notes.values())
    raw = {t for _, t in _pairs(store)}
    assert not raw & {r[2] for r in rows}
    families = [
        f for (f,) in store.con.execute("SELECT family_name FROM harmonized.patient").fetchall()
    ]
    assert all(f.upper() not in r[2].upper() for f in families for r in rows)


def test_only_new_and_changed_notes_reach_the_engine(
    store: Store, engine_calls: list[list[tuple[str, str]]]
) -> None:
    _deid(store)
    con = store.con
    first_lk, second_lk, third_lk = (
        r[0]
        for r in con.execute(
            "SELECT lineage_key FROM harmonized.document_reference ORDER BY lineage_key LIMIT 3"
        ).fetchall()
    )
    con.execute(
        "UPDATE harmonized.document_reference SET note_text = note_text || ' Seen again today.' "
        "WHERE lineage_key = ?",
        [first_lk],
    )
    con.execute(
        "INSERT INTO harmonized.document_reference SELECT * REPLACE ('new-note' AS document_id, "
        "'lk-new' AS lineage_key, 'Patient called back on 03/12/2024, doing well.' AS note_text) "
        "FROM harmonized.document_reference WHERE lineage_key = ?",
        [second_lk],
    )
    con.execute("DELETE FROM harmonized.document_reference WHERE lineage_key = ?", [third_lk])
    engine_calls.clear()

    res = _deid(store)
    assert [len(c) for c in engine_calls] == [2]  # the changed note and the new one
    assert {t for _, t in engine_calls[0]} == {
        t
        for lk, t in con.execute(
            "SELECT lineage_key, note_text FROM harmonized.document_reference"
        ).fetchall()
        if lk in (first_lk, "lk-new")
    }
    assert res.texts_cached == res.texts_analyzed - 2
    incremental, digest = _notes(store), store.content_hash("deid.document_reference")
    # the deleted note's redaction left the cache with it: it holds this table's pairs only
    (cached,) = con.execute(
        f"SELECT count(*) FROM {TEXT_CACHE} WHERE scope = ?", [SCOPE]
    ).fetchone()
    assert cached == len(_pairs(store)) == res.texts_analyzed

    fresh, fresh_digest = _fresh(store)
    assert incremental == fresh and digest == fresh_digest
    assert "lk-new" in fresh and third_lk not in fresh


def test_a_changed_deny_list_reanalyzes_that_patients_notes(
    store: Store, engine_calls: list[list[tuple[str, str]]]
) -> None:
    """Her notes stay as they were; her record gains the surname they use. Only the deny-list
    changed, and only her notes go through the engine again."""
    con = store.con
    patient = con.execute(
        "SELECT patient_id FROM harmonized.patient p WHERE EXISTS (SELECT 1 FROM "
        "harmonized.document_reference d WHERE d.patient_id = p.patient_id) ORDER BY 1 LIMIT 1"
    ).fetchone()[0]
    con.execute(
        "UPDATE harmonized.document_reference SET note_text = note_text || "
        "' Family: mother QUINTAVALLE at bedside.' WHERE patient_id = ?",
        [patient],
    )
    _deid(store)
    con.execute(
        "UPDATE harmonized.patient SET family_name = 'Quintavalle' WHERE patient_id = ?", [patient]
    )
    engine_calls.clear()
    _deid(store)
    hers = {(p, t) for p, t in _pairs(store) if p == patient}
    assert len(engine_calls) == 1 and set(engine_calls[0]) == hers
    notes = _notes(store)
    assert all("QUINTAVALLE" not in t.upper() for t in notes.values())
    assert (notes, store.content_hash("deid.document_reference")) == _fresh(store)


def test_a_new_key_or_engine_invalidates_every_entry(
    store: Store,
    notes_home: Settings,  # noqa: F811
    engine_calls: list[list[tuple[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _deid(store)
    n = len(_pairs(store))
    before = {d for (d,) in store.con.execute(f"SELECT digest FROM {TEXT_CACHE}").fetchall()}

    monkeypatch.setattr(structured, "engine_fingerprint", lambda: "engine of another release")
    engine_calls.clear()
    res = _deid(store)
    assert res.texts_cached == 0 and [len(c) for c in engine_calls] == [n]
    monkeypatch.undo()

    KeyRing(notes_home.keys_dir).rotate("pseudonym")
    engine_calls.clear()
    real = structured.PresidioText.__call__
    calls: list[int] = []

    def count(self: structured.PresidioText, items: list[tuple[str, str]], key: bytes) -> list[str]:
        calls.append(len(items))
        return real(self, items, key)

    monkeypatch.setattr(structured.PresidioText, "__call__", count)
    res = _deid(store)
    assert res.texts_cached == 0 and calls == [n] and res.key_version == 2
    after = {d for (d,) in store.con.execute(f"SELECT digest FROM {TEXT_CACHE}").fetchall()}
    assert len(after) == n and not after & before
    assert (_notes(store), store.content_hash("deid.document_reference")) == _fresh(store)


def test_the_engine_fingerprint_reads_the_engine_not_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scheduling batches over processes does not change a redaction: a change to the pool
    (twin_pipeline.deid.pool) keeps the cache; a change to the engine does not."""
    import pathlib

    from twin_pipeline.deid import structured

    read: list[str] = []
    real = pathlib.Path.read_bytes

    def spy(self: pathlib.Path) -> bytes:
        read.append(self.name)
        return real(self) + (b"#" if self.name == "text.py" and changed else b"")

    changed = False
    monkeypatch.setattr(pathlib.Path, "read_bytes", spy)
    structured.engine_fingerprint.cache_clear()
    try:
        before = structured.engine_fingerprint()
        assert "text.py" in read and "recognizers.py" in read and "pool.py" not in read
        changed = True
        structured.engine_fingerprint.cache_clear()
        assert structured.engine_fingerprint() != before
    finally:
        structured.engine_fingerprint.cache_clear()


def test_the_deny_index_is_reused_until_what_it_is_read_from_changes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text steps of a run share one deny index (built once); any change to the rows it
    is read from (same row count) builds it again, and each caller gets its own copy."""
    from twin_pipeline.deid import context

    built: list[int] = []
    real = context._build_index

    def counting(con: Any) -> context.DenyIndex:
        built.append(1)
        return real(con)

    monkeypatch.setattr(context, "_build_index", counting)
    monkeypatch.setattr(context, "_LAST", None)
    first = context.deny_index_from_store(store.con)
    second = context.deny_index_from_store(store.con)
    assert len(built) == 1 and first == second and first is not second
    first.staff.add("Not A Clinician")  # a caller's copy is its own
    assert "Not A Clinician" not in context.deny_index_from_store(store.con).staff
    patient = next(iter(first.patients))
    store.con.execute(
        "UPDATE harmonized.patient SET family_name = 'Quintavalle' WHERE patient_id = ?", [patient]
    )
    third = context.deny_index_from_store(store.con)
    assert len(built) == 2 and "Quintavalle" in third.for_patient(patient).names
    store.con.execute(
        "UPDATE harmonized.document_reference SET author_display = 'Ada Okonkwo-Lind, MD' "
        "WHERE rowid = (SELECT min(rowid) FROM harmonized.document_reference)"
    )
    assert any("Okonkwo-Lind" in s for s in context.deny_index_from_store(store.con).staff)
    assert len(built) == 3
