"""Telemetry harmonization: vocabulary, units, UTC, duplicates, flags, late data, aggregates,
gaps, incremental runs and conservation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.telemetry.helpers import ingest, query
from twin_pipeline.harmonize import telemetry as T
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def _w(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _r(metric: str, value: object, unit: str, ts: str, dev: str = "dev-1") -> dict[str, object]:
    return {
        "device_id": dev,
        "patient_id": "pat-1",
        "metric": metric,
        "value": value,
        "unit": unit,
        "ts": ts,
    }


def _harmonize(settings: Settings) -> T.TelemetryResult:
    with Store.open(settings) as store:
        res = T.harmonize_readings(store)
        T.build_minutes(store)
        T.build_gaps(store)
    return res


MAPPING = [
    # (metric as sent, value, unit as sent) -> (canonical metric, value, unit)
    (("HR", 72, "bpm"), ("MDC_ECG_HEART_RATE", 72.0, "/min")),
    (("8867-4", 72, "/min"), ("MDC_ECG_HEART_RATE", 72.0, "/min")),
    (("SpO2", 0.97, "1"), ("MDC_PULS_OXIM_SAT_O2", 97.0, "%")),
    (("150456", 96, "%"), ("MDC_PULS_OXIM_SAT_O2", 96.0, "%")),
    (("MDC_TEMP_BODY", 98.6, "[degF]"), ("MDC_TEMP_BODY", 37.0, "Cel")),
    (("NBPSys", 16, "kPa"), ("MDC_PRESS_BLD_NONINV_SYS", 120.0, "mm[Hg]")),
    (("RESP", 14, "pm"), ("MDC_RESP_RATE", 14.0, "/min")),
]


def test_codes_and_units_map_to_one_vocabulary(twin_home: Settings, tmp_path: Path) -> None:
    rows = [
        _r(m, v, u, f"2024-03-05T10:{i:02d}:00-05:00") for i, ((m, v, u), _) in enumerate(MAPPING)
    ]
    rows.append(_r("HR", 70, "mg/dL", "2024-03-05T11:00:00-05:00"))  # unconvertible unit
    _w(tmp_path / "l" / "telemetry" / "a.ndjson", rows)
    ingest(twin_home, tmp_path / "l")
    res = _harmonize(twin_home)
    assert (res.rows_in, res.harmonized, res.quarantined) == (len(MAPPING) + 1, len(MAPPING), 1)
    got = query(
        twin_home,
        "SELECT metric, round(value, 1), unit FROM harmonized.telemetry_reading ORDER BY ts_utc",
    )
    assert got == [exp for _, exp in MAPPING]
    assert query(twin_home, "SELECT rule FROM governance.quarantine WHERE stage='harmonize'") == [
        ("bad_unit",)
    ]


def test_utc_duplicates_implausible(twin_home: Settings, tmp_path: Path) -> None:
    rows = [
        _r("HR", 80, "/min", "2024-03-05T10:00:00-05:00"),
        _r("HR", 80, "/min", "2024-03-05T15:00:00Z"),  # same instant, same value: duplicate
        _r("HR", 81, "/min", "2024-03-05T10:00:00"),  # no offset: America/New_York (EST)
        _r("HR", 900, "/min", "2024-03-05T10:01:00-05:00"),  # implausible, kept
    ]
    _w(tmp_path / "l" / "telemetry" / "a.ndjson", rows)
    ingest(twin_home, tmp_path / "l")
    res = _harmonize(twin_home)
    assert (res.harmonized, res.duplicates, res.implausible) == (3, 1, 1)
    got = query(
        twin_home,
        "SELECT strftime(ts_utc AT TIME ZONE 'UTC', '%H:%M'), value, implausible "
        "FROM harmonized.telemetry_reading ORDER BY ts_utc, value",
    )
    assert got == [("15:00", 80.0, False), ("15:00", 81.0, False), ("15:01", 900.0, True)]
    minute = query(
        twin_home,
        "SELECT n, n_implausible, min, max, mean FROM harmonized.telemetry_minute ORDER BY minute",
    )
    assert minute == [(2, 0, 80.0, 81.0, 80.5), (1, 1, None, None, None)]


def test_incremental_late_data_gaps_and_conservation(twin_home: Settings, tmp_path: Path) -> None:
    land = tmp_path / "l"
    first = [_r("HR", 70 + i, "/min", f"2024-03-05T10:{i:02d}:00Z") for i in range(5)]
    first += [_r("HR", 75, "/min", "2024-03-05T10:30:00Z")]  # 26 min silence: a gap
    _w(land / "telemetry" / "a.ndjson", first)
    ingest(twin_home, land)
    r1 = _harmonize(twin_home)
    assert r1.files_processed == 1 and r1.late == 0
    gaps = query(twin_home, "SELECT device_id, gap_seconds FROM harmonized.device_gap")
    assert gaps == [("dev-1", 26 * 60.0)]
    # A later file fills the gap (out of order, late) and repeats one old reading.
    second = [_r("HR", 90, "/min", f"2024-03-05T10:{i:02d}:00Z") for i in (8, 13, 18, 23, 27)]
    second.append(_r("HR", 70, "/min", "2024-03-05T10:00:00Z"))
    _w(land / "telemetry" / "b.ndjson", second)
    ingest(twin_home, land)
    r2 = _harmonize(twin_home)
    assert r2.files_processed == 1, "only the new file is read"
    assert (r2.harmonized, r2.duplicates, r2.late) == (5, 1, 5)
    assert query(twin_home, "SELECT count(*) FROM harmonized.device_gap") == [(0,)]
    assert query(
        twin_home,
        "SELECT count(*) FROM harmonized.telemetry_minute WHERE metric = 'MDC_ECG_HEART_RATE'",
    ) == [(11,)]
    # Incremental result equals a full rebuild.
    with Store.open(twin_home) as store:
        h_inc = {t: store.content_hash(t) for t in (T.READING, T.MINUTE, T.GAP)}
        T.harmonize_readings(store, full=True)
        T.build_minutes(store)
        T.build_gaps(store)
        assert {t: store.content_hash(t) for t in (T.READING, T.MINUTE, T.GAP)} == h_inc
    # Conservation per source file: raw rows = harmonized + quarantined at harmonize.
    rows = query(
        twin_home,
        """
        SELECT r.source_file, count(*),
               (SELECT count(*) FROM harmonized.telemetry_reading h WHERE h.source_file = r.source_file),
               (SELECT count(*) FROM governance.quarantine q WHERE q.stage = 'harmonize'
                AND q.source_file = r.source_file)
        FROM raw.telemetry_reading r GROUP BY 1
        """,
    )
    for _, n_raw, n_h, n_q in rows:
        assert n_raw == n_h + n_q


@pytest.mark.parametrize("changed", [True])
def test_changed_file_replaces_its_readings(
    twin_home: Settings, tmp_path: Path, changed: bool
) -> None:
    land = tmp_path / "l"
    _w(land / "telemetry" / "a.ndjson", [_r("HR", 70, "/min", "2024-03-05T10:00:00Z")])
    ingest(twin_home, land)
    _harmonize(twin_home)
    _w(land / "telemetry" / "a.ndjson", [_r("HR", 71, "/min", "2024-03-05T10:00:00Z")])
    ingest(twin_home, land)
    _harmonize(twin_home)
    assert query(twin_home, "SELECT value FROM harmonized.telemetry_reading") == [(71.0,)]
    assert query(twin_home, "SELECT mean FROM harmonized.telemetry_minute") == [(71.0,)]


def test_wfdb_numerics_harmonize(shared_data: Path, twin_home: Settings, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(shared_data / "wfdb" / "multi-segment", tmp_path / "l" / "wfdb")
    ingest(twin_home, tmp_path / "l")
    res = _harmonize(twin_home)
    assert res.quarantined == res.duplicates  # every WFDB signal name maps to the vocabulary
    metrics = {
        r[0] for r in query(twin_home, "SELECT DISTINCT metric FROM harmonized.telemetry_reading")
    }
    assert {
        "MDC_ECG_HEART_RATE",
        "MDC_PRESS_BLD_ART_SYS",
        "MDC_PULS_OXIM_SAT_O2",
        "MDC_RESP_RATE",
    } <= metrics
    # MIMIC writes 0 for "no value": kept and flagged implausible, not dropped.
    assert res.implausible > 0
    ((n,),) = query(twin_home, "SELECT count(*) FROM harmonized.telemetry_reading")
    assert n == res.harmonized


def test_patient_from_feed_mrn_or_device_association(twin_home: Settings, tmp_path: Path) -> None:
    """A reading's patient: as sent; else by MRN (HL7 PID-3); else the patient the device was
    associated with at that instant; else none."""
    from tests.telemetry.test_telemetry_readers import MONITOR_ORU

    land = tmp_path / "l"
    rows = [
        _r("HR", 70, "/min", "2024-03-05T10:00:00Z", dev="dev-a"),  # patient as sent
        {**_r("HR", 71, "/min", "2024-03-05T10:01:00Z", dev="dev-b"), "patient_id": None},
        {**_r("HR", 72, "/min", "2024-01-01T10:00:00Z", dev="dev-b"), "patient_id": None},
    ]
    _w(land / "telemetry" / "a.ndjson", rows)
    (land / "feed.hl7").write_text(MONITOR_ORU, encoding="utf-8")  # MRN000123, no patient id
    ingest(twin_home, land)
    with Store.open(twin_home) as store:
        store.con.execute(
            "CREATE TABLE harmonized.patient AS SELECT 'pat-mrn' AS patient_id, 'MRN000123' AS mrn"
        )
        store.con.execute(
            "CREATE TABLE harmonized.device_association AS SELECT 'dev-b' AS device_id, "
            "'pat-assoc' AS patient_id, TIMESTAMPTZ '2024-03-01 00:00:00+00' AS valid_from, "
            "NULL::TIMESTAMPTZ AS valid_to"
        )
    res = _harmonize(twin_home)
    assert res.harmonized == 5
    got = query(
        twin_home,
        "SELECT device_id, value, patient_id FROM harmonized.telemetry_reading "
        "ORDER BY device_id, value",
    )
    assert got == [
        ("BED12-MX800", 88.0, "pat-mrn"),
        ("BED12-MX800", 97.0, "pat-mrn"),
        ("dev-a", 70.0, "pat-1"),
        ("dev-b", 71.0, "pat-assoc"),
        ("dev-b", 72.0, None),  # before the association began
    ]
