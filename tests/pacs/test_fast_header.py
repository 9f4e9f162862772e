"""The fast Part 10 header reader gives exactly what the pydicom path gives (DICOM JSON text,
transfer syntax, pixel data length), and leaves every unusual file to pydicom."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

from twin_pipeline.sources import dicom as D


def _slow(path: Path) -> tuple[str, str | None, str, int | None]:
    ds, ts = D.read_part10(path)
    public, private = D._json_dicts(ds)
    return (
        json.dumps(public, sort_keys=True),
        json.dumps(private, sort_keys=True) if private else None,
        str(ts),
        D._raw_length(ds, 0x7FE00010),
    )


def _dicom_files() -> list[Path]:
    out = []
    for p in [*get_testdata_files("*"), *get_charset_files("*.dcm")]:
        path = Path(p)
        if path.is_file() and path.suffix.lower() not in (".json", ".txt", ".icc", ".gz"):
            out.append(path)
    return out


def _check_same(files: list[Path]) -> tuple[int, int]:
    """(files read by the fast reader, files it declined); asserts identical output."""
    fast_n = declined = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            got = D.fast_part10(path)
            if got is None:
                declined += 1
                continue
            fast_n += 1
            want = _slow(path)  # raises BadDicom if pydicom rejects a file the fast one took
            assert (got.public_text, got.private_text, str(got.ts), got.pixel_length) == want, (
                path.name
            )
            assert json.loads(got.public_text) == got.public
            assert json.loads(got.private_text or "{}") == got.private
    return fast_n, declined


def test_same_output_as_pydicom_path_on_real_files() -> None:
    """Every pydicom (test and character set) and pydicom-data file, twice (the second pass from the element cache)."""
    files = _dicom_files()
    assert len(files) > 140
    D._ITEM_CACHE.clear()
    first = _check_same(files)
    second = _check_same(files)
    assert first == second
    fast_n, declined = first
    assert fast_n > 130  # implicit VR, big endian, compressed, sequences, private tags
    # no preamble, deflated, truncated, explicit/implicit VR mix, missing transfer syntax
    assert 10 <= declined < 40


def test_same_output_on_generated_hospital(tmp_path: Path) -> None:
    from twin_pipeline.generate.core import generate_hospital

    generate_hospital(tmp_path / "l", patients=12, seed=11, dirty_rate=0.1)
    files = sorted(p for p in (tmp_path / "l" / "pacs").rglob("*") if p.is_file())
    manifest = json.loads((tmp_path / "l" / "manifest.json").read_text())
    bad = {d["path"] for d in manifest["dirty"] if d["kind"] == "truncated_dicom"}
    fast_n, declined = _check_same(files)
    assert fast_n == len(files) - len(bad)
    assert declined == len(bad)  # truncated files and error pages go to pydicom


@pytest.mark.parametrize(
    ("name", "keep", "rule"),
    [
        ("CT_small.dcm", 34162, "truncated_dicom"),  # inside the pixel data
        ("CT_small.dcm", 1000, "truncated_dicom"),  # inside a header element
        ("CT_small.dcm", 162, "missing_uid"),  # only the file meta group left
        ("MR_small_bigendian.dcm", -20, "truncated_dicom"),
        ("JPEG2000.dcm", -30, "truncated_dicom"),  # inside the encapsulated fragments
    ],
)
def test_truncated_files_declined_and_quarantined_by_pydicom_path(
    tmp_path: Path, name: str, keep: int, rule: str
) -> None:
    out = tmp_path / name
    out.write_bytes(Path(get_testdata_file(name)).read_bytes()[:keep])
    assert D.fast_part10(out) is None
    _, result = D.DicomReader()._part10_path(out)
    assert isinstance(result, D.BadDicom)
    assert result.rule == rule


def test_large_files_are_mapped_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the whole-read size the file is memory-mapped: same result."""
    src = Path(get_testdata_file("CT_small.dcm"))
    monkeypatch.setattr(D, "_READ_WHOLE", 1024)
    got = D.fast_part10(src)
    assert got is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (got.public_text, got.private_text, str(got.ts), got.pixel_length) == _slow(src)


