"""HL7 v2 messages (kind ``hl7v2``): every message kept in ``raw.hl7_message``; ORU^R01 numerics
whose OBX code is in the telemetry vocabulary become rows of ``raw.telemetry_reading``.

Real feeds start with a byte-order mark and separate segments with ``\\n`` or ``\\r\\n`` instead of
``\\r``; both are normalized before parsing with the ``hl7`` package. A file may hold several
messages (each starts at an ``MSH`` segment); each message is one record (``entry:N``). Messages
that cannot be parsed are quarantined; other message types (ADT, ORM, SIU, ...) are registered
and counted, not lost. Lab OBX values (codes outside the device-metric vocabulary) stay in the
message text and are counted in ``n_obx_numeric``, not turned into device readings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import hl7

from twin_pipeline.harmonize.telemetry_config import TelemetrySpec, load_telemetry_spec
from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register
from twin_pipeline.sources.telemetry import ReadingRow, ensure_raw_table, insert_readings
from twin_pipeline.store import QuarantineRow, Store, lineage_key

MESSAGE_TABLE = "raw.hl7_message"
MESSAGE_DDL = f"""
CREATE TABLE IF NOT EXISTS {MESSAGE_TABLE} (
    lineage_key VARCHAR,
    source_file VARCHAR,
    position VARCHAR,
    record_hash VARCHAR,
    message_type VARCHAR,
    trigger_event VARCHAR,
    control_id VARCHAR,
    version VARCHAR,
    sending_application VARCHAR,
    sending_facility VARCHAR,
    message_datetime VARCHAR,
    patient_mrn VARCHAR,
    n_segments INTEGER,
    n_obx INTEGER,
    n_obx_numeric INTEGER,
    n_readings INTEGER,
    message VARCHAR              -- the message, segments separated by \\r
)
"""
_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")


def parse_dtm(text: str, default_tz: str) -> datetime | None:
    """HL7 DTM ``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]`` as an aware datetime."""
    m = _DTM.match(text.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, off = m.groups()
    try:
        dt = datetime(
            int(y),
            int(mo or 1),
            int(d or 1),
            int(h or 0),
            int(mi or 0),
            int(s or 0),
            int((frac or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    if off:
        sign = 1 if off[0] == "+" else -1
        delta = timedelta(hours=int(off[1:3]), minutes=int(off[3:5]))
        return dt.replace(tzinfo=timezone(sign * delta))
    return dt.replace(tzinfo=ZoneInfo(default_tz))


def split_messages(data: bytes) -> list[str]:
    """Messages of a file: BOM dropped, segment separators normalized to ``\\r``."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    messages: list[list[str]] = []
    for seg in text.split("\r"):
        seg = seg.lstrip("\ufeff")
        if not seg.strip():
            continue
        if seg.startswith("MSH") or not messages:
            messages.append([])
        messages[-1].append(seg)
    return ["\r".join(m) for m in messages]


def _field(seg: Any, i: int, comp: int | None = None) -> str:
    try:
        f = seg[i]
    except (IndexError, KeyError):
        return ""
    if comp is None:
        return str(f)
    try:
        return str(f[0][comp]) if len(f[0]) > comp else ""
    except (IndexError, KeyError, TypeError):
        return str(f) if comp == 0 else ""


def _comp(seg: Any, i: int, comp: int) -> str:
    """Component ``comp`` (0-based) of the first repetition of field ``i``."""
    raw = _field(seg, i)
    first = raw.split("~")[0]
    parts = first.split("^")
    return parts[comp].strip() if len(parts) > comp else ""


