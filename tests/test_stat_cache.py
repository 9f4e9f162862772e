"""The file-hash cache is saved in one statement, so a big landing folder fits a small budget."""

from __future__ import annotations

import pytest

from twin_pipeline.paths import Settings
from twin_pipeline.sources import StatCache
from twin_pipeline.store import _SHARED, Store


def test_twenty_thousand_files_saved_and_replaced_in_one_transaction(
    twin_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One INSERT OR REPLACE per row (executemany) needed ~100 kB of DuckDB memory per file
    # inside one transaction: a 10k-patient hospital's 20k DICOM files ran out of 1 GB.
    monkeypatch.setenv("TWIN_MEMORY_LIMIT", "200MB")
    _SHARED._evict_idle(keep=0)
    cache = StatCache({})
    cache.fresh = {
        f"/landing/pacs/{i:08d}.dcm": (1000 + i, 10**18 + i, f"{i:064x}") for i in range(20_000)
    }
    with Store.open(twin_home) as store:
        with store.transaction():
            cache.save(store)
        assert not cache.fresh and len(cache.known) == 20_000
        cache.fresh = {f"/landing/pacs/{i:08d}.dcm": (7, 8, "f" * 64) for i in range(0, 20_000, 2)}
        with store.transaction():
            cache.save(store)
        loaded = StatCache.load(store)
    _SHARED._evict_idle(keep=0)
    assert len(loaded.known) == 20_000
    assert loaded.known["/landing/pacs/00000002.dcm"] == (7, 8, "f" * 64)
    assert loaded.known["/landing/pacs/00000003.dcm"] == (1003, 10**18 + 3, f"{3:064x}")


def _reference_walk(landing, readers):  # the pathlib walk scan() replaced, kept as the oracle
    from twin_pipeline.sources import IGNORED_NAMES, IGNORED_PARTS, classify

    found, unclaimed, dangling = [], [], []
    for path in sorted(landing.rglob("*")):
        rel = path.relative_to(landing).as_posix()
        parts = set(rel.split("/")[:-1])
        if parts & IGNORED_PARTS or path.name in IGNORED_NAMES or path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            dangling.append(rel)
            continue
        if not path.is_file():
            continue
        (unclaimed if classify(rel, readers) is None else found).append(rel)
    return found, unclaimed, dangling


def test_scan_walks_like_sorted_rglob(tmp_path) -> None:
    """Same files, same order, same unclaimed and dangling links as the pathlib walk: folders
    and files sharing a prefix, hidden files, ignored folders, links to files and folders."""
    from twin_pipeline.sources import load_readers, scan

    land = tmp_path / "landing"
    files = [
        "ehr/bulk/Patient.ndjson",
        "ehr/bulk/Patient.ndjson.gz",
        "ehr/bulk-2/Observation.ndjson",
        "ehr/bulk/a/Observation.ndjson",
        "ehr/bundles/b.json",
        "ehr/bundles/b.json.d/c.json",
        "telemetry/m-1.ndjson",
        "telemetry/m.ndjson",
        "telemetry/M.csv",
        "telemetry/.hidden.ndjson",
        "telemetry/sub/x.ndjson",
        ".cache/telemetry/y.ndjson",
        "labels/phi.jsonl",
        "pacs/1.2/3.4/5.dcm",
        "pacs/1.2/3.4.5/6.dcm",
        "notes.docx",
        "manifest.json",
    ]
    for i, rel in enumerate(files):
        (land / rel).parent.mkdir(parents=True, exist_ok=True)
        (land / rel).write_text(f"{i}\n")
    (land / "telemetry" / "link.ndjson").symlink_to(land / "telemetry" / "m.ndjson")
    (land / "telemetry" / "gone.ndjson").symlink_to(land / "nowhere.ndjson")
    (land / "ehr" / "linked").symlink_to(land / "telemetry", target_is_directory=True)
    readers = load_readers()
    found, unclaimed, dangling = _reference_walk(land, readers)
    s = scan(land, readers)
    assert [f.rel for f in s.found] == found
    assert s.unclaimed == unclaimed
    assert sorted(s.unreadable) == dangling == ["telemetry/gone.ndjson"]
    assert "telemetry/sub/x.ndjson" in found and "labels/phi.jsonl" not in found + unclaimed
    assert [f.rel for f in scan(land, readers, kinds={"telemetry"}).found] == [
        f.rel for f in s.found if f.kind == "telemetry"
    ]


def test_one_walk_per_run_sees_the_landing_once_and_skips_reopening(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a run the landing is walked once (a file landing later is the next run's) and
    the readability sweep does not open again what a raw step read whole in this run; outside
    a run every scan walks and opens anew."""
    from pathlib import Path

    from twin_pipeline.sources import load_readers, one_walk_per_run, scan

    land = tmp_path / "landing"
    for rel in ("telemetry/a.ndjson", "ehr/bulk/Patient.ndjson", "notes.docx"):
        (land / rel).parent.mkdir(parents=True, exist_ok=True)
        (land / rel).write_text("{}\n")
    readers = load_readers()
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        opened.append(self.name)
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", counting_open)
    with one_walk_per_run():
        first = scan(land, readers, kinds={"telemetry"})
        assert [f.rel for f in first.found] == ["telemetry/a.ndjson"]
        (land / "telemetry" / "b.ndjson").write_text("{}\n")  # lands during the run
        second = scan(land, readers, kinds={"telemetry"})
        assert [f.rel for f in second.found] == ["telemetry/a.ndjson"]
        opened.clear()
        sweep = scan(land, readers, kinds=())
        assert sweep.unclaimed == ["notes.docx"] and not sweep.unreadable
        assert opened == ["Patient.ndjson"]  # a.ndjson was read whole by the raw step
        with one_walk_per_run():  # nested: the same view
            assert [f.rel for f in scan(land, readers, kinds={"telemetry"}).found] == [
                "telemetry/a.ndjson"
            ]
    after = scan(land, readers, kinds={"telemetry"})
    assert [f.rel for f in after.found] == ["telemetry/a.ndjson", "telemetry/b.ndjson"]
    opened.clear()
    scan(land, readers, kinds=())
    assert sorted(opened) == ["Patient.ndjson", "a.ndjson", "b.ndjson"]


def test_hashing_on_threads_gives_the_one_thread_result(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files are hashed on every core: same files, order, digests and sizes as on one
    thread, a file that cannot be read among them still reported (not skipped, not fatal),
    and the stat cache filled the same way."""
    import hashlib
    import os

    import twin_pipeline.sources as S

    land = tmp_path / "landing"
    (land / "ehr" / "bulk").mkdir(parents=True)
    blobs = {}
    for i in range(6):
        data = os.urandom(300_000 + i)
        blobs[f"ehr/bulk/Observation-{i}.ndjson"] = data
        (land / "ehr" / "bulk" / f"Observation-{i}.ndjson").write_bytes(data)
    bad = "ehr/bulk/Observation-3.ndjson"
    real = S.sha256_file

    def failing(path, chunk=1 << 20):  # type: ignore[no-untyped-def]
        if path.name == "Observation-3.ndjson":
            raise OSError(5, "Input/output error")
        return real(path, chunk)

    monkeypatch.setattr(S, "sha256_file", failing)
    monkeypatch.setattr(S, "HASH_THREADS_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(S, "usable_cores", lambda: 3)
    readers = S.load_readers()
    runs = {}
    for name, min_file in (("one", 1 << 40), ("threads", 1 << 10)):
        monkeypatch.setattr(S, "HASH_THREADS_MIN_FILE_BYTES", min_file)
        cache = StatCache({})
        s = S.scan(land, readers, kinds={"fhir"}, cache=cache)
        runs[name] = ([(f.rel, f.sha256, f.size) for f in s.found], s.unreadable, cache.fresh)
    assert runs["one"] == runs["threads"]
    found, unreadable, fresh = runs["threads"]
    assert unreadable == {bad: "cannot read file: Input/output error"}
    assert [r for r, _, _ in found] == [r for r in sorted(blobs) if r != bad]
    for rel, digest, size in found:
        assert digest == hashlib.sha256(blobs[rel]).hexdigest() and size == len(blobs[rel])
    assert len(fresh) == len(found) == 5
