"""Trace re-reads a raw record from its file at its position, in every layout readers use."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from twin_pipeline.lineage.trace import record_candidates

RES = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Åström"}]}
BUNDLE = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [{"resource": {"id": "a"}}, {"resource": RES}],
}


def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def md5(b: bytes) -> str:
    return hashlib.md5(b, usedforsecurity=False).hexdigest()


CASES: list[tuple[str, str, bytes, str, Callable[[bytes], str], bytes]] = [
    # name, file name, file bytes, position, hash function, record bytes the reader hashed
    ("ndjson line", "x.ndjson", b'{"a":1}\n{"b":2}\n', "line:2", sha, b'{"b":2}'),
    ("csv line md5", "t.csv", b"h1,h2\r\n1,2\r\n", "line:2", md5, b"1,2"),
    ("line with CR kept", "x.ndjson", b'{"a":1}\r\n', "line:1", sha, b'{"a":1}\r'),
    ("BOM on line 1", "x.ndjson", b'\xef\xbb\xbf{"a":1}\n', "line:1", sha, b'{"a":1}'),
    ("gzip ndjson", "x.ndjson.gz", b'{"a":1}\n{"b":2}\n', "line:2", sha, b'{"b":2}'),
    (
        "bundle entry",
        "b.json",
        json.dumps(BUNDLE, ensure_ascii=False).encode(),
        "entry:1",
        sha,
        compact(RES),
    ),
    (
        "bundle on an ndjson line",
        "b.ndjson",
        b'{"x":0}\n' + json.dumps(BUNDLE, ensure_ascii=False).encode() + b"\n",
        "line:2/entry:1",
        sha,
        compact(RES),
    ),
    (
        "single resource file",
        "r.json",
        json.dumps(RES).encode(),
        "file",
        sha,
        json.dumps(RES).encode(),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_record_hash_recomputed(tmp_path: Path, case: tuple) -> None:
    _, name, data, position, fn, record = case
    path = tmp_path / name
    pack = gzip.compress if name.endswith(".gz") else bytes
    path.write_bytes(pack(data))
    candidates = record_candidates(path, position)
    assert candidates is not None
    assert fn(record) in candidates.values()
    # a changed byte in the record no longer matches
    mutated = data.replace(b":", b": ").replace(b",", b", ").replace("Å".encode(), b"A")
    path.write_bytes(pack(mutated))
    changed = record_candidates(path, position) or {}
    assert fn(record) not in changed.values()


def test_binary_file_and_missing_record(tmp_path: Path) -> None:
    dcm = tmp_path / "x.dcm"
    dcm.write_bytes(b"\x00" * 128 + b"DICM\xff\xfe")
    assert record_candidates(dcm, "file") is None  # header hashed after parsing: not re-readable
    nd = tmp_path / "x.ndjson"
    nd.write_bytes(b'{"a":1}\n')
    assert record_candidates(nd, "line:9") == {}
    assert record_candidates(nd, "entry:3") == {}


def test_reader_hook_re_reads_binary_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader whose record hash is computed after parsing re-reads it through its hook."""
    from collections.abc import Sequence
    from typing import ClassVar

    from twin_pipeline.lineage import trace
    from twin_pipeline.sources import READERS, LoadStats, SourceFile, SourceReader
    from twin_pipeline.store import Store

    class BinReader(SourceReader):
        kind: ClassVar[str] = "lineage_test_bin"

        def matches(self, rel: str) -> bool:
            return rel.endswith(".bin")

        def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
            return LoadStats(self.kind)

        def record_hashes(self, path: Path, position: str) -> set[str] | None:
            return {sha(path.read_bytes()[4:])} if position == "file" else None

    monkeypatch.setitem(READERS, BinReader.kind, BinReader)
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x00\x01\xfe\xffheader")
    got = trace._reader_candidates(BinReader.kind, f, "file")
    assert got is not None and sha(b"header") in got.values()
    assert trace._reader_candidates("no-such-kind", f, "file") is None
