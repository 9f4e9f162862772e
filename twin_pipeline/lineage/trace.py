"""Record-level lineage: from any row's ``lineage_key`` back to the source file bytes.

The chain is followed through the activity records in the ledger: the latest activity that wrote
the row's table (and whose recorded content hash should still match the table), then the tables
that activity read, down to the ``raw.*`` row with ``source_file``, ``position`` and
``record_hash``, and finally the registered source file. Where the position names a line
(``line:N``), the record is re-read from the file and its hash recomputed; the file's sha256 is
always recomputed and compared with the registered one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import prov.model as pm

from twin_pipeline.activity import activities
from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.lineage import prov_build
from twin_pipeline.store import Store, lineage_key

_TABLE = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")
MAX_DEPTH = 12


class TraceError(TwinPipelineError):
    """A row or its chain cannot be found."""


@dataclass
class Step:
    table: str
    lineage_key: str
    rows: int  # rows of the table carrying this key
    table_rows: int
    content_hash: str
    activity: dict[str, Any] | None  # the activity that wrote the table's current version
    version_recorded: bool  # the table's current content hash is the one that activity recorded
    record: dict[str, Any] = field(default_factory=dict)  # raw rows: source_file, position, hash


@dataclass
class Source:
    path: str
    sha256: str
    position: str
    record_hash: str
    abs_path: str | None = None
    size: int | None = None
    file_sha256_ok: bool | None = None  # file on disk still has the registered sha256
    record_hash_ok: bool | None = None  # bytes at position hash to record_hash (line formats)
    record_hash_method: str | None = None
    lineage_key_ok: bool | None = None  # key = f(file sha256, position, record hash)
    note: str | None = None


@dataclass
class Trace:
    table: str
    key: str
    steps: list[Step]
    source: Source | None

    def to_dict(self) -> dict[str, Any]:
        src = None
        if self.source is not None:
            src = {
                "path": self.source.path,
                "sha256": self.source.sha256,
                "position": self.source.position,
                **{
                    k: v
                    for k, v in asdict(self.source).items()
                    if k not in {"path", "sha256", "position"}
                },
            }
        return {
            "table": self.table,
            "key": self.key,
            "source": src,
            "steps": [asdict(s) for s in self.steps],
        }

    @property
    def verified(self) -> bool:
        s = self.source
        return bool(
            s is not None
            and s.file_sha256_ok
            and s.lineage_key_ok is not False
            and s.record_hash_ok is not False
            and all(step.version_recorded for step in self.steps)
        )


def _check_table(store: Store, table: str) -> None:
    if not _TABLE.match(table) or not store.table_exists(table):
        raise TraceError(f"no table {table!r} in the store (use schema.table)")


def _has_column(store: Store, table: str, column: str) -> bool:
    return any(c == column for c, _ in store.columns(table))


def _resolve_key(store: Store, table: str, key: str) -> str:
    """``key`` is a lineage_key, or the value of the table's first (id) column."""
    if not _has_column(store, table, "lineage_key"):
        raise TraceError(f"{table} has no lineage_key column")
    row = store.con.execute(f"SELECT count(*) FROM {table} WHERE lineage_key = ?", [key]).fetchone()
    if row and row[0]:
        return key
    first = store.columns(table)[0][0]
    hit = store.con.execute(
        f'SELECT lineage_key FROM {table} WHERE CAST("{first}" AS VARCHAR) = ? LIMIT 1', [key]
    ).fetchone()
    if hit and hit[0]:
        return str(hit[0])
    raise TraceError(f"no row of {table} has lineage_key or {first} = {key!r}")


def _writer_of(acts: list[dict[str, Any]], table: str) -> dict[str, Any] | None:
    for rec in reversed(acts):
        if any(tv["table"] == table for tv in rec.get("outputs") or []):
            return rec
    return None


def _summary(rec: dict[str, Any]) -> dict[str, Any]:
    code = rec.get("code_version") or {}
    return {
        "activity_id": rec["activity_id"],
        "prov_id": prov_build.activity_id(rec),
        "asset_key": rec["asset_key"],
        "run_id": rec["run_id"],
        "user": rec.get("user"),
        "role": rec.get("role"),
        "started_at": rec.get("started_at"),
        "ended_at": rec.get("ended_at"),
        "git_commit": code.get("git_commit"),
        "package": code.get("package"),
        "policy_versions": rec.get("policy_versions") or {},
        "key_versions": rec.get("key_versions") or {},
    }


def _rows_with_key(store: Store, table: str, key: str) -> int:
    if not store.table_exists(table) or not _has_column(store, table, "lineage_key"):
        return 0
    row = store.con.execute(f"SELECT count(*) FROM {table} WHERE lineage_key = ?", [key]).fetchone()
    return int(row[0]) if row else 0


def _is_raw(store: Store, table: str) -> bool:
    cols = {c for c, _ in store.columns(table)}
    return {"source_file", "position", "record_hash", "lineage_key"} <= cols


