"""Landing discovery: only the asked kind is hashed, and unchanged files are not read again
(``governance.file_stat_cache``: path, size, mtime -> sha256)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

import twin_pipeline.sources as sources
from twin_pipeline.ingest import files_of_kind, quarantine_unclaimed
from twin_pipeline.paths import Settings
from twin_pipeline.sources import load_readers, scan, sha256_file
from twin_pipeline.sources.dicom import BadDicom, DicomReader
from twin_pipeline.store import Store

LINE = '{"device_id":"d1","metric":"HR","value":70,"unit":"/min","ts":"2024-01-01T00:00:0%dZ"}\n'


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    root = tmp_path / "landing"
    (root / "telemetry").mkdir(parents=True)
    (root / "ehr" / "bulk").mkdir(parents=True)
    for i in range(3):
        (root / "telemetry" / f"t{i}.ndjson").write_text(LINE % i)
    (root / "ehr" / "bulk" / "Patient.ndjson").write_text('{"resourceType":"Patient","id":"p"}\n')
    (root / "notes.xyz").write_text("no reader claims this")
    return root


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files sha256 was computed for."""
    calls: list[str] = []

    def counting(path: Path, chunk: int = 1 << 20) -> str:
        calls.append(path.name)
        return sha256_file(path, chunk)

    monkeypatch.setattr(sources, "sha256_file", counting)
    return calls


def test_only_the_asked_kind_is_hashed(landing: Path, hashed: list[str]) -> None:
    s = scan(landing, load_readers(), kinds={"telemetry"})
    assert sorted(f.rel for f in s.found) == [f"telemetry/t{i}.ndjson" for i in range(3)]
    assert sorted(hashed) == ["t0.ndjson", "t1.ndjson", "t2.ndjson"]
    assert s.unclaimed == ["notes.xyz"]
    hashed.clear()
    s = scan(landing, load_readers(), kinds=())
    assert s.found == [] and hashed == [] and s.unclaimed == ["notes.xyz"]


def test_unchanged_files_are_not_read_again(
    twin_home: Settings, landing: Path, hashed: list[str]
) -> None:
    with Store.open(twin_home) as store, store.transaction():
        first = files_of_kind(landing, "telemetry", store)
    assert len(hashed) == 3
    hashed.clear()
    with Store.open(twin_home) as store, store.transaction():
        again = files_of_kind(landing, "telemetry", store)
        cached = store.con.execute("SELECT count(*) FROM governance.file_stat_cache").fetchone()
    assert hashed == [] and again == first and cached == (3,)
    # new content (and so a new size or mtime) forces a re-hash of that file only
    changed = landing / "telemetry" / "t1.ndjson"
    changed.write_text(LINE % 1 + LINE % 5)
    with Store.open(twin_home) as store, store.transaction():
        third = files_of_kind(landing, "telemetry", store)
    assert hashed == ["t1.ndjson"]
    new = {f.rel: f.sha256 for f in third}
    assert new["telemetry/t1.ndjson"] == sha256_file(changed)
    assert new["telemetry/t0.ndjson"] == first[0].sha256
    # same size, only the mtime moves: re-hashed, and the same content gives the same sha256
    hashed.clear()
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with Store.open(twin_home) as store, store.transaction():
        fourth = {f.rel: f.sha256 for f in files_of_kind(landing, "telemetry", store)}
    assert hashed == ["t1.ndjson"] and fourth == new


def test_unclaimed_files_are_quarantined_without_hashing(
    twin_home: Settings, landing: Path, hashed: list[str]
) -> None:
    with Store.open(twin_home) as store:
        assert quarantine_unclaimed(store, landing) == 1
    assert hashed == []


def test_bad_dicom_survives_a_worker_process() -> None:
    bad = pickle.loads(pickle.dumps(BadDicom("truncated_dicom", "ends early")))
    assert (bad.rule, str(bad)) == ("truncated_dicom", "ends early")


def test_worker_pool_reads_the_same_as_one_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydicom.data import get_testdata_file

    from twin_pipeline.sources import SourceFile

    names = ["CT_small.dcm", "MR_small.dcm", "rtplan_truncated.dcm", "no_meta.dcm"]
    paths = [Path(str(get_testdata_file(n))) for n in names]
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    paths.append(tmp_path / "junk.dcm")
    files = [SourceFile(p, f"pacs/{p.name}", "dicom", "0" * 64, 1) for p in paths * 3]
    reader = DicomReader()
    monkeypatch.setenv("TWIN_DICOM_WORKERS", "0")
    one = reader._read_all(files)
    monkeypatch.setenv("TWIN_DICOM_WORKERS", "2")
    monkeypatch.setattr("twin_pipeline.sources.dicom.POOL_MIN_FILES", 2)
    pooled = reader._read_all(files)

    def plain(results: list[list[tuple[str, object]]]) -> list[object]:
        return [
            [(pos, (r.rule, str(r)) if isinstance(r, BadDicom) else r) for pos, r in recs]
            for recs in results
        ]

    assert plain(pooled) == plain(one)
    assert any(isinstance(r, BadDicom) for recs in one for _, r in recs)
    assert any(not isinstance(r, BadDicom) for recs in one for _, r in recs)
