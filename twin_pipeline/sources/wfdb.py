"""PhysioNet WFDB records (kind ``wfdb``): ``*.hea`` headers with their ``.dat``/``.atr`` parts.

A record is read with the ``wfdb`` package. Numerics records (sampling frequency at most 1 Hz,
such as MIMIC ICU trends) become rows of ``raw.telemetry_reading``, one per sample and signal
(missing samples, NaN in WFDB, are not readings). Waveform records (ECG at hundreds of Hz) are
summarized per minute and signal into ``raw.wfdb_waveform_minute`` (n, min, max, mean).
Annotations (``.atr``) go to ``raw.wfdb_annotation``. The records of a header file are its
readings, minute summaries and annotations; ``.dat``/``.atr`` files are claimed and registered
as parts of their record (0 records of their own). When a part arrives after its header, the
header's record is read again. A record that cannot be read is quarantined whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from twin_pipeline.harmonize.telemetry_config import load_telemetry_spec
from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register, sha256_file
from twin_pipeline.sources.telemetry import RAW_TABLE, ReadingRow, ensure_raw_table, insert_readings
from twin_pipeline.store import QuarantineRow, Store, lineage_key

WAVE_TABLE = "raw.wfdb_waveform_minute"
ANN_TABLE = "raw.wfdb_annotation"
PART_EXTS = (".dat", ".atr")
NUMERICS_MAX_HZ = 1.0
DDL = f"""
CREATE TABLE IF NOT EXISTS {WAVE_TABLE} (
    lineage_key VARCHAR, source_file VARCHAR, position VARCHAR, record_hash VARCHAR,
    record_name VARCHAR, signal VARCHAR, unit VARCHAR, fs DOUBLE, minute_index INTEGER,
    minute_start TIMESTAMPTZ,   -- NULL when the header has no base date
    n INTEGER, min DOUBLE, max DOUBLE, mean DOUBLE
);
CREATE TABLE IF NOT EXISTS {ANN_TABLE} (
    lineage_key VARCHAR, source_file VARCHAR, position VARCHAR, record_hash VARCHAR,
    record_name VARCHAR, annotator VARCHAR, sample BIGINT, seconds DOUBLE,
    ts TIMESTAMPTZ, symbol VARCHAR, subtype INTEGER, chan INTEGER, num INTEGER, aux_note VARCHAR
);
"""


def _h(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def part_owner(part: Path) -> Path | None:
    """The header (``.hea``) in the part's folder that refers to it, if any: a ``.dat`` named
    on a signal line (multi-segment records name other files), an ``.atr`` by record name."""
    for hea in sorted(part.parent.glob("*.hea")):
        if part.suffix.lower() == ".atr":
            if hea.stem == part.stem:
                return hea
            continue
        try:
            lines = hea.read_text(errors="replace").splitlines()
        except OSError:
            continue
        body = [ln for ln in lines if ln.strip() and not ln.startswith("#")][1:]
        if any(ln.split()[0] == part.name for ln in body):
            return hea
    return None


@register
class WfdbReader(SourceReader):
    kind = "wfdb"
    raw_tables = (RAW_TABLE, WAVE_TABLE, ANN_TABLE)

    def matches(self, rel: str) -> bool:
        return rel.lower().endswith((".hea", *PART_EXTS))

    def ensure_tables(self, store: Store) -> None:
        ensure_raw_table(store)
        store.con.execute(DDL)

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        stats = LoadStats(self.kind)
        self.ensure_tables(store)
        headers: dict[str, SourceFile] = {}
        orphans: list[QuarantineRow] = []
        batch = {f.rel for f in files}
        for f in files:
            if f.rel.lower().endswith(".hea"):
                headers[f.rel] = f
                continue
            owner = part_owner(f.path)
            fs = stats.file(f.rel)  # a part: registered, its samples count with its record
            if owner is None:
                fs.records_in += 1
                fs.quarantined += 1
                orphans.append(
                    QuarantineRow(
                        "read",
                        RAW_TABLE,
                        self.kind,
                        f.rel,
                        "file",
                        "orphan_part",
                        f"{f.rel}: no WFDB header in its folder refers to this file",
                        None,
                        lineage_key(f.sha256, "file", f.sha256),
                    )
                )
                continue
            rel = str(Path(f.rel).parent / owner.name) if "/" in f.rel else owner.name
            if rel not in headers and rel not in batch:
                # The part came after its header: read the whole record again.
                headers[rel] = SourceFile(
                    owner, rel, self.kind, sha256_file(owner), owner.stat().st_size
                )
        again = [rel for rel in headers if rel not in {f.rel for f in files}]
        if again:
            for table in self.raw_tables:
                store.con.execute(
                    f"DELETE FROM {table} WHERE list_contains(?, source_file)", [again]
                )
            store.con.execute(
                "DELETE FROM governance.quarantine WHERE stage = 'read' "
                "AND list_contains(?, source_file)",
                [again],
            )
        spec = load_telemetry_spec()
        bad: list[QuarantineRow] = []
        for hf in headers.values():
            fs = stats.file(hf.rel)
            try:
                n = self._load_record(store, hf, spec.default_timezone)
            except Exception as exc:  # wfdb raises many types on broken records
                fs.records_in += 1
                fs.quarantined += 1
                bad.append(
                    QuarantineRow(
                        "read",
                        RAW_TABLE,
                        self.kind,
                        hf.rel,
                        "file",
                        "unreadable_record",
                        f"{hf.rel}: WFDB record cannot be read ({type(exc).__name__}: {exc})",
                        None,
                        lineage_key(hf.sha256, "file", hf.sha256),
                    )
                )
                continue
            fs.records_in += n
            fs.loaded += n
        store.quarantine(bad + orphans)
        return stats

    def _load_record(self, store: Store, hf: SourceFile, tz: str) -> int:
        import wfdb

        base = str(hf.path)[: -len(".hea")]
        rec = wfdb.rdrecord(base)
        name = rec.record_name
        start: datetime | None = None
        if rec.base_date is not None:
            start = datetime.combine(rec.base_date, rec.base_time or datetime.min.time())
            start = start.replace(tzinfo=ZoneInfo(tz))
        signals = np.asarray(rec.p_signal, dtype=float)
        fs = float(rec.fs)
        n = 0
        if fs <= NUMERICS_MAX_HZ:
            n += self._numerics(store, hf, name, rec, signals, fs, start)
        else:
            n += self._waveform(store, hf, name, rec, signals, fs, start)
        atr = Path(base + ".atr")
        if atr.is_file():
            n += self._annotations(store, hf, name, base, fs, start)
        return n

    def _numerics(
        self,
        store: Store,
        hf: SourceFile,
        name: str,
        rec: Any,
        signals: np.ndarray,
        fs: float,
        start: datetime | None,
    ) -> int:
        if start is None:
            raise ValueError("numerics record has no base date/time, readings need instants")
        rows: list[ReadingRow] = []
        device = f"wfdb:{name}"
        for s, (sig, unit) in enumerate(zip(rec.sig_name, rec.units, strict=True)):
            column = signals[:, s]
            for i in np.flatnonzero(~np.isnan(column)):
                value = float(column[i])
                ts = start + timedelta(seconds=float(i) / fs)
                pos = f"sample:{int(i)}/signal:{sig}"
                rows.append(
                    ReadingRow(
                        hf.rel,
                        hf.sha256,
                        pos,
                        _h(name, sig, int(i), value),
                        self.kind,
                        device,
                        None,
                        None,
                        sig,
                        value,
                        unit,
                        ts,
                        ts.isoformat(),
                    )
                )
        return insert_readings(store, rows)

    def _waveform(
        self,
        store: Store,
        hf: SourceFile,
        name: str,
        rec: Any,
        signals: np.ndarray,
        fs: float,
        start: datetime | None,
    ) -> int:
        per_min = round(fs * 60)
        n_min = -(-signals.shape[0] // per_min)
        out = []
        for s, (sig, unit) in enumerate(zip(rec.sig_name, rec.units, strict=True)):
            for m in range(n_min):
                chunk = signals[m * per_min : (m + 1) * per_min, s]
                chunk = chunk[~np.isnan(chunk)]
                if not chunk.size:
                    continue
                pos = f"signal:{sig}/minute:{m}"
                vals = (
                    int(chunk.size),
                    float(chunk.min()),
                    float(chunk.max()),
                    float(chunk.mean()),
                )
                rh = _h(name, sig, m, *vals)
                out.append(
                    (
                        lineage_key(hf.sha256, pos, rh),
                        hf.rel,
                        pos,
                        rh,
                        name,
                        sig,
                        unit,
                        fs,
                        m,
                        start + timedelta(minutes=m) if start else None,
                        *vals,
                    )
                )
        if out:
            store.con.executemany(f"INSERT INTO {WAVE_TABLE} VALUES ({', '.join('?' * 14)})", out)
        return len(out)

    def _annotations(
        self, store: Store, hf: SourceFile, name: str, base: str, fs: float, start: datetime | None
    ) -> int:
        import wfdb

        ann = wfdb.rdann(base, "atr")
        out = []
        for k in range(len(ann.sample)):
            sample = int(ann.sample[k])
            symbol = ann.symbol[k] if ann.symbol else None
            aux = (ann.aux_note[k] if ann.aux_note else "").rstrip("\x00")
            subtype = int(ann.subtype[k]) if ann.subtype is not None else None
            chan = int(ann.chan[k]) if ann.chan is not None else None
            num = int(ann.num[k]) if ann.num is not None else None
            pos = f"ann:{k + 1}"
            rh = _h(name, sample, symbol, subtype, chan, num, aux)
            secs = sample / fs
            out.append(
                (
                    lineage_key(hf.sha256, pos, rh),
                    hf.rel,
                    pos,
                    rh,
                    name,
                    "atr",
                    sample,
                    secs,
                    start + timedelta(seconds=secs) if start else None,
                    symbol,
                    subtype,
                    chan,
                    num,
                    aux or None,
                )
            )
        if out:
            store.con.executemany(f"INSERT INTO {ANN_TABLE} VALUES ({', '.join('?' * 14)})", out)
        return len(out)
