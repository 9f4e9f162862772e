"""Large NDJSON files are read in pieces of whole lines (issue #11: peak memory of a 10k-patient
run): the raw rows, positions, ordinals, quarantine and per-file counts are those of the whole
file read at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twin_pipeline.sources import fhir as fhir_source

from .conftest import FIXTURES, Ehr, private_env

OBS = "ehr/bulk/Observation.ndjson"


def _awkward_ndjson() -> bytes:
    """The fixture's Observation lines (one broken) with a BOM, blank and CRLF lines, a line
    that is not UTF-8, a Bundle line with two entries and a multibyte character."""
    lines = (FIXTURES / OBS).read_bytes().split(b"\n")
    bundle = {
        "resourceType": "Bundle",
        "id": "b-1",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{i}",
                "resource": {"resourceType": "Patient", "id": f"pp-{i}", "gender": "female"},
                "request": {"method": "PUT", "url": f"Patient/pp-{i}"},
            }
            for i in range(2)
        ],
    }
    extra = [
        b"",
        json.dumps(bundle).encode(),
        b'{"resourceType": "Patient", "id": "p-\xff\xfe", "gender": "male"}',
        b"   ",
        '{"resourceType": "Patient", "id": "p-ü", "name": [{"family": "Müller"}]}\r'.encode(),
    ]
    body = lines[:5] + extra[:2] + lines[5:12] + extra[2:] + lines[12:]
    return b"\xef\xbb\xbf" + b"\n".join(body)


def _run(tmp: Path, data: bytes, piece: int, monkeypatch: pytest.MonkeyPatch) -> Ehr:
    monkeypatch.setattr(fhir_source, "PIECE_BYTES", piece)
    env = private_env(tmp)
    env.write(OBS, data)
    env.run()
    return env


def _raw(env: Ehr) -> list[tuple[object, ...]]:
    return env.rows(
        "SELECT source_file, position, ordinal, lineage_key, record_hash, payload::VARCHAR "
        "FROM raw.fhir_resource ORDER BY ordinal"
    )


@pytest.mark.parametrize("piece", [1, 97, 700, 2048])
def test_pieces_give_the_rows_of_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    data = _awkward_ndjson()
    whole = _run(tmp_path / "whole", data, 1 << 40, monkeypatch)
    cut = _run(tmp_path / "cut", data, piece, monkeypatch)
    assert len(data) > 4 * piece or piece == 2048  # really cut into pieces
    rows = _raw(cut)
    assert rows == _raw(whole)
    ordinals = [r[2] for r in rows]
    assert ordinals == sorted(set(ordinals)) and ordinals[-1] > 12  # they run on across pieces
    assert cut.quarantine() == whole.quarantine()
    assert any(k == (OBS, "line:11") for k in cut.quarantine())  # the broken line, same number
    assert cut.hashes() == whole.hashes()
    assert cut.rows(
        "SELECT records_in, records_loaded, records_quarantined FROM governance.source_file"
    ) == whole.rows(
        "SELECT records_in, records_loaded, records_quarantined FROM governance.source_file"
    )


def test_piece_bytes_cover_every_line_once(tmp_path: Path) -> None:
    from twin_pipeline.sources import SourceFile

    data = b"a\nbb\n\nccc\ndddd"
    p = tmp_path / "x.ndjson"
    p.write_bytes(data)
    f = SourceFile(p, "x.ndjson", "fhir", "0" * 64, len(data))
    for size in range(1, len(data) + 2):
        cur = fhir_source._Cursor()
        parts = [
            fhir_source._piece_bytes(fhir_source._Piece(f, lo, min(lo + size, len(data)), cur))
            for lo in range(0, len(data), size)
        ]
        assert b"".join(parts) == data, size


def test_utf16_file_in_pieces_is_one_quarantined_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (FIXTURES / OBS).read_text().encode("utf-16")
    whole = _run(tmp_path / "whole", data, 1 << 40, monkeypatch)
    cut = _run(tmp_path / "cut", data, 256, monkeypatch)
    assert cut.quarantine() == whole.quarantine() == {(OBS, "file"): "broken_json"}
    assert _raw(cut) == _raw(whole) == []