def test_non_latin_character_set_goes_through_pydicom(tmp_path: Path) -> None:
    """Values in another character set are decoded by pydicom (the same as before)."""
    src = get_charset_files("chrH31.dcm")[0]  # Japanese: ISO 2022 IR 13 / 87
    path = tmp_path / "jp.dcm"
    shutil.copy(src, path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    got = D.fast_part10(path)
    assert got is not None
    assert "\\u" in got.public_text  # the name, decoded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (got.public_text, got.private_text) == _slow(path)[:2]


def _landing(tmp_path: Path) -> Path:
    """CT and MR copies with new UIDs, a truncated file and a text file."""
    pacs = tmp_path / "l" / "pacs"
    pacs.mkdir(parents=True)
    srcs = [pydicom.dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    for i in range(12):
        ds = srcs[i % 2]
        ds.SOPInstanceUID = f"2.25.{10**20 + i}"
        ds.save_as(pacs / f"{i:02d}.dcm", enforce_file_format=True)
    data = (pacs / "00.dcm").read_bytes()
    (pacs / "cut.dcm").write_bytes(data[:1000])
    (pacs / "text.dcm").write_text("not an image")
    return tmp_path / "l"


def _load(settings: object, landing: Path) -> tuple[dict[str, tuple[int, int, int]], str, int]:
    from tests.telemetry.helpers import ingest
    from twin_pipeline.store import Store

    res = ingest(settings, landing)["dicom"]  # type: ignore[arg-type]
    per = {k: (v.records_in, v.loaded, v.quarantined) for k, v in res.stats.per_file.items()}
    with Store.open(settings) as store:  # type: ignore[arg-type]
        return per, store.content_hash(D.TABLE), store.row_count(D.TABLE)


def test_pool_and_batched_inserts_store_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process vs a worker pool with inserts every 3 rows: same table, same counts."""
    from twin_pipeline.keys import KeyRing
    from twin_pipeline.paths import Settings

    landing = _landing(tmp_path)
    results = []
    for name, workers, pool_min in (("one", "0", 512), ("pool", "2", 2)):
        home = Settings.from_env(tmp_path / name).ensure()
        KeyRing(home.keys_dir).init()
        monkeypatch.setenv("TWIN_DICOM_WORKERS", workers)
        monkeypatch.setattr(D, "POOL_MIN_FILES", pool_min)
        monkeypatch.setattr(D, "INSERT_BATCH", 3)
        results.append(_load(home, landing))
    (per_one, hash_one, rows_one), (per_pool, hash_pool, rows_pool) = results
    assert per_one == per_pool
    assert hash_one == hash_pool
    assert rows_one == rows_pool == 12
    assert per_one["pacs/cut.dcm"] == (1, 0, 1) and per_one["pacs/text.dcm"] == (1, 0, 1)


_PARENT = [0]


def _dying_read(path: Path, rel: str) -> list[tuple[str, object]]:
    """``_read_one``, but a worker process dies on ``06.dcm`` (module level: picklable)."""
    import os

    if os.getpid() != _PARENT[0] and path.name == "06.dcm":
        os._exit(3)  # a worker killed while parsing
    return _REAL_READ_ONE(path, rel)


_REAL_READ_ONE = D._read_one


def test_broken_pool_falls_back_for_the_files_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies mid-batch: the files not read yet are read in this process."""
    import os

    from twin_pipeline.sources import SourceFile

    landing = _landing(tmp_path)
    paths = sorted((landing / "pacs").iterdir())
    files = [SourceFile(p, f"pacs/{p.name}", "dicom", "0" * 64, 1) for p in paths]
    _PARENT[0] = os.getpid()
    monkeypatch.setattr(D, "_read_one", _dying_read)
    monkeypatch.setenv("TWIN_DICOM_WORKERS", "2")
    monkeypatch.setattr(D, "POOL_MIN_FILES", 2)
    with pytest.warns(UserWarning, match="worker pool unavailable"):
        got = D.DicomReader()._read_all(files)
    monkeypatch.setenv("TWIN_DICOM_WORKERS", "0")
    want = D.DicomReader()._read_all(files)

    def plain(res: list[list[tuple[str, object]]]) -> list[object]:
        return [[(p, r.rule if isinstance(r, D.BadDicom) else r) for p, r in rs] for rs in res]

    assert len(got) == len(files)
    assert plain(got) == plain(want)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "liver.dcm", "eCT_Supplemental.dcm", "test-SR.dcm"]
)
def test_sequences_decoded_without_pydicom(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit VR sequences (nested, undefined lengths, enhanced CT functional groups, an SR
    content tree) are decoded from the bytes, with the JSON pydicom's conversion gives."""

    def no_pydicom(*args: object) -> None:
        raise AssertionError("pydicom converted an element")

    path = Path(get_testdata_file(name))
    monkeypatch.setattr(D, "_pydicom_items", no_pydicom)
    D.clear_cache()
    got = D.fast_part10(path)
    assert got is not None
    assert any(v["vr"] == "SQ" and v.get("Value") for v in got.public.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (got.public_text, got.private_text) == _slow(path)[:2]


def test_element_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-process element cache is cleared when it holds too many bytes or entries."""
    monkeypatch.setattr(D, "_ITEM_CACHE_BYTES", 20_000)
    D.clear_cache()
    paths = [Path(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    for _ in range(5):
        for p in paths:
            assert D.fast_part10(p) is not None
            total = sum(len(hit[3]) for c in D._ITEM_CACHE.values() for hit in c.values())
            assert total < 2 * 20_000
    monkeypatch.setattr(D, "_ITEM_CACHE_MAX", 10)
    D.fast_part10(paths[0])
    D.fast_part10(paths[1])  # starts from an empty cache
    assert sum(len(c) for c in D._ITEM_CACHE.values()) < 100


def _mutations(seed: int, count: int) -> list[bytes]:
    """Byte flips (mostly in header values), cuts, insertions and deletions of real files."""
    import random

    rng = random.Random(seed)
    names = [
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",
        "liver.dcm",
        "test-SR.dcm",
        "MR_small_implicit.dcm",
        "rtplan.dcm",
    ]
    seeds = [Path(get_testdata_file(n)).read_bytes() for n in names]
    out = []
    for _ in range(count):
        b = bytearray(rng.choice(seeds))
        k = 0 if rng.random() < 0.6 else rng.randrange(1, 4)
        hdr_end = min(len(b), 3000)
        j = rng.randrange(132, hdr_end)
        if k == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(132, hdr_end)] = rng.randrange(256)
        elif k == 1:
            b = b[: rng.randrange(132, len(b))]
        elif k == 2:
            b[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del b[j : j + rng.randint(1, 8)]
        out.append(bytes(b))
    return out


def test_mutated_files_read_the_same_with_and_without_the_fast_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Differential fuzz: every mutated file gives the same record (row, JSON, or quarantine
    rule and reason) whether the fast reader takes it or pydicom reads it."""
    reader = D.DicomReader()
    real = D.fast_part10
    path = tmp_path / "m.dcm"
    fast_taken = 0
    for data in _mutations(7, 400):
        path.write_bytes(data)
        monkeypatch.setattr(D, "fast_part10", real)
        got = reader._part10_path(path)
        fast_taken += real(path) is not None
        monkeypatch.setattr(D, "fast_part10", lambda p: None)
        want = reader._part10_path(path)

        def plain(res: tuple[str, object]) -> object:
            pos, r = res
            return (pos, (r.rule, str(r)) if isinstance(r, D.BadDicom) else r)

        assert plain(got) == plain(want)
    assert fast_taken > 50  # the fast reader did take (and agree on) many mutated files


def test_file_meta_value_pydicom_cannot_convert_is_left_to_pydicom(tmp_path: Path) -> None:
    """A group length of the wrong size: pydicom's reader fails on it (not_dicom), so the fast
    reader must not accept the file."""
    data = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    assert data[132:138] == b"\x02\x00\x00\x00UL"
    data[138:140] = (6).to_bytes(2, "little")  # (0002,0000) UL with 6 bytes
    path = tmp_path / "meta.dcm"
    path.write_bytes(bytes(data))
    assert D.fast_part10(path) is None


def test_implicit_vr_values_decoded_with_dictionary_vrs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Implicit VR: public elements with one dictionary VR are decoded here; pydicom converts
    only the ambiguous ones ("US or SS") and private ones."""
    converted: list[int] = []
    real = D._pydicom_items

    def spy(
        raws: list[tuple[int, str | None, int, object, int]], pending: list[int], *a: object
    ) -> None:
        converted.extend(pending)
        real(raws, pending, *a)  # type: ignore[arg-type]

    path = Path(get_testdata_file("MR_small_implicit.dcm"))
    monkeypatch.setattr(D, "_pydicom_items", spy)
    D.clear_cache()
    got = D.fast_part10(path)
    assert got is not None
    assert len(got.public) > 60 and len(converted) <= 2
    assert all(tag >> 16 == 0x0028 for tag in converted)  # pixel value ranges: US or SS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (got.public_text, got.private_text) == _slow(path)[:2]
