"""Record-level lineage of telemetry: a harmonized reading traces to its exact source line,
and a changed line (or file) is detected, although line hashes are computed only on trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.telemetry.helpers import ingest, query
from twin_pipeline.harmonize import telemetry as T
from twin_pipeline.lineage.trace import trace
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def _reading(value: float, minute: int) -> str:
    return json.dumps(
        {
            "device_id": "dev-1",
            "patient_id": "pat-1",
            "metric": "HR",
            "value": value,
            "unit": "bpm",
            "ts": f"2024-03-05T10:{minute:02d}:00Z",
        }
    )


@pytest.mark.parametrize(
    ("name", "body", "target"),
    [
        # (file, bytes, the line the traced reading sits on)
        ("a.ndjson", "\n".join(_reading(60 + i, i) for i in range(5)) + "\n", 5),
        ("crlf.jsonl", "\r\n".join(_reading(60 + i, i) for i in range(5)) + "\r\n", 5),
        ("blank.ndjson", _reading(60, 0) + "\n\n{bad\n" + _reading(64, 4) + "\n", 4),
        (
            "beds.csv",
            "device_id,patient_id,metric,value,unit,ts\n"
            + "".join(f"dev-1,pat-1,HR,{60 + i},bpm,2024-03-05T10:0{i}:00Z\n" for i in range(5)),
            6,
        ),
    ],
)
def test_trace_reaches_the_line_and_detects_a_change(
    twin_home: Settings, tmp_path: Path, name: str, body: str, target: int
) -> None:
    landing = tmp_path / "landing"
    path = landing / "telemetry" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(body.encode())
    ingest(twin_home, landing)
    with Store.open(twin_home) as store:
        T.harmonize_readings(store)
    ((key,),) = query(
        twin_home, "SELECT lineage_key FROM harmonized.telemetry_reading WHERE value = 64"
    )
    with Store.open(twin_home, read_only=True) as store:
        t = trace(store, "harmonized.telemetry_reading", key)
    src = t.source
    assert src is not None and src.path == f"telemetry/{name}"
    assert src.position == f"line:{target}"
    assert src.file_sha256_ok and src.lineage_key_ok and src.record_hash_ok
    line = path.read_bytes().split(b"\n")[target - 1].rstrip(b"\r")
    import hashlib

    assert src.record_hash == hashlib.md5(line, usedforsecurity=False).hexdigest()
    assert [s.table for s in t.steps] == ["harmonized.telemetry_reading", "raw.telemetry_reading"]
    from twin_pipeline.cli.lineage import render_trace

    text = render_trace(t)
    assert "record hash not stored (hashed when traced)" in text
    assert f"record at line:{target} matches record hash: yes" in text
    # The traced line is changed on disk: the trace no longer verifies.
    path.write_bytes(body.replace("64", "99").encode())
    with Store.open(twin_home, read_only=True) as store:
        changed = trace(store, "harmonized.telemetry_reading", key)
    assert changed.source is not None
    assert not changed.source.file_sha256_ok and changed.source.record_hash_ok is False
    assert not changed.verified
    assert f"record at line:{target} matches record hash: NO" in render_trace(changed)
