"""Orchestration: stream a whole sample hospital to disk and write its manifest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from twin_pipeline.generate import vocab as V
from twin_pipeline.generate.common import (
    GeneratorError,
    Identifiers,
    JsonDict,
    LineWriter,
    dumps,
    fhir_dt,
    new_id,
    reference_datetime,
)
from twin_pipeline.generate.dirty import DirtPlanter
from twin_pipeline.generate.ehr import Hospital, PatientBuilder, PatientOutput
from twin_pipeline.generate.pacs import render_instance
from twin_pipeline.generate.telemetry import BAD_TIMESTAMPS, IMPOSSIBLE, readings

ProgressFn = Callable[[str, int, int], None]

CHUNK = 10  # patients per bundle file / bulk chunk
TELEMETRY_SHARD = 1000  # patients per telemetry NDJSON file
OUTPUT_ENTRIES = ("ehr", "pacs", "telemetry", "labels", "manifest.json")

_IMPOSSIBLE_OBS: dict[str, tuple[float, str, str]] = {
    V.WEIGHT.code: (-12.5, "kg", "kg"),
    V.HEIGHT.code: (-40.0, "cm", "cm"),
    V.TEMP.code: (80.0, "Cel", "C"),
    V.HR.code: (900, "/min", "beats/minute"),
    V.RR.code: (250, "/min", "breaths/minute"),
    V.SPO2.code: (140, "%", "%"),
    V.GLUCOSE.code: (-20, "mg/dL", "mg/dL"),
    V.CREAT.code: (-1.5, "mg/dL", "mg/dL"),
}
_BAD_EFFECTIVE = (
    "2024-13-45T10:15:00-05:00",
    "2024-02-30T25:61:00-05:00",
    "03/05/2024 10:15",
    "yesterday",
)


@dataclass
class GenerationReport:
    """Counts of what was generated (the manifest's ``counts`` plus run parameters)."""

    out_dir: str
    seed: int
    patients: int
    dirty_rate: float
    resources: dict[str, int] = field(default_factory=dict)
    dicom_files: int = 0
    telemetry_readings: int = 0
    notes: int = 0
    bytes: dict[str, int] = field(default_factory=dict)
    dirty_records: int = 0

    @property
    def total_resources(self) -> int:
        """All FHIR resources written."""
        return sum(self.resources.values())

    def counts(self) -> dict[str, Any]:
        """The manifest's ``counts`` object."""
        return {
            "resources": dict(sorted(self.resources.items())),
            "dicom_files": self.dicom_files,
            "telemetry_readings": self.telemetry_readings,
            "notes": self.notes,
            "bytes": dict(self.bytes),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "out_dir": self.out_dir,
            "seed": self.seed,
            "patients": self.patients,
            "dirty_rate": self.dirty_rate,
            "counts": self.counts(),
            "total_resources": self.total_resources,
            "dirty_records": self.dirty_records,
        }


class EhrSink:
    """Writes resources either into the current Bundle or into Bulk NDJSON files."""

    def __init__(
        self, root: Path, seed: int, ref_dt: str, planter: DirtPlanter, counts: dict[str, int]
    ) -> None:
        self.root = root
        self.seed = seed
        self.ref_dt = ref_dt
        self.planter = planter
        self.counts = counts
        self.bulk: dict[str, LineWriter] = {}
        self.entries: list[JsonDict] | None = None
        self.bundle_no = 0
        self.bundle_broken = False
        self.urn_refs = False
        self.transaction = False

    # -- mode ---------------------------------------------------------------------------

    def begin_bundle(self) -> None:
        """Start collecting a new Bundle; decides its type and reference style."""
        k = self.bundle_no
        self.entries = []
        self.transaction = k % 2 == 1
        self.urn_refs = (k // 2) % 2 == 0
        self.bundle_broken = self.planter.chance(self.planter.rate / 3)

    def end_bundle(self) -> None:
        """Write the collected Bundle file."""
        assert self.entries is not None
        k = self.bundle_no
        rng = Random(f"{self.seed}:bundle:{k}")
        bundle = {
            "resourceType": "Bundle",
            "id": new_id(rng),
            "meta": {"lastUpdated": self.ref_dt},
            "type": "transaction" if self.transaction else "collection",
            "timestamp": self.ref_dt,
            "entry": self.entries,
        }
        rel = f"ehr/bundles/bundle-{k:05d}.json"
        text = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False)
        if self.bundle_broken:
            text = text[: int(len(text) * 0.6)]
            self.planter.record("broken_json", rel, "file", "bundle truncated mid-document")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8", newline="\n")
        self.entries = None
        self.bundle_no += 1

    def ref(self, rtype: str, rid: str) -> str:
        """Reference string to a resource in the same bundle/bulk export."""
        if self.entries is not None and self.urn_refs:
            return f"urn:uuid:{rid}"
        return f"{rtype}/{rid}"

    # -- writing ------------------------------------------------------------------------

    def add(self, res: JsonDict, dirty: bool = True) -> None:
        """Write one resource, maybe planting a defect in or around it."""
        kind = self.planter.choose(self._kinds(res)) if dirty else None
        rtype = res["resourceType"]
        if kind in (
            "missing_required",
            "unknown_code",
            "bad_unit",
            "impossible_value",
            "bad_timestamp",
        ):
            detail = corrupt(res, kind, self.planter.rng)
            self._emit(res, rtype, kind, detail)
            return
        if kind == "unknown_resource_type":
            ship = {
                "resourceType": "Spaceship",
                "id": new_id(self.planter.rng),
                "name": "USS Hypothetical",
                "subject": res.get("subject", {"reference": f"{rtype}/{res['id']}"}),
            }
            self._emit(
                ship, "Spaceship", kind, "resourceType 'Spaceship' is not FHIR", file_type=rtype
            )
            self._emit(res, rtype, None, "")
            return
        self._emit(res, rtype, kind if kind == "broken_json" else None, "NDJSON line cut in half")
        if kind == "duplicate":
            self._emit(res, rtype, "duplicate", f"exact duplicate of {rtype}/{res['id']}")

    def _kinds(self, res: JsonDict) -> tuple[str, ...]:
        if self.entries is not None and self.bundle_broken:
            return ()
        rtype = res["resourceType"]
        kinds: tuple[str, ...] = ("duplicate", "unknown_resource_type")
        if rtype == "Observation":
            kinds = ("missing_required", "unknown_code", "bad_timestamp", *kinds)
            if "valueQuantity" in res:
                kinds = ("bad_unit", "impossible_value", *kinds)
        elif rtype == "Patient":
            kinds = ("missing_required", *kinds)
        if self.entries is None:
            kinds = (*kinds, "broken_json")
        return kinds

    def _emit(
        self, res: JsonDict, rtype: str, kind: str | None, detail: str, file_type: str | None = None
    ) -> None:
        self.counts[rtype] = self.counts.get(rtype, 0) + 1
        if self.entries is not None:
            entry: JsonDict = {"fullUrl": f"urn:uuid:{res['id']}", "resource": res}
            if self.transaction:
                entry["request"] = (
                    {"method": "POST", "url": rtype}
                    if self.urn_refs
                    else {"method": "PUT", "url": f"{rtype}/{res['id']}"}
                )
            self.entries.append(entry)
            if kind is not None:
                self.planter.record(
                    kind,
                    f"ehr/bundles/bundle-{self.bundle_no:05d}.json",
                    f"entry:{len(self.entries) - 1}",
                    detail,
                )
            return
        ftype = file_type or rtype
        writer = self.bulk.get(ftype)
        if writer is None:
            writer = self.bulk[ftype] = LineWriter(self.root / "ehr" / "bulk" / f"{ftype}.ndjson")
        line = dumps(res)
        if kind == "broken_json":
            line = line[: len(line) // 2]
        n = writer.write(line)
        if kind is not None:
            self.planter.record(kind, f"ehr/bulk/{ftype}.ndjson", f"line:{n}", detail)

    def close(self) -> None:
        """Close bulk files."""
        for w in self.bulk.values():
            w.close()


def corrupt(res: JsonDict, kind: str, rng: Random) -> str:
    """Mutate ``res`` in place to carry defect ``kind``; return a description."""
    if kind == "missing_required":
        if res["resourceType"] == "Patient":
            res["gender"] = "M"
            return "Patient.gender 'M' is not an administrative-gender code"
        res.pop("status", None)
        res.pop("code", None)
        return "Observation without status and code"
    if kind == "unknown_code":
        code = rng.choice(V.UNKNOWN_LOINC)
        res["code"] = {
            "coding": [{"system": V.LOINC, "code": code, "display": "Unmapped local test"}],
            "text": "Unmapped local test",
        }
        return f"LOINC {code} not in vocabulary"
    code = res["code"]["coding"][-1]["code"]
    if kind == "bad_unit":
        q = res["valueQuantity"]
        if rng.random() < 0.5:
            bad = "kg" if q["code"] == "mm[Hg]" else "mm[Hg]"
            q["unit"] = q["code"] = bad
            return f"LOINC {code} with non-convertible unit {bad}"
        for key in ("unit", "code", "system"):
            q.pop(key, None)
        return f"LOINC {code} without unit"
    if kind == "impossible_value":
        value, ucode, udisp = _IMPOSSIBLE_OBS[code]
        res["valueQuantity"].update({"value": value, "unit": udisp, "code": ucode})
        return f"LOINC {code} value {value} {ucode}"
    if kind == "bad_timestamp":
        res["effectiveDateTime"] = bad = rng.choice(_BAD_EFFECTIVE)
        return f"effectiveDateTime {bad!r}"
    raise GeneratorError(f"cannot corrupt resource with {kind}")


class TelemetrySink:
    """Writes readings to sharded NDJSON files and one legacy-gateway CSV file."""

    HEADER = "device_id,patient_id,metric,value,unit,ts"

    def __init__(self, root: Path, planter: DirtPlanter) -> None:
        self.root = root
        self.planter = planter
        self.shards: dict[int, LineWriter] = {}
        self.csv = LineWriter(root / "telemetry" / "legacy-gateway.csv", header=self.HEADER)
        self.readings = 0
        self.sessions = 0

    def write(self, out: PatientOutput, seed: int) -> None:
        """Write all readings of a patient's monitor session."""
        plan = out.monitor
        if plan is None:
            return
        self.sessions += 1
        use_csv = self.sessions % 4 == 2
        if use_csv:
            writer, rel = self.csv, "telemetry/legacy-gateway.csv"
            kinds: tuple[str, ...] = (
                "unknown_code",
                "impossible_value",
                "duplicate",
                "bad_timestamp",
            )
        else:
            shard = out.person.idx // TELEMETRY_SHARD
            rel = f"telemetry/monitors-{shard:03d}.ndjson"
            writer = self.shards.get(shard) or self.shards.setdefault(
                shard, LineWriter(self.root / rel)
            )
            kinds = (
                "unknown_code",
                "impossible_value",
                "duplicate",
                "bad_timestamp",
                "broken_json",
            )
        dev, pid = plan.device_id, out.person.id
        planter = self.planter
        active = planter.active
        rng = Random(f"{seed}:telemetry:{out.person.idx}")
        n = 0
        for metric, value, unit, ts in readings(rng, plan):
            kind = planter.choose(kinds) if active else None
            detail = ""
            if kind == "unknown_code":
                metric = planter.rng.choice(V.UNKNOWN_METRICS)
                detail = f"unknown metric {metric}"
            elif kind == "impossible_value":
                value = IMPOSSIBLE[metric]
                detail = f"{metric} value {value} {unit}"
            elif kind == "bad_timestamp":
                ts = planter.rng.choice(BAD_TIMESTAMPS)
                detail = f"unparseable ts {ts!r}"
            if use_csv:
                line = f"{dev},{pid},{metric},{value},{unit},{ts}"
            else:
                line = (
                    f'{{"device_id":"{dev}","patient_id":"{pid}","metric":"{metric}",'
                    f'"value":{value},"unit":"{unit}","ts":"{ts}"}}'
                )
            if kind == "broken_json":
                line = line[: len(line) // 2]
                detail = "NDJSON line cut in half"
            pos = writer.write(line)
            n += 1
            if kind == "duplicate":
                pos = writer.write(line)
                n += 1
                detail = "exact duplicate of previous reading"
            if kind is not None:
                planter.record(kind, rel, f"line:{pos}", detail)
        self.readings += n

    def close(self) -> None:
        """Close files (the CSV is always created, header included)."""
        if self.csv.lines == 0:
            self.csv.path.parent.mkdir(parents=True, exist_ok=True)
            self.csv.path.write_text(self.HEADER + "\n", encoding="utf-8", newline="\n")
        self.csv.close()
        for w in self.shards.values():
            w.close()


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise GeneratorError(f"output path {out_dir} is not a directory")
        entries = set(os.listdir(out_dir))
        if entries and "manifest.json" not in entries:
            raise GeneratorError(
                f"output directory {out_dir} is not empty and holds no generated hospital"
            )
        for name in OUTPUT_ENTRIES:
            p = out_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def generate_hospital(
    out_dir: Path,
    patients: int,
    seed: int,
    dirty_rate: float = 0.0,
    progress: ProgressFn | None = None,
) -> GenerationReport:
    """Generate a deterministic sample hospital under ``out_dir``.

    The same (patients, seed, dirty_rate) always produce a byte-identical tree. An existing
    directory is only reused when it holds a previously generated hospital (its generated
    entries are replaced).
    """
    if patients < 1:
        raise GeneratorError("patients must be >= 1")
    if not 0.0 <= dirty_rate <= 1.0:
        raise GeneratorError("dirty_rate must be within [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GeneratorError("seed must be a non-negative integer")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)

    ref_dt = reference_datetime(seed)
    ids = Identifiers()
    planter = DirtPlanter(dirty_rate, seed)
    report = GenerationReport(str(out_dir), seed, patients, dirty_rate)
    counts = report.resources
    hosp = Hospital(seed, ids)
    ehr = EhrSink(out_dir, seed, fhir_dt(ref_dt), planter, counts)
    tele = TelemetrySink(out_dir, planter)
    labels = LineWriter(out_dir / "labels" / "phi.jsonl")
    builder = PatientBuilder(seed, hosp, ref_dt, ids)

    for res in hosp.locations + hosp.scanner_devices:
        ehr.add(res, dirty=False)

    n_chunks = (patients + CHUNK - 1) // CHUNK
    for chunk in range(n_chunks):
        if chunk % 2 == 0:
            ehr.begin_bundle()
        for idx in range(chunk * CHUNK, min(patients, (chunk + 1) * CHUNK)):
            out = builder.build(idx, ehr.ref)
            for res in out.resources:
                ehr.add(res)
            for study in out.studies:
                report.dicom_files += _write_study(out_dir, seed, study, out, planter)
            tele.write(out, seed)
            for note in out.notes:
                labels.write(
                    dumps(
                        {
                            "note_id": note.id,
                            "patient_id": note.patient_id,
                            "text": note.text,
                            "spans": note.spans,
                        }
                    )
                )
                report.notes += 1
        if chunk % 2 == 0:
            ehr.end_bundle()
        if progress is not None:
            progress("patients", min(patients, (chunk + 1) * CHUNK), patients)
    ehr.close()
    tele.close()
    if labels.lines == 0:  # pragma: no cover - every patient has >= 1 note
        labels.path.parent.mkdir(parents=True, exist_ok=True)
        labels.path.touch()
    labels.close()

    report.telemetry_readings = tele.readings
    report.bytes = {
        "ehr": _dir_bytes(out_dir / "ehr"),
        "pacs": _dir_bytes(out_dir / "pacs"),
        "telemetry": _dir_bytes(out_dir / "telemetry"),
    }
    report.dirty_records = len(planter.records)
    manifest = {
        "generator_version": V.GENERATOR_VERSION,
        "seed": seed,
        "patients": patients,
        "dirty_rate": dirty_rate,
        "reference_datetime": fhir_dt(ref_dt),
        "counts": report.counts(),
        "dirty": [r.to_dict() for r in planter.records],
        "identifiers": ids.to_dict(),
    }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
        newline="\n",
    )
    if progress is not None:
        progress("done", patients, patients)
    return report


def _write_study(
    root: Path, seed: int, study: Any, out: PatientOutput, planter: DirtPlanter
) -> int:
    rng = Random(f"{seed}:pacs:{study.uid}")
    n = 0
    for se in study.series:
        folder = root / "pacs" / study.uid / se.uid
        folder.mkdir(parents=True, exist_ok=True)
        for i, uid in enumerate(se.instances):
            data = render_instance(rng, study, se, i, out.person)
            rel = f"pacs/{study.uid}/{se.uid}/{uid}.dcm"
            if planter.active and planter.choose(("truncated_dicom",)) is not None:
                if planter.rng.random() < 0.75:
                    frac = planter.rng.uniform(0.2, 0.7)
                    data = data[: int(len(data) * frac)]
                    detail = f"truncated to {len(data)} bytes"
                else:
                    data = b"HTTP/1.1 502 Bad Gateway\r\n\r\nupstream PACS timeout\n"
                    detail = "not a DICOM file"
                planter.record("truncated_dicom", rel, "file", detail)
            (folder / f"{uid}.dcm").write_bytes(data)
            n += 1
    return n
