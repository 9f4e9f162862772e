"""A small synthetic hospital written straight into ``harmonized.*`` tables.

For tests and benchmarks of the twin layer only: it needs no landing files and no readers, and
its shapes follow the harmonized table contract. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from twin_pipeline.store import BATCH, Store, execute_over

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
UNITS = (("icu", "Intensive Care Unit", 6), ("ward", "Ward A (Medical)", 10))
SCANNERS = (("ct1", "CT", "SIEMENS"), ("ct2", "CT", "SIEMENS"), ("mr1", "MR", "GE"))
# Per-series acquisition minutes and arrivals per day by modality (hours 7-19 only).
SERIES_MINUTES = {"CT": (4, 8), "MR": (10, 20)}
STUDIES_PER_DAY = {"CT": 14.0, "MR": 5.0}
OPEN_HOURS = (7, 19)


@dataclass
class SyntheticHospital:
    patients: int
    encounters: int
    studies: int
    days: int
    first_day: datetime


def _put(store: Store, table: str, df: pd.DataFrame) -> None:
    execute_over(
        store.con, f"CREATE OR REPLACE TABLE harmonized.{table} AS SELECT * FROM {BATCH}", df
    )


def create_hospital(
    store: Store, patients: int = 50, *, seed: int = 1, days: int = 56, imaging_scale: float = 1.0
) -> SyntheticHospital:
    """Write a hospital of ``patients`` patients over ``days`` days into ``harmonized``.

    ``imaging_scale`` multiplies the imaging demand (and the scanners, so load stays similar).
    """
    rng = np.random.default_rng(seed)
    store.con.execute("CREATE SCHEMA IF NOT EXISTS harmonized")

    loc_rows: list[tuple[str, str, str, str | None]] = []
    beds: dict[str, list[str]] = {}
    for key, name, n in UNITS:
        loc_rows.append((f"loc-{key}", name, "wa", None))
        beds[key] = [f"loc-{key}-{i:02d}" for i in range(1, n + 1)]
        loc_rows += [
            (b, f"{name} Bed {i + 1:02d}", "bd", f"loc-{key}") for i, b in enumerate(beds[key])
        ]
    loc_rows.append(("loc-radiology", "Radiology", "wa", None))
    loc_rows += [
        (f"loc-radiology-{i}", f"Radiology Room {i}", "ro", "loc-radiology") for i in (1, 2, 3)
    ]
    loc = pd.DataFrame(loc_rows, columns=["location_id", "name", "physical_type", "part_of_id"])
    loc["type_code"] = pd.Series([None] * len(loc), dtype="string")
    loc["lineage_key"] = "lk-" + loc["location_id"]
    _put(store, "location", loc)

    pid = [f"p{i:06d}" for i in range(patients)]
    pat = pd.DataFrame(
        {
            "patient_id": pid,
            "mrn": [f"MRN{i:08d}" for i in range(patients)],
            "family_name": "Doe",
            "given_name": [f"Pat{i}" for i in range(patients)],
            "gender": rng.choice(["female", "male"], patients),
            "birth_date": [
                pd.Timestamp("1950-01-01") + pd.Timedelta(days=int(d))
                for d in rng.integers(0, 20000, patients)
            ],
            "deceased_at": pd.NaT,
            "research_consent": rng.random(patients) < 0.7,
            "deleted": False,
            "lineage_key": [f"lk-pat-{i}" for i in range(patients)],
        }
    )
    pat["birth_date"] = pat["birth_date"].dt.date
    _put(store, "patient", pat)

    # Encounters: ~2 per patient, spread over the window; inpatient stays in unit beds.
    n_enc = patients * 2
    enc_pat = rng.integers(0, patients, n_enc)
    start = T0 + pd.to_timedelta(rng.uniform(0, days * 24 * 60, n_enc), unit="min")
    cls = rng.choice(["AMB", "EMER", "IMP"], n_enc, p=[0.5, 0.25, 0.25])
    los_h = np.where(
        cls == "IMP", rng.lognormal(np.log(72), 0.5, n_enc), rng.uniform(0.5, 6, n_enc)
    )
    unit = rng.choice(["icu", "ward"], n_enc, p=[0.4, 0.6])
    loc_id = [
        rng.choice(beds[u]) if c == "IMP" else ("loc-radiology" if c == "AMB" else "loc-ward")
        for c, u in zip(cls, unit, strict=True)
    ]
    enc = pd.DataFrame(
        {
            "encounter_id": [f"e{i:07d}" for i in range(n_enc)],
            "patient_id": [pid[i] for i in enc_pat],
            "status": "finished",
            "class_code": cls,
            "type_code": pd.Series([None] * n_enc, dtype="string"),
            "type_display": pd.Series([None] * n_enc, dtype="string"),
            "period_start": start,
            "period_end": start + pd.to_timedelta(los_h, unit="h"),
            "location_id": loc_id,
            "lineage_key": [f"lk-enc-{i}" for i in range(n_enc)],
        }
    )
    _put(store, "encounter", enc)

    # Devices: scanners, plus one monitor per ICU bed attached to inpatients there.
    copies = max(1, round(imaging_scale))
    scanners = [
        (k if c == 0 else f"{k}x{c}", m, vendor) for c in range(copies) for k, m, vendor in SCANNERS
    ]
    dev_rows = [
        (
            f"dev-{k}",
            None,
            "loc-radiology-1",
            f"{m} scanner",
            m,
            vendor,
            f"{m}-model",
            f"SN-{k.upper()}",
        )
        for k, m, vendor in scanners
    ]
    icu_beds = beds["icu"]
    dev_rows += [
        (
            f"mon-{i:02d}",
            None,
            b,
            "Physiologic monitoring system",
            "706172005",
            "Philips",
            "IntelliVue",
            f"SN-MON{i:02d}",
        )
        for i, b in enumerate(icu_beds)
    ]
    dev = pd.DataFrame(
        dev_rows,
        columns=[
            "device_id",
            "patient_id",
            "location_id",
            "device_type",
            "device_type_code",
            "manufacturer",
            "model",
            "serial_number",
        ],
    )
    dev["lineage_key"] = "lk-" + dev["device_id"]
    _put(store, "device", dev)
    mon_of_bed = {b: f"mon-{i:02d}" for i, b in enumerate(icu_beds)}
    icu = enc[enc["location_id"].isin(icu_beds)]
    assoc = pd.DataFrame(
        {
            "device_id": [mon_of_bed[b] for b in icu["location_id"]],
            "patient_id": icu["patient_id"].to_numpy(),
            "valid_from": icu["period_start"].to_numpy(),
            "valid_to": icu["period_end"].to_numpy(),
            "lineage_key": [f"lk-assoc-{i}" for i in range(len(icu))],
        }
    )
    _put(store, "device_association", assoc)
    tel_rows: list[tuple[object, ...]] = []
    for (_, row), dev_id in zip(icu.iterrows(), assoc["device_id"], strict=True):
        t = row["period_start"]
        while t < row["period_end"] and len(tel_rows) < 200_000:
            tel_rows.append(
                (
                    dev_id,
                    row["patient_id"],
                    "MDC_ECG_HEART_RATE",
                    float(rng.normal(80, 8)),
                    "/min",
                    t,
                    False,
                )
            )
            tel_rows.append(
                (
                    dev_id,
                    row["patient_id"],
                    "MDC_PULS_OXIM_SAT_O2",
                    float(rng.normal(96, 1.5)),
                    "%",
                    t,
                    False,
                )
            )
            t = t + timedelta(hours=1)
    tel = pd.DataFrame(
        tel_rows,
        columns=["device_id", "patient_id", "metric", "value", "unit", "ts_utc", "implausible"],
    )
    tel["lineage_key"] = [f"lk-tel-{i}" for i in range(len(tel))]
    _put(store, "telemetry_reading", tel)
    obs = pd.DataFrame(
        {
            "observation_id": [f"o{i:07d}" for i in range(n_enc)],
            "patient_id": enc["patient_id"],
            "encounter_id": enc["encounter_id"],
            "category": "vital-signs",
            "code": "8867-4",
            "component_code": pd.Series([None] * n_enc, dtype="string"),
            "value": rng.normal(75, 10, n_enc),
            "unit": "/min",
            "effective_at": enc["period_start"] + pd.Timedelta(minutes=10),
            "lineage_key": [f"lk-obs-{i}" for i in range(n_enc)],
        }
    )
    _put(store, "observation", obs)

    # Imaging: Poisson arrivals per open hour, Mon-Fri at full rate and weekends at a third.
    st_rows: list[tuple[object, ...]] = []
    se_rows: list[tuple[object, ...]] = []
    scanners_of = {
        m: [f"SN-{k.upper()}" for k, mm, _ in scanners if mm == m] for m in STUDIES_PER_DAY
    }
    for d in range(days):
        day = T0 + timedelta(days=d)
        factor = 1.0 if day.weekday() < 5 else 1 / 3
        for modality, per_day in STUDIES_PER_DAY.items():
            hours = OPEN_HOURS[1] - OPEN_HOURS[0]
            n = rng.poisson(per_day * factor * imaging_scale)
            for off in np.sort(rng.uniform(0, hours * 60, n)):
                k = len(st_rows)
                started = day + timedelta(hours=OPEN_HOURS[0], minutes=float(off))
                e = int(rng.integers(0, n_enc))
                uid = f"1.2.826.0.1.{seed}.{k}"
                n_series = int(rng.integers(1, 4))
                lo, hi = SERIES_MINUTES[modality]
                serial = scanners_of[modality][k % len(scanners_of[modality])]
                t = started
                for s in range(n_series):
                    se_rows.append(
                        (
                            f"{uid}.{s + 1}",
                            uid,
                            enc.at[e, "patient_id"],
                            modality,
                            t.replace(tzinfo=None),
                            serial,
                            f"{modality}-ST",
                            f"lk-se-{k}-{s}",
                        )
                    )
                    t = t + timedelta(minutes=float(rng.uniform(lo, hi)))
                st_rows.append(
                    (
                        f"is{k:07d}",
                        enc.at[e, "patient_id"],
                        enc.at[e, "encounter_id"],
                        uid,
                        f"ACC{k:08d}",
                        started,
                        modality,
                        n_series,
                        n_series * 2,
                        f"{modality} study",
                        f"lk-st-{k}",
                    )
                )
    study = pd.DataFrame(
        st_rows,
        columns=[
            "study_id",
            "patient_id",
            "encounter_id",
            "study_instance_uid",
            "accession_number",
            "started",
            "modality",
            "number_of_series",
            "number_of_instances",
            "description",
            "lineage_key",
        ],
    )
    series = pd.DataFrame(
        se_rows,
        columns=[
            "series_instance_uid",
            "study_instance_uid",
            "patient_id",
            "modality",
            "series_datetime",
            "device_serial",
            "station_name",
            "lineage_key",
        ],
    )
    series["timezone_offset"] = "+0000"
    _put(store, "imaging_study", study)
    _put(store, "imaging_series", series)
    roles = pd.DataFrame(
        {
            "practitioner_role_id": ["pr1", "pr2", "pr3"],
            "code": ["radiographer", "radiographer", "nurse"],
            "display": ["Radiographer", "Radiographer", "Nurse"],
            "specialty_code": pd.Series([None] * 3, dtype="string"),
            "active": True,
            "location_id": ["loc-radiology", "loc-radiology", "loc-icu"],
            "lineage_key": ["lk-pr1", "lk-pr2", "lk-pr3"],
        }
    )
    _put(store, "practitioner_role", roles)
    return SyntheticHospital(patients, n_enc, len(study), days, T0)
