"""Hypothesis-driven fuzzing of the DICOM, telemetry (NDJSON, CSV) and HL7 v2 readers.

Each example lands a batch of inputs (mutations of valid seed records made with
``twin_pipeline.fuzz.mutate``, and arbitrary bytes) and loads every file through the reader that
claims it (``twin_pipeline.fuzz.check_inputs``): nothing may escape a reader, conservation must
hold per file, and every quarantined record must carry a rule and a reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import assert_fuzz_clean
from twin_pipeline.fuzz import mutate
from twin_pipeline.paths import Settings
from twin_pipeline.sources import load_readers
from twin_pipeline.sources.telemetry import inspect_file
from twin_pipeline.store import Store

TARGETS = ("dicom", "telemetry_ndjson", "telemetry_csv", "hl7v2")
FUZZ = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.mark.parametrize("target", TARGETS)
@FUZZ
@given(data=st.data())
def test_mutated_seed_records_never_crash_a_reader(
    seeds: dict[str, list[bytes]], work: Path, target: str, data: st.DataObject
) -> None:
    rnd = data.draw(st.randoms(use_true_random=False))
    batch = data.draw(st.integers(min_value=4, max_value=10))
    inputs = [(target, mutate(rnd.choice(seeds[target]), rnd)) for _ in range(batch)]
    assert_fuzz_clean(work, inputs)


@pytest.mark.parametrize("target", TARGETS)
@FUZZ
@given(blobs=st.lists(st.binary(max_size=2048), min_size=1, max_size=6))
def test_arbitrary_bytes_never_crash_a_reader(work: Path, target: str, blobs: list[bytes]) -> None:
    assert_fuzz_clean(work, [(target, b) for b in blobs])


@pytest.mark.parametrize("target", ("telemetry_ndjson", "telemetry_csv"))
@FUZZ
@given(data=st.data())
def test_telemetry_prefix_and_suffix_bytes_keep_the_good_lines(
    seeds: dict[str, list[bytes]], work: Path, target: str, data: st.DataObject
) -> None:
    """Arbitrary bytes spliced into one line of a valid file: the line may be lost, the other
    lines of the file are not (DuckDB refuses whole files over one bad byte)."""
    seed = seeds[target][0]
    lines = seed.split(b"\n")
    i = data.draw(st.integers(min_value=2 if target == "telemetry_csv" else 1, max_value=3))
    junk = data.draw(st.binary(min_size=1, max_size=16))
    lines[i - 1] = lines[i - 1][:5] + junk + lines[i - 1][5:]
    assert_fuzz_clean(work, [(target, b"\n".join(lines))])


def _load_one(
    home: Settings, landing: Path, rel: str, data: bytes
) -> tuple[int, int, list[tuple[str, str, str]]]:
    from twin_pipeline.ingest import ingest_files
    from twin_pipeline.sources import discover

    path = landing / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    readers = load_readers()
    found, _ = discover(landing, readers)
    with Store.open(home) as store:
        res = ingest_files(store, readers["telemetry"], [f for f in found if f.kind == "telemetry"])
        q = store.con.execute(
            "SELECT position, rule, reason FROM governance.quarantine ORDER BY position"
        ).fetchall()
    return res.stats.loaded, res.stats.quarantined, q


LINE = (
    b'{"device_id": "mon-1", "metric": "MDC_ECG_HEART_RATE", "value": 70, "unit": "/min", '
    b'"ts": "2024-03-05T10:00:0%dZ"}'
)


@pytest.mark.parametrize(
    ("name", "data", "loaded", "quarantined"),
    [
        # invalid UTF-8 in line 2 only: lines 1 and 3 are still loaded
        ("latin1_line", b"\n".join([LINE % 1, LINE % 2 + b" \xe9", LINE % 3]) + b"\n", 2, 1),
        # a lone continuation byte, CRLF line breaks (exact split path)
        ("crlf_bad_line", b"\r\n".join([LINE % 1, b"\x80" + LINE % 2, LINE % 3]), 2, 1),
        # a UTF-16 file: one record (the file), quarantined with the encoding named
        ("utf16_file", (LINE % 1 + b"\n").decode().encode("utf-16"), 0, 1),
    ],
)
def test_encoding_damage_quarantines_only_what_is_damaged(
    twin_home: Settings, tmp_path: Path, name: str, data: bytes, loaded: int, quarantined: int
) -> None:
    got_loaded, got_q, rows = _load_one(
        twin_home, tmp_path / "landing", f"telemetry/{name}.ndjson", data
    )
    assert (got_loaded, got_q) == (loaded, quarantined)
    assert all(rule == "bad_encoding" for _, rule, _ in rows)
    if name == "utf16_file":
        assert rows[0][0] == "file" and "UTF-16" in rows[0][2]
    else:
        assert rows[0][0] == "line:2" and "not UTF-8" in rows[0][2]


def test_inspect_file_finds_a_sequence_split_across_chunks(tmp_path: Path) -> None:
    p = tmp_path / "x.ndjson"
    p.write_bytes(b"a" * 7 + "é".encode() + b"b\n")  # 2-byte sequence across the 8-byte chunk
    assert inspect_file(p, chunk=8).utf8
    p.write_bytes(b"a" * 7 + "é".encode()[:1])  # truncated sequence at the end
    assert not inspect_file(p, chunk=8).utf8
