"""Telemetry NDJSON/CSV, HL7 v2 and WFDB readers: records, bad lines, conservation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.telemetry.helpers import ingest, query
from twin_pipeline.errors import ConfigError
from twin_pipeline.harmonize.telemetry_config import load_telemetry_spec
from twin_pipeline.paths import Settings


def _line(**kw: object) -> str:
    base: dict[str, object] = {
        "device_id": "dev-1",
        "patient_id": "pat-1",
        "metric": "MDC_ECG_HEART_RATE",
        "value": 72,
        "unit": "/min",
        "ts": "2024-03-05T10:00:00-05:00",
    }
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None})


BAD_CASES = [
    # (line, rule)
    ('{"device_id": "dev-1", "metric": ', "broken_record"),
    (_line(ts=None), "missing_required"),
    (_line(value="abc"), "bad_value"),
    (_line(ts="2024-13-45T25:61:00-05:00"), "bad_timestamp"),
    (_line(ts="03/05/2024 10:15 AM"), "bad_timestamp"),
    (_line(metric="MDC_VENDOR_XYZ_INDEX"), "unknown_metric"),
]


def test_ndjson_bad_lines_quarantined_with_line_numbers(
    twin_home: Settings, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    lines = [_line(ts=f"2024-03-05T10:0{i}:00-05:00") for i in range(3)]
    lines += [c[0] for c in BAD_CASES]
    lines.insert(2, "")  # a blank line is not a record but still counts as a line
    text = "\ufeff" + "\n".join(lines) + "\n"
    (landing / "telemetry" / "mon.ndjson").write_text(text, encoding="utf-8")
    res = ingest(twin_home, landing)["telemetry"]
    fs = res.stats.per_file["telemetry/mon.ndjson"]
    assert (fs.records_in, fs.loaded, fs.quarantined) == (9, 3, 6)
    got = query(
        twin_home,
        "SELECT position, rule FROM governance.quarantine WHERE stage = 'read' ORDER BY position",
    )
    expected = sorted((f"line:{i + 5}", rule) for i, (_, rule) in enumerate(BAD_CASES))
    assert sorted(got) == expected
    raw = query(twin_home, "SELECT position FROM raw.telemetry_reading ORDER BY position")
    assert [r[0] for r in raw] == ["line:1", "line:2", "line:4"]  # BOM line parsed


def test_crlf_file_keeps_true_line_numbers(twin_home: Settings, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    body = "\r\n".join([_line(), "{broken", _line(value=80)]) + "\r\n"
    (landing / "telemetry" / "crlf.jsonl").write_bytes(body.encode())
    ingest(twin_home, landing)
    assert query(twin_home, "SELECT position FROM governance.quarantine") == [("line:2",)]
    assert query(twin_home, "SELECT count(*) FROM raw.telemetry_reading") == [(2,)]


@pytest.mark.parametrize("quoted", [False, True])
def test_csv_reader(twin_home: Settings, tmp_path: Path, quoted: bool) -> None:
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    q = '"' if quoted else ""
    rows = [
        "ts,device_id,patient_id,metric,value,unit",  # header order differs from NDJSON
        f"2024-03-05T10:00:00Z,{q}dev-2{q},pat-2,HR,61,bpm",
        "2024-03-05T10:01:00Z,dev-2,pat-2,HR,notanumber,bpm",
        "2024-03-05T10:02:00Z,dev-2,pat-2,HR",
        "2024-03-05T10:03:00Z,dev-2,pat-2,SpO2,97,%",
    ]
    (landing / "telemetry" / "beds.csv").write_text("\n".join(rows) + "\n")
    res = ingest(twin_home, landing)["telemetry"]
    fs = res.stats.per_file["telemetry/beds.csv"]
    assert (fs.records_in, fs.loaded, fs.quarantined) == (4, 2, 2)
    assert sorted(query(twin_home, "SELECT position, rule FROM governance.quarantine")) == [
        ("line:3", "bad_value"),
        ("line:4", "broken_record"),
    ]
    got = query(twin_home, "SELECT device_id, metric, value, unit FROM raw.telemetry_reading")
    assert sorted(got) == [("dev-2", "HR", 61.0, "bpm"), ("dev-2", "SpO2", 97.0, "%")]


def test_lineage_key_matches_store_convention(twin_home: Settings, tmp_path: Path) -> None:
    """A loaded line's key is the file version's sha256 prefix and its position; its record
    hash is not stored (hashed lazily by a trace). A quarantined line gets the same kind of key,
    so raw and quarantine keys never collide."""
    from twin_pipeline.sources import sha256_file
    from twin_pipeline.store import position_lineage_key

    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    path = landing / "telemetry" / "one.ndjson"
    path.write_text(_line() + "\n{broken\n")
    ingest(twin_home, landing)
    ((lk, pos, rh),) = query(
        twin_home, "SELECT lineage_key, position, record_hash FROM raw.telemetry_reading"
    )
    assert (lk, pos, rh) == (position_lineage_key(sha256_file(path), "line:1"), "line:1", None)
    ((qk,),) = query(twin_home, "SELECT lineage_key FROM governance.quarantine")
    assert qk == position_lineage_key(sha256_file(path), "line:2")


def test_hl7_real_samples_every_message_registered(
    shared_data: Path, twin_home: Settings, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    shutil.copytree(shared_data / "hl7v2", landing / "hl7v2")
    res = ingest(twin_home, landing)["hl7v2"]
    assert res.files_new == 70
    for rel, fs in res.stats.per_file.items():
        assert fs.balanced(), rel
        assert fs.records_in >= 1, rel
    types = dict(query(twin_home, "SELECT message_type, count(*) FROM raw.hl7_message GROUP BY 1"))
    assert types["ADT"] > 20 and types["ORU"] == 2 and types["SIU"] >= 5
    # The two real ORU^R01 files are lab results: numerics counted, none is a device metric.
    ((n_num, n_read),) = query(
        twin_home,
        "SELECT sum(n_obx_numeric), sum(n_readings) FROM raw.hl7_message WHERE message_type = 'ORU'",
    )
    assert n_num >= 2 and n_read == 0
    # Files with a byte-order mark and \n separators still parse into several segments.
    ((segs,),) = query(
        twin_home,
        "SELECT min(n_segments) FROM raw.hl7_message WHERE source_file = 'hl7v2/LAB-ORU-2.hl7'",
    )
    assert segs > 5


MONITOR_ORU = (
    "\ufeffMSH|^~\\&|MONITOR|ICU-EAST|TWIN|LRMC|20240305101500-0500||ORU^R01|MSG0001|P|2.6\n"
    "PID|1||MRN000123^^^LRMC^MR||DOE^JANE\n"
    "OBR|1|||MONITOR^Vitals|||20240305101500-0500\n"
    "OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||97|%^%^UCUM|||||F|||20240305101500-0500||||BED12-MX800\n"
    "OBX|2|NM|8867-4^Heart rate^LN||88|/min^/min^UCUM|||||F|||20240305101500-0500||||BED12-MX800\n"
    "OBX|3|NM|1554-5^GLUCOSE^LN||182|mg/dL|||||F\n"
    "OBX|4|ST|8867-4^Heart rate^LN||n/a|||||F\n"
)


def test_hl7_monitor_oru_becomes_readings(twin_home: Settings, tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "feed.hl7").write_text(MONITOR_ORU + "MSH|garbage\n", encoding="utf-8")
    res = ingest(twin_home, landing)["hl7v2"]
    fs = res.stats.per_file["feed.hl7"]
    assert fs.records_in == 2 and fs.balanced()
    rows = query(
        twin_home,
        "SELECT device_id, patient_mrn, metric, value, unit, ts FROM raw.telemetry_reading "
        "ORDER BY metric",
    )
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("BED12-MX800", "MRN000123", "150456", 97.0),
        ("BED12-MX800", "MRN000123", "8867-4", 88.0),
    ]
    assert rows[0][5].isoformat().startswith("2024-03-05T15:15:00")  # -05:00 → UTC


def test_wfdb_real_records(shared_data: Path, twin_home: Settings, tmp_path: Path) -> None:
    import numpy as np
    import wfdb

    landing = tmp_path / "landing"
    shutil.copytree(shared_data / "wfdb", landing / "wfdb")
    res = ingest(twin_home, landing)["wfdb"]
    per = res.stats.per_file
    for part in ("wfdb/100.dat", "wfdb/100.atr", "wfdb/multi-segment/s00001/3975656n.dat"):
        assert per[part].records_in == 0  # claimed, counted with its record
    rec = wfdb.rdrecord(str(shared_data / "wfdb/multi-segment/s00001/s00001-2896-10-10-00-31n"))
    non_nan = int((~np.isnan(rec.p_signal)).sum())
    hea = "wfdb/multi-segment/s00001/s00001-2896-10-10-00-31n.hea"
    ((n,),) = query(
        twin_home, "SELECT count(*) FROM raw.telemetry_reading WHERE source_file = ?", [hea]
    )
    assert n == non_nan == per[hea].loaded
    ((waves, anns),) = query(
        twin_home,
        "SELECT (SELECT count(*) FROM raw.wfdb_waveform_minute), "
        "(SELECT count(*) FROM raw.wfdb_annotation)",
    )
    assert waves == 2 * 31  # 650,000 samples at 360 Hz: 31 minutes, 2 leads
    assert anns == len(wfdb.rdann(str(shared_data / "wfdb/100"), "atr").sample)
    assert per["wfdb/100.hea"].records_in == waves + anns


def test_invalid_telemetry_spec_is_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("version: 1\ndefault_timezone: Mars/Olympus\n")
    with pytest.raises(ConfigError):
        load_telemetry_spec(bad)
    spec = load_telemetry_spec()
    assert spec.alias_map()["HR"] == "MDC_ECG_HEART_RATE"
    assert spec.alias_map()["8867-4"] == "MDC_ECG_HEART_RATE"


def test_wfdb_parts_orphans_and_late_parts(
    shared_data: Path, twin_home: Settings, tmp_path: Path
) -> None:
    landing = tmp_path / "landing"
    (landing / "wfdb").mkdir(parents=True)
    (landing / "wfdb" / "stray.dat").write_bytes(b"\x00\x01" * 10)
    shutil.copy(shared_data / "wfdb" / "100.hea", landing / "wfdb" / "100.hea")
    first = ingest(twin_home, landing)["wfdb"].stats.per_file
    assert (first["wfdb/stray.dat"].records_in, first["wfdb/stray.dat"].quarantined) == (1, 1)
    assert first["wfdb/100.hea"].quarantined == 1  # its signal file has not arrived yet
    rules = dict(query(twin_home, "SELECT source_file, rule FROM governance.quarantine"))
    assert rules == {"wfdb/stray.dat": "orphan_part", "wfdb/100.hea": "unreadable_record"}
    # The parts arrive: the record is read again, whole.
    for ext in ("dat", "atr"):
        shutil.copy(shared_data / "wfdb" / f"100.{ext}", landing / "wfdb" / f"100.{ext}")
    second = ingest(twin_home, landing)["wfdb"].stats.per_file
    assert second["wfdb/100.hea"].loaded == 62 + 2274 and second["wfdb/100.hea"].balanced()
    assert dict(query(twin_home, "SELECT source_file, rule FROM governance.quarantine")) == {
        "wfdb/stray.dat": "orphan_part"
    }
    (n,) = query(
        twin_home,
        "SELECT count(*) FROM raw.wfdb_annotation WHERE source_file = 'wfdb/100.hea'",
    )
    assert n == (2274,)


# Every way a file is split into lines: plain UTF-8 (parsed straight from the file), a byte-order
# mark, CRLF line breaks (exact split), a line that is not UTF-8 (Python split).
LAYOUTS = {
    "plain": (b"", b"\n", None),
    "bom": (b"\xef\xbb\xbf", b"\n", None),
    "crlf": (b"", b"\r\n", None),
    "latin1_line": (b"", b"\n", b'{"device_id": "caf\xe9"}'),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_split_path_quarantines_the_same_lines(
    twin_home: Settings, tmp_path: Path, layout: str
) -> None:
    head, eol, extra = LAYOUTS[layout]
    good = [_line(ts=f"2024-03-05T10:0{i}:00-05:00") for i in range(3)]
    lines = [good[0], "", BAD_CASES[0][0], good[1], *(c[0] for c in BAD_CASES[1:]), good[2]]
    body = [ln.encode() for ln in lines] + ([extra] if extra else [])
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    (landing / "telemetry" / "f.ndjson").write_bytes(head + eol.join(body) + eol)
    fs = ingest(twin_home, landing)["telemetry"].stats.per_file["telemetry/f.ndjson"]
    n_bad = len(BAD_CASES) + (1 if extra else 0)
    assert (fs.records_in, fs.loaded, fs.quarantined) == (3 + n_bad, 3, n_bad)
    got = query(twin_home, "SELECT position, rule FROM governance.quarantine ORDER BY position")
    expected = [("line:3", "broken_record")]
    expected += [(f"line:{i + 5}", rule) for i, (_, rule) in enumerate(BAD_CASES[1:])]
    if extra:
        expected.append((f"line:{len(lines) + 1}", "bad_encoding"))
    assert sorted(got) == sorted(expected)
    raw = query(twin_home, "SELECT position FROM raw.telemetry_reading")
    assert sorted(r[0] for r in raw) == sorted(["line:1", "line:4", f"line:{len(lines)}"])
    payloads = dict(query(twin_home, "SELECT position, payload FROM governance.quarantine"))
    assert payloads["line:3"] == BAD_CASES[0][0]


def test_csv_header_after_blank_lines(twin_home: Settings, tmp_path: Path) -> None:
    """The header is the first non-blank line, wherever it is; positions stay true."""
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    text = "\n  \nunit,value,metric,ts,device_id\nbpm,61,HR,2024-03-05T10:00:00Z,dev-3\nbpm,x,HR,2024-03-05T10:01:00Z,dev-3\n"
    (landing / "telemetry" / "late_header.csv").write_text(text)
    fs = ingest(twin_home, landing)["telemetry"].stats.per_file["telemetry/late_header.csv"]
    assert (fs.records_in, fs.loaded, fs.quarantined) == (2, 1, 1)
    assert query(twin_home, "SELECT position, rule FROM governance.quarantine") == [
        ("line:5", "bad_value")
    ]
    assert query(twin_home, "SELECT position, device_id, value FROM raw.telemetry_reading") == [
        ("line:4", "dev-3", 61.0)
    ]


def test_large_file_line_numbers_survive_parallel_reads(
    twin_home: Settings, tmp_path: Path
) -> None:
    """Line numbers of a plain JSON-lines file come from the insertion order of the checked
    rows: on a file DuckDB reads in parallel chunks, each row must still sit at its line."""
    landing = tmp_path / "landing"
    (landing / "telemetry").mkdir(parents=True)
    n = 400_000  # ~37 MB: several read buffers and row groups
    lines = (
        f'{{"device_id": "d{i % 97}", "metric": "HR", "value": {i}, "unit": "bpm", '
        f'"ts": "2024-03-05T10:{i // 60 % 60:02d}:{i % 60:02d}Z"}}\n'
        for i in range(1, n + 1)
    )
    (landing / "telemetry" / "big.ndjson").write_text("".join(lines))
    fs = ingest(twin_home, landing)["telemetry"].stats.per_file["telemetry/big.ndjson"]
    assert (fs.records_in, fs.loaded) == (n, n)
    ((rows, misplaced),) = query(
        twin_home,
        "SELECT count(*), count(*) FILTER (position <> 'line:' || CAST(value AS BIGINT) "
        "OR NOT ends_with(lineage_key, '/' || position)) FROM raw.telemetry_reading",
    )
    assert (rows, misplaced) == (n, 0)


def _mixed_landing(root: Path) -> Path:
    """Clean and dirty JSON-lines and CSV files side by side (one batch of several files)."""
    tel = root / "telemetry"
    tel.mkdir(parents=True)
    clean = [_line(device_id=f"d{i}", ts=f"2024-03-05T10:{i:02d}:00-05:00") for i in range(40)]
    (tel / "a_clean.ndjson").write_text("\n".join(clean) + "\n")
    (tel / "b_clean_no_final_newline.ndjson").write_text("\n".join(clean[:7]))
    padded = _line(device_id="  d-pad ", metric=" MDC_ECG_HEART_RATE", unit="/min ")
    (tel / "c_padded_fields.ndjson").write_text(padded + "\n" + clean[0] + "\n")
    (tel / "d_trailing_garbage.ndjson").write_text(clean[1] + "\n" + clean[2] + " xyz\n")
    (tel / "e_blank_line.ndjson").write_text(clean[3] + "\n\n" + clean[4] + "\n")
    (tel / "f_unknown_metric.ndjson").write_text(
        clean[5] + "\n" + _line(metric="MDC_VENDOR_XYZ") + "\n"
    )
    (tel / "g_null_line.ndjson").write_text("null\n" + clean[6] + "\n")
    (tel / "h_string_value.ndjson").write_text(_line(value="72.5") + "\n")
    (tel / "i_clean.csv").write_text(
        "ts,device_id,metric,value,unit\n2024-03-05T10:00:00Z,dev-c,HR,61,bpm\n"
        '2024-03-05T10:01:00Z,"dev,q",HR,62,bpm\n'
    )
    (tel / "j_short_row.csv").write_text(
        "ts,device_id,metric,value,unit\n2024-03-05T10:00:00Z,dev-c,HR,61\n"
        "2024-03-05T10:02:00Z,dev-c,HR,63,bpm\n"
    )
    return root


def _raw_and_quarantine(settings: Settings) -> tuple[list[tuple], list[tuple]]:
    raw = query(
        settings,
        "SELECT source_file, position, lineage_key, device_id, patient_id, metric, value, unit, "
        "ts FROM raw.telemetry_reading ORDER BY source_file, line",
    )
    quarantined = query(
        settings,
        "SELECT source_file, position, rule, payload, lineage_key FROM governance.quarantine "
        "ORDER BY source_file, position",
    )
    return raw, quarantined


def test_batch_read_equals_line_by_line(
    twin_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch path (several files in one parse) and the line-by-line path load the same
    rows with the same line numbers and keys, and quarantine the same lines."""
    from twin_pipeline.sources import telemetry as T

    landing = _mixed_landing(tmp_path / "landing")
    batched = ingest(twin_home, landing)["telemetry"].stats.per_file
    got = _raw_and_quarantine(twin_home)
    other = Settings.from_env(tmp_path / "home_lines").ensure()
    shutil.copytree(twin_home.keys_dir, other.keys_dir, dirs_exist_ok=True)
    monkeypatch.setattr(T, "BATCH_READ", False)
    by_line = ingest(other, landing)["telemetry"].stats.per_file
    assert got == _raw_and_quarantine(other)
    for rel, fs in batched.items():
        ref = by_line[rel]
        assert (fs.records_in, fs.loaded, fs.quarantined) == (
            ref.records_in,
            ref.loaded,
            ref.quarantined,
        ), rel
        assert fs.balanced(), rel
    raw, quarantined = got
    assert len(raw) == 40 + 7 + 2 + 1 + 2 + 1 + 1 + 1 + 2 + 1
    assert {(q[0].split("/")[1], q[1], q[2]) for q in quarantined} == {
        ("d_trailing_garbage.ndjson", "line:2", "broken_record"),
        ("f_unknown_metric.ndjson", "line:2", "unknown_metric"),
        ("g_null_line.ndjson", "line:1", "broken_record"),
        ("j_short_row.csv", "line:2", "broken_record"),
    }
    padded = next(r for r in raw if r[0].endswith("c_padded_fields.ndjson"))
    assert (padded[1], padded[3], padded[5], padded[7]) == (
        "line:1",
        "d-pad",
        "MDC_ECG_HEART_RATE",
        "/min",
    )
    assert [r[1] for r in raw if r[0].endswith("a_clean.ndjson")] == [
        f"line:{i}" for i in range(1, 41)
    ]
    assert [r[3] for r in raw if r[0].endswith("i_clean.csv")] == ["dev-c", "dev,q"]