def trace(store: Store, table: str, key: str) -> Trace:
    """The chain from ``table``'s row(s) with ``key`` back to the source record."""
    _check_table(store, table)
    key = _resolve_key(store, table, key)
    acts = activities(store)
    steps: list[Step] = []
    seen: set[str] = set()
    current: str | None = table
    while current and current not in seen and len(steps) < MAX_DEPTH:
        seen.add(current)
        writer = _writer_of(acts, current)
        n_rows = store.row_count(current)
        chash = store.content_hash(current)
        recorded = False
        if writer is not None:
            recorded = any(
                tv["table"] == current and tv["content_hash"] == chash
                for tv in writer.get("outputs") or []
            )
        step = Step(
            table=current,
            lineage_key=key,
            rows=_rows_with_key(store, current, key),
            table_rows=n_rows,
            content_hash=chash,
            activity=_summary(writer) if writer else None,
            version_recorded=recorded,
        )
        steps.append(step)
        if _is_raw(store, current):
            row = store.con.execute(
                f"SELECT source_file, position, record_hash FROM {current} WHERE lineage_key = ? "
                "LIMIT 1",
                [key],
            ).fetchone()
            if row:
                step.record = {"source_file": row[0], "position": row[1], "record_hash": row[2]}
            break
        nxt = None
        if writer is not None:
            for tv in writer.get("input_versions") or []:
                if tv["table"] not in seen and _rows_with_key(store, tv["table"], key):
                    nxt = str(tv["table"])
                    break
        if nxt is None:  # writer unknown or its inputs lost the key: find the raw row directly
            for t in store.tables(("raw",)):
                if t not in seen and _is_raw(store, t) and _rows_with_key(store, t, key):
                    nxt = t
                    break
        current = nxt
    raw = steps[-1].record if steps else {}
    source = _source(store, raw, key) if raw else None
    return Trace(table=table, key=key, steps=steps, source=source)


def _candidate_hashes(record: bytes) -> dict[str, str]:
    text = record.rstrip(b"\r\n")
    variants = {"line": text, "line-stripped": text.strip()}
    if text.startswith(b"\xef\xbb\xbf"):
        variants["line-no-bom"] = text[3:]
    out: dict[str, str] = {}
    for name, data in variants.items():
        out[f"sha256({name})"] = hashlib.sha256(data).hexdigest()
        out[f"md5({name})"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return out


def read_line(path: Path, number: int) -> bytes | None:
    """Line ``number`` (1-based) of a file, as bytes without its line break."""
    with path.open("rb") as fh:
        for i, line in enumerate(fh, start=1):
            if i == number:
                return line.rstrip(b"\r\n")
    return None


def _source(store: Store, raw: dict[str, Any], key: str) -> Source:
    reg = store.con.execute(
        "SELECT sha256, abs_path, size_bytes FROM governance.source_file WHERE path = ?",
        [raw["source_file"]],
    ).fetchone()
    if reg is None:
        return Source(
            path=str(raw["source_file"]),
            sha256="",
            position=str(raw["position"]),
            record_hash=str(raw["record_hash"]),
            note="source file is not registered in governance.source_file",
        )
    src = Source(
        path=str(raw["source_file"]),
        sha256=str(reg[0]),
        position=str(raw["position"]),
        record_hash=str(raw["record_hash"]),
        abs_path=str(reg[1]),
        size=int(reg[2]) if reg[2] is not None else None,
    )
    src.lineage_key_ok = lineage_key(src.sha256, src.position, src.record_hash) == key
    path = Path(src.abs_path or "")
    if not path.is_file():
        src.note = "source file is no longer at its registered location"
        return src
    from twin_pipeline.sources import sha256_file

    src.file_sha256_ok = sha256_file(path) == src.sha256
    m = re.fullmatch(r"line:(\d+)", src.position)
    if m is None:
        src.note = f"position {src.position!r} is not line-addressable; file hash checked only"
        return src
    line = read_line(path, int(m.group(1)))
    if line is None:
        src.record_hash_ok = False
        src.note = f"file has no {src.position}"
        return src
    for method, digest in _candidate_hashes(line).items():
        if digest == src.record_hash:
            src.record_hash_ok, src.record_hash_method = True, method
            break
    else:
        src.record_hash_ok = False
        src.note = f"bytes at {src.position} do not hash to the recorded record hash"
    return src


def chain_document(store: Store, result: Trace) -> pm.ProvDocument:
    """PROV of the chain: record entities derived step by step, down to the source file."""
    doc = prov_build.new_document()
    acts = {a["activity_id"]: a for a in activities(store)}
    prev: str | None = None
    prev_activity: str | None = None
    for step in result.steps:
        rid = prov_build.record_id(step.table, step.lineage_key)
        doc.entity(
            rid,
            {
                "prov:type": prov_build.TWIN["Record"],
                "prov:label": f"{step.table} row {step.lineage_key}",
                "twin:table": step.table,
                "twin:lineage_key": step.lineage_key,
            },
        )
        tv = prov_build.table_version_id(step.table, step.content_hash)
        if step.activity is not None:
            rec = acts.get(step.activity["activity_id"])
            if rec is not None:
                act = prov_build.add_activity(doc, rec)
                doc.wasGeneratedBy(rid, act)
        if doc.get_record(tv):
            doc.hadMember(tv, rid)  # the row belongs to that table version
        if prev is not None:
            doc.wasDerivedFrom(prev, rid, prev_activity)
        prev = rid
        prev_activity = step.activity["prov_id"] if step.activity else None
    if result.source is not None and prev is not None and result.source.sha256:
        fid = prov_build.file_id(result.source.sha256)
        if not doc.get_record(fid):
            doc.entity(
                fid,
                {
                    "prov:type": prov_build.TWIN["SourceFile"],
                    "prov:label": result.source.path,
                    "twin:path": result.source.path,
                    "twin:sha256": result.source.sha256,
                },
            )
        doc.wasDerivedFrom(
            prev,
            fid,
            prev_activity,
            other_attributes={
                "twin:position": result.source.position,
                "twin:record_hash": result.source.record_hash,
            },
        )
    return doc
