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
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import prov.model as pm

from twin_pipeline.activity import activities
from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.lineage import prov_build
from twin_pipeline.store import Store, lineage_key, position_lineage_key

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
        chash = store.content_hash(current, verify=True)
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


def _digests(variants: dict[str, bytes]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, data in variants.items():
        out[f"sha256({name})"] = hashlib.sha256(data).hexdigest()
        out[f"md5({name})"] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return out


def _line_variants(line: bytes) -> dict[str, bytes]:
    text = line.rstrip(b"\n")
    variants = {"line": text.rstrip(b"\r"), "line-with-cr": text, "line-stripped": text.strip()}
    if text.startswith(b"\xef\xbb\xbf"):
        variants["line-no-bom"] = text[3:].rstrip(b"\r")
    return variants


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    return data


def _raw_line(path: Path, number: int) -> bytes | None:
    lines = _read_bytes(path).split(b"\n")
    if number < 1 or number > len(lines):
        return None
    return lines[number - 1]


def read_line(path: Path, number: int) -> bytes | None:
    """Line ``number`` (1-based) of a file (gzip read through), without its line break."""
    line = _raw_line(path, number)
    return None if line is None else line.rstrip(b"\r")


def _json_variants(obj: Any) -> dict[str, bytes]:
    out = {}
    for name, kw in (
        ("json-compact", {"separators": (",", ":"), "ensure_ascii": False}),
        ("json-canonical", {"separators": (",", ":"), "ensure_ascii": False, "sort_keys": True}),
        ("json-default", {}),
    ):
        out[name] = json.dumps(obj, **kw).encode()  # type: ignore[arg-type]
    return out


def record_candidates(path: Path, position: str) -> dict[str, str] | None:
    """Hashes the record at ``position`` may have been recorded with, or None if the position
    cannot be re-read from the file (e.g. a DICOM header, hashed after parsing)."""
    m = re.fullmatch(r"(?:line:(\d+))?/?(?:entry:(\d+))?", position)
    if position == "file":
        data = _read_bytes(path)
        try:  # a text record (one FHIR resource per file) is hashed as received
            text_form = data.decode("utf-8-sig").encode()
        except UnicodeDecodeError:  # binary (DICOM): the reader hashed what it parsed
            return None
        return _digests({"file": data, "file-text": text_form})
    if m is None or not position:
        return None
    line_no, entry_no = m.group(1), m.group(2)
    if line_no and entry_no is None:
        line = _raw_line(path, int(line_no))
        return _digests(_line_variants(line)) if line is not None else {}
    try:
        text = read_line(path, int(line_no)) if line_no else _read_bytes(path)
        if text is None:
            return {}
        bundle = json.loads(text.decode("utf-8-sig"))
        entry = (bundle.get("entry") or [])[int(entry_no or 0)]
    except (ValueError, IndexError, AttributeError, TypeError):
        return {}
    forms: dict[str, bytes] = {}
    if isinstance(entry, dict) and "resource" in entry:
        forms.update({f"resource:{k}": v for k, v in _json_variants(entry["resource"]).items()})
    forms.update({f"entry:{k}": v for k, v in _json_variants(entry).items()})
    return _digests(forms)


def _reader_candidates(kind: str, path: Path, position: str) -> dict[str, str] | None:
    """Ask the file's own reader to re-read the record (``SourceReader.record_hashes``)."""
    from twin_pipeline.sources import load_readers

    reader = load_readers().get(kind)
    if reader is None:
        return None
    try:
        hashes = reader.record_hashes(path, position)
    except Exception as exc:  # a reader failing to re-read is a finding, not a crash
        return {f"{kind} reader failed: {type(exc).__name__}": ""}
    if hashes is None:
        return None
    return {f"{kind} reader #{i}": h for i, h in enumerate(sorted(hashes))}


def _source(store: Store, raw: dict[str, Any], key: str) -> Source:
    if raw["record_hash"] is None:  # hashed lazily (telemetry lines): filled in below
        raw = {**raw, "record_hash": ""}
    reg = store.con.execute(
        "SELECT sha256, abs_path, size_bytes, kind FROM governance.source_file WHERE path = ?",
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
    src.lineage_key_ok = key in (
        lineage_key(src.sha256, src.position, src.record_hash),
        position_lineage_key(src.sha256, src.position),
    )
    path = Path(src.abs_path or "")
    if not path.is_file():
        src.note = "source file is no longer at its registered location"
        return src
    from twin_pipeline.sources import sha256_file

    src.file_sha256_ok = sha256_file(path) == src.sha256
    candidates = record_candidates(path, src.position)
    if candidates is None:
        candidates = _reader_candidates(str(reg[3] or ""), path, src.position)
    if candidates is None:
        src.note = f"record at {src.position!r} cannot be re-read from the file; file hash checked"
        return src
    if not candidates:
        src.record_hash_ok = False
        src.note = f"file has no record at {src.position}"
        return src
    if not src.record_hash:
        # Not hashed at load: the record is the one at this position of the registered file
        # version, so it is verified by the file's sha256; its hash is computed now.
        method = "md5(line)" if "md5(line)" in candidates else next(iter(candidates))
        src.record_hash = candidates[method]
        src.record_hash_method = f"{method}, hashed at trace time"
        src.record_hash_ok = bool(src.file_sha256_ok)
        if not src.file_sha256_ok:
            src.note = (
                f"the file changed since it was loaded: the record at {src.position} cannot be "
                "verified (it was hashed only as part of the whole file)"
            )
        return src
    for method, digest in candidates.items():
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