@register
class Hl7v2Reader(SourceReader):
    kind = "hl7v2"
    raw_tables = (MESSAGE_TABLE, "raw.telemetry_reading")

    def matches(self, rel: str) -> bool:
        return rel.lower().endswith(".hl7")

    def ensure_tables(self, store: Store) -> None:
        ensure_raw_table(store)
        store.con.execute(MESSAGE_DDL)

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        stats = LoadStats(self.kind)
        self.ensure_tables(store)
        spec = load_telemetry_spec()
        aliases = spec.alias_map()
        rows: list[tuple[Any, ...]] = []
        readings: list[ReadingRow] = []
        bad: list[QuarantineRow] = []
        for f in files:
            fs = stats.file(f.rel)
            for k, text in enumerate(split_messages(f.path.read_bytes()), start=1):
                fs.records_in += 1
                position = f"entry:{k}"
                rh = hashlib.sha256(text.encode()).hexdigest()
                lk = lineage_key(f.sha256, position, rh)
                try:
                    msg = hl7.parse(text)
                    msh = msg.segment("MSH")
                except Exception as exc:  # hl7 raises several types on malformed input
                    fs.quarantined += 1
                    bad.append(
                        QuarantineRow(
                            "read",
                            MESSAGE_TABLE,
                            self.kind,
                            f.rel,
                            position,
                            "unparseable_message",
                            f"{f.rel} [{position}]: not a parseable HL7 v2 message "
                            f"({type(exc).__name__}: {exc})",
                            text,
                            lk,
                        )
                    )
                    continue
                try:
                    msg_readings = self._readings(msg, f, position, spec, aliases)
                    obx = [s for s in msg if str(s[0]) == "OBX"]
                    pid = [s for s in msg if str(s[0]) == "PID"]
                    row = (
                        lk,
                        f.rel,
                        position,
                        rh,
                        _comp(msh, 9, 0),
                        _comp(msh, 9, 1),
                        _field(msh, 10),
                        _comp(msh, 12, 0),
                        _comp(msh, 3, 0),
                        _comp(msh, 4, 0),
                        _field(msh, 7),
                        _comp(pid[0], 3, 0) if pid else None,
                        len(msg),
                        len(obx),
                        sum(1 for s in obx if _field(s, 2) in ("NM", "SN")),
                        len(msg_readings),
                        text,
                    )
                except Exception as exc:  # parsed, but a segment cannot be read
                    fs.quarantined += 1
                    bad.append(
                        QuarantineRow(
                            "read",
                            MESSAGE_TABLE,
                            self.kind,
                            f.rel,
                            position,
                            "unparseable_message",
                            f"{f.rel} [{position}]: HL7 v2 segments cannot be read "
                            f"({type(exc).__name__}: {exc})"[:500],
                            text,
                            lk,
                        )
                    )
                    continue
                readings.extend(msg_readings)
                rows.append(row)
                fs.loaded += 1
        if rows:
            store.con.executemany(
                f"INSERT INTO {MESSAGE_TABLE} VALUES ({', '.join('?' * 17)})", rows
            )
        insert_readings(store, readings)
        store.quarantine(bad)
        return stats

    def _readings(
        self,
        msg: Any,
        f: SourceFile,
        position: str,
        spec: TelemetrySpec,
        aliases: dict[str, str],
    ) -> list[ReadingRow]:
        msh = msg.segment("MSH")
        if (_comp(msh, 9, 0), _comp(msh, 9, 1)) != ("ORU", "R01"):
            return []
        out: list[ReadingRow] = []
        mrn: str | None = None
        obr_time = ""
        default_device = "hl7:" + "/".join(x for x in (_comp(msh, 3, 0), _comp(msh, 4, 0)) if x)
        for j, seg in enumerate(msg, start=1):
            name = str(seg[0])
            if name == "PID":
                mrn = _comp(seg, 3, 0) or None
            elif name == "OBR":
                obr_time = _comp(seg, 7, 0)
            elif name == "OBX" and _field(seg, 2) == "NM":
                codes = [_comp(seg, 3, 0), _comp(seg, 3, 3)]
                code = next((c for c in codes if c and c.upper() in aliases), None)
                if code is None:
                    continue
                try:
                    value = float(_field(seg, 5).strip())
                except ValueError:
                    continue
                if value != value or value in (float("inf"), float("-inf")):
                    continue  # NaN / infinity: not a reading (the message keeps the value)
                stamp = _comp(seg, 14, 0) or obr_time or _comp(msh, 7, 0)
                ts = parse_dtm(stamp, spec.default_timezone)
                if ts is None:
                    continue
                device = _comp(seg, 18, 0) or default_device
                pos = f"{position}/seg:{j}"
                out.append(
                    ReadingRow(
                        f.rel,
                        f.sha256,
                        pos,
                        hashlib.sha256(str(seg).encode()).hexdigest(),
                        self.kind,
                        device,
                        None,
                        mrn,
                        code,
                        value,
                        _comp(seg, 6, 0) or None,
                        ts,
                        stamp,
                    )
                )
        return out


def message_summary(store: Store) -> dict[str, Any]:
    """Counts per message type (what ``twin status`` style reports show)."""
    rows = store.con.execute(
        f"SELECT message_type || '^' || trigger_event, count(*), sum(n_readings) "
        f"FROM {MESSAGE_TABLE} GROUP BY 1 ORDER BY 1"
    ).fetchall()
    return json.loads(json.dumps({r[0]: {"messages": r[1], "readings": r[2]} for r in rows}))
