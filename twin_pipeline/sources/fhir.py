"""FHIR R4 reader (kind ``fhir``): Bundles, Bulk Data NDJSON (plain or gzip) and single resources.

Every resource is validated once, when its file is first loaded, with the ``fhir.resources``
R4B models (FHIR 4.3, wire-compatible with R4; see ``assets/ehr_fhir.yaml``) plus the required
bindings the models record but do not enforce. Valid resources become rows of
``raw.fhir_resource``; the rest go to quarantine with a rule, a reason naming the field, and
their position (``line:N``, ``entry:N``, ``file``). Bundle entries with ``request.method =
DELETE`` become rows without payload so the deletion is kept.

Validation is the expensive part: the models run ~8,000 resources/s per core. The model
decides every verdict, but it runs once per resource *shape*; resources of a known shape have
their primitive values validated in bulk with the models' own field types
(:mod:`twin_pipeline.harmonize.fhir_fastcheck`). NDJSON lines are parsed and validated in one
pass, over a process pool for large chunks (``TWIN_FHIR_WORKERS``, default: all cores); exact
copies of a record are checked once. Files are loaded in chunks of bounded size.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import QuarantineRow, Store, lineage_key

RAW_TABLE = "raw.fhir_resource"
DDL = f"""
CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
    lineage_key VARCHAR,
    source_file VARCHAR,
    position VARCHAR,        -- line:N | entry:N | line:N/entry:M | file
    ordinal BIGINT,          -- record order inside the file
    record_hash VARCHAR,     -- sha256 of the resource JSON as received
    resource_type VARCHAR,
    resource_id VARCHAR,
    version_id VARCHAR,
    last_updated TIMESTAMPTZ,
    bundle_type VARCHAR,
    bundle_id VARCHAR,
    full_url VARCHAR,
    request_method VARCHAR,  -- Bundle entry request.method (DELETE rows have no payload)
    request_url VARCHAR,
    payload JSON
)
"""
PARALLEL_MIN = 20_000  # NDJSON lines in a chunk before the process pool is worth its cost
PARALLEL_MIN_BYTES = 4 << 20  # JSON (Bundle) bytes in a chunk before files go to the pool
#: Seconds per stage of the last :meth:`FhirReader.load` in this process (for benchmarks).
LAST_PROFILE: dict[str, float] = {}
CHUNK = 500
MAX_PAYLOAD_IN_QUARANTINE = 200_000
CHUNK_BYTES = 64 << 20  # files are read, validated and inserted in chunks of this size
_NAME_RE = re.compile(r"^([A-Z][A-Za-z]+)(?:[._-][^/]*)?\.(?:ndjson|json)(?:\.gz)?$")
_URL_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_DATE_ERRORS = ("Date value", "DateTime value", "Instant value", "Time value")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"


def _loads(text: str, surrogates: bool = True) -> Any:
    """``json.loads`` for JSON as FHIR means it: a ``ValueError`` for anything that is not
    storable JSON text (NaN/Infinity, nesting too deep to walk and, with ``surrogates``,
    unpaired UTF-16 surrogates; Bundle entries are checked for those one by one)."""
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    if surrogates and "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            _dumps(obj).encode()
        except UnicodeEncodeError as exc:
            raise ValueError("a string holds an unpaired UTF-16 surrogate") from exc
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc
    return obj


def _unpaired(obj: Any) -> bool:
    try:
        _dumps(obj).encode()
    except UnicodeEncodeError:
        return True
    return False


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _safe(text: str) -> str:
    """Text that can be stored whatever it holds (unpaired surrogates escaped)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _not_str(value: Any) -> bool:
    return value is not None and not isinstance(value, str)


@functools.cache
def is_resource_type(name: str) -> bool:
    """True if the R4B models define a resource (not a data type) of this name."""
    if not re.fullmatch(r"[A-Z][A-Za-z]+", name) or name in ("Resource", "DomainResource"):
        return False
    try:
        cls = _model(name)
    except (ValueError, ImportError, AttributeError, KeyError):
        return False
    from fhir.resources.R4B.resource import Resource

    return isinstance(cls, type) and issubclass(cls, Resource)


@functools.cache
def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


@functools.cache
def _bindings() -> dict[str, dict[str, frozenset[str]]]:
    from twin_pipeline.harmonize.fhir_spec import load_spec

    out: dict[str, dict[str, frozenset[str]]] = {}
    for key, values in load_spec().required_bindings.items():
        rtype, element = key.split(".")
        out.setdefault(rtype, {})[element] = frozenset(values)
    return out


def _check_bindings(resource: dict[str, Any]) -> tuple[str, str] | None:
    rtype = str(resource.get("resourceType"))
    for element, allowed in _bindings().get(rtype, {}).items():
        value = resource.get(element)
        if value is not None and value not in allowed:
            return (
                "validation_failed",
                f"{rtype}.{element}: {value!r} is not in the required value set "
                f"({', '.join(sorted(allowed))})",
            )
    return None


def validate_full(resource: dict[str, Any]) -> tuple[str, str] | None:
    """The authority: the R4B model's ``model_validate`` plus the required bindings.

    ``None`` if the resource is valid R4, else ``(rule, reason)`` naming the field.
    """
    import pydantic

    rtype = resource.get("resourceType")
    try:
        cls = _model(str(rtype))
    except (ValueError, ImportError, AttributeError):
        return "unknown_resource_type", f"resourceType {rtype!r} is not a FHIR R4 resource"
    try:
        cls.model_validate(resource)
    except pydantic.ValidationError as exc:
        errors = exc.errors()
        missing = [e for e in errors if e["type"] == "missing"]
        first = missing[0] if missing else errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = str(first["msg"])
        if missing:
            rule = "missing_required"
        elif first["type"].startswith(("date", "time")) or any(s in msg for s in _DATE_ERRORS):
            rule = "bad_timestamp"
        else:
            rule = "validation_failed"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        return rule, f"{rtype}.{loc}: {msg}{more}"
    except (ValueError, TypeError) as exc:  # model-level validators outside pydantic's errors
        return "validation_failed", f"{rtype}: {exc}"
    except RecursionError:
        return "validation_failed", f"{rtype}: nested too deeply to validate"
    return _check_bindings(resource)


_FAST: Any = None


def validate_resource(resource: dict[str, Any]) -> tuple[str, str] | None:
    """Validate like :func:`validate_full`, through the shape cache of
    :mod:`twin_pipeline.harmonize.fhir_fastcheck` (same verdicts, far fewer model runs)."""
    global _FAST
    if _FAST is None:
        from twin_pipeline.harmonize.fhir_fastcheck import FastValidator

        _FAST = FastValidator(validate_full)
        _FAST.enabled = os.environ.get("TWIN_FHIR_FASTCHECK", "1") != "0"
    if not _FAST.enabled:
        return validate_full(resource)
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        return validate_full(resource)
    try:
        verdict: tuple[str, str] | None = _FAST.validate(resource, _model(rtype), _check_bindings)
    except RecursionError:
        return "validation_failed", f"{rtype}: nested too deeply to validate"
    return verdict


def validation_stats() -> dict[str, int]:
    """Shapes compiled and resources validated fast / by the full model in this process."""
    return dict(_FAST.stats) if _FAST is not None else {}


def _warm(_: int = 0) -> int:
    """Import what validation needs (spec, the models of every mapped type) once, before
    the pool forks, so workers inherit it instead of each importing it again."""
    from twin_pipeline.harmonize.fhir_spec import load_spec

    _bindings()
    for name in ("Bundle", *load_spec().mapped_types):
        if is_resource_type(name):
            _model(name)
    return os.getpid()


_POOL: ProcessPoolExecutor | None = None


def _pool(workers: int) -> Executor:
    """A pool of forked workers, for one :meth:`FhirReader.load` (shut down at its end).

    Fork (not spawn/forkserver) because those re-import the ``__main__`` module, which under
    Dagster, pytest or a script is not ours to re-run. Workers only run pydantic; they never
    touch the DuckDB connection they inherit. They do inherit every open file, the run lock
    included (``flock`` is shared with forked children), so a pool that outlived the load
    would keep the next run in the same process (``twin watch``) from starting.
    """
    global _POOL
    if _POOL is None:
        import multiprocessing as mp

        _warm()  # children inherit the imported models
        ctx = mp.get_context("fork")
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    return _POOL


def shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)
        _POOL = None


def _workers() -> int:
    try:
        return max(1, int(os.environ.get("TWIN_FHIR_WORKERS", "0")) or (os.cpu_count() or 1))
    except ValueError:
        return os.cpu_count() or 1


def _meta_of(res: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    meta = res.get("meta")
    m: dict[str, Any] = meta if isinstance(meta, dict) else {}
    return res.get("resourceType"), res.get("id"), m.get("versionId"), m.get("lastUpdated")


def _check_resource(res: Any) -> tuple[str, str] | None:
    """Checks before the model: an object, a known resource type, an id."""
    if not isinstance(res, dict):
        return "unknown_resource_type", "not a JSON object"
    rtype = res.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        return (
            "unknown_resource_type",
            f"resourceType {rtype!r} is not a FHIR R4 resource"
            if rtype is not None
            else "no resourceType: not a FHIR resource",
        )
    if not res.get("id"):
        return "missing_required", f"{rtype}.id: resource has no id"
    return None


_Verdict = tuple[tuple[str, str] | None, tuple[Any, Any, Any, Any] | None]


def _process_text(text: str) -> _Verdict:
    """Parse and validate one NDJSON line: (problem, (type, id, versionId, lastUpdated))."""
    try:
        res = _loads(text)
    except ValueError as exc:
        return ("broken_json", f"invalid JSON: {exc}"), None
    problem = _check_resource(res) or validate_resource(res)
    return problem, _meta_of(res) if isinstance(res, dict) else None


def _process_texts(texts: Sequence[str]) -> list[_Verdict]:
    """Pool worker."""
    return [_process_text(t) for t in texts]


def process_many(texts: Sequence[str]) -> list[_Verdict]:
    """:func:`_process_text` over many lines, spread over a process pool for large batches."""
    workers = _workers()
    if len(texts) < PARALLEL_MIN or workers < 2:
        return _process_texts(texts)
    chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
    out: list[_Verdict] = []
    for part in _pool(workers).map(_process_texts, chunks):
        out.extend(part)
    return out


# -- reading files -----------------------------------------------------------------------


@dataclass
class _Rec:
    position: str
    ordinal: int
    text: str  # the record as received (JSON text), for hashes and quarantine
    resource: dict[str, Any] | None
    bundle_type: str | None = None
    bundle_id: str | None = None
    full_url: str | None = None
    method: str | None = None
    url: str | None = None
    problem: tuple[str, str] | None = None  # (rule, reason) found while reading
    deferred: bool = False  # an NDJSON line not parsed yet (see _process_text)
    meta: tuple[Any, Any, Any, Any] | None = None  # resourceType, id, versionId, lastUpdated
    _hash: str | None = None

    @property
    def hash(self) -> str:
        """sha256 of the record text (recomputed if the text was changed)."""
        if self._hash is None:
            self._hash = hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()
        return self._hash


@dataclass
class _FileBatch:
    file: SourceFile
    records: list[_Rec] = field(default_factory=list)


def _read_text(f: SourceFile) -> tuple[str, bool]:
    """The file's text and whether it held bytes that are not UTF-8 (NDJSON only: kept with
    ``surrogateescape`` so the lines that are UTF-8 still load; a JSON file must be UTF-8)."""
    data = f.path.read_bytes()
    if f.rel.endswith(".gz"):
        data = gzip.decompress(data)
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or data[:2] in (
        b"\xff\xfe",
        b"\xfe\xff",
    ):
        raise UnicodeError("file is UTF-16/UTF-32 encoded: FHIR JSON must be UTF-8")
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        if not f.rel.endswith((".ndjson", ".ndjson.gz")):
            raise
        return data.decode("utf-8-sig", "surrogateescape"), True


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _entries(bundle: dict[str, Any], prefix: str, start: int, text: str) -> Iterator[_Rec]:
    btype = bundle.get("type")
    bid = bundle.get("id")
    entries = bundle.get("entry")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        # one record for the whole bundle: nothing in it can be read as entries
        yield _Rec(prefix + "file" if not prefix else prefix.rstrip("/"), start, text, None,
                   problem=("validation_failed",
                            f"Bundle.entry is not an array ({type(entries).__name__})"))  # fmt: skip
        return
    envelope = None
    if _not_str(btype) or _not_str(bid):
        bad = "Bundle.type" if _not_str(btype) else "Bundle.id"
        envelope = ("validation_failed", f"{bad} is not a string")
        btype, bid = None, None
    for i, entry in enumerate(entries):
        pos = f"{prefix}entry:{i}"
        if not isinstance(entry, dict):
            yield _Rec(pos, start + i, _dumps(entry), None, btype, bid,
                       problem=("validation_failed", "Bundle.entry is not an object"))  # fmt: skip
            continue
        req_raw = entry.get("request")
        req: dict[str, Any] = req_raw if isinstance(req_raw, dict) else {}
        raw_method, url, full_url = req.get("method"), req.get("url"), entry.get("fullUrl")
        method = str(raw_method).upper() if raw_method else None
        res = entry.get("resource")
        rec = _Rec(pos, start + i, _dumps(res) if res is not None else _dumps(entry),
                   res if isinstance(res, dict) else None, btype, bid,
                   None if _not_str(full_url) else full_url, method,
                   None if _not_str(url) else url)  # fmt: skip
        wrong = [
            name
            for name, value in (
                ("fullUrl", full_url),
                ("request.url", url),
                ("request.method", raw_method),
            )
            if _not_str(value)
        ]
        if envelope is not None:
            rec.problem = envelope
        elif _unencodable(rec.text):
            rec.problem = ("broken_json", "a string holds an unpaired UTF-16 surrogate")
        elif wrong:
            rec.problem = ("validation_failed", f"Bundle.entry.{wrong[0]} is not a string")
        elif res is None and method != "DELETE":
            rec.problem = ("missing_required", "Bundle.entry has no resource")
        elif res is not None and not isinstance(res, dict):
            rec.problem = ("validation_failed", "Bundle.entry.resource is not an object")
        yield rec


def _records(f: SourceFile, text: str, lossy: bool = False) -> Iterator[_Rec]:
    name = f.rel.rsplit("/", 1)[-1]
    ndjson = name.endswith((".ndjson", ".ndjson.gz"))
    if not ndjson:
        try:
            obj = _loads(text, surrogates=False)
        except ValueError as exc:
            yield _Rec("file", 0, text, None, problem=("broken_json", f"invalid JSON: {exc}"))
            return
        if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
            yield from _entries(obj, "", 0, text)
        else:
            rec = _Rec("file", 0, text, obj if isinstance(obj, dict) else None)
            if _SURROGATE_ESCAPE.search(text) and _unpaired(obj):
                rec.problem = ("broken_json", "a string holds an unpaired UTF-16 surrogate")
            yield rec
        return
    ordinal = 0
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if lossy and _UNDECODABLE.search(line):
            shown = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield _Rec(f"line:{n}", ordinal, shown, None,
                       problem=("broken_json", "line is not valid UTF-8"))  # fmt: skip
            ordinal += 1
            continue
        if '"Bundle"' not in line:
            # parsed and validated later, in one pass (maybe in a worker process)
            yield _Rec(f"line:{n}", ordinal, line, None, deferred=True)
            ordinal += 1
            continue
        try:
            obj = _loads(line, surrogates=False)
        except ValueError as exc:
            yield _Rec(f"line:{n}", ordinal, line, None,
                       problem=("broken_json", f"invalid JSON: {exc}"))  # fmt: skip
            ordinal += 1
            continue
        if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
            for rec in _entries(obj, f"line:{n}/", ordinal, line):
                yield rec
                ordinal += 1
            continue
        rec = _Rec(f"line:{n}", ordinal, line, obj if isinstance(obj, dict) else None)
        if _SURROGATE_ESCAPE.search(line) and _unpaired(obj):
            rec.problem = ("broken_json", "a string holds an unpaired UTF-16 surrogate")
        yield rec
        ordinal += 1


def _unstorable(rec: _Rec) -> tuple[str, str] | None:
    """Values the model accepted but a raw row cannot hold as text (a non-string id, ...)."""
    rtype, rid, vid, updated = rec.meta or (None, None, None, None)
    for name, value in (
        ("id", rid),
        ("meta.versionId", vid),
        ("meta.lastUpdated", updated),
        ("Bundle.type", rec.bundle_type),
        ("Bundle.id", rec.bundle_id),
        ("Bundle.entry.fullUrl", rec.full_url),
        ("Bundle.entry.request.url", rec.url),
    ):
        if _not_str(value):
            return "validation_failed", f"{rtype}.{name}: {value!r} is not a string"
    if not rec.text.isascii() and _unencodable(rec.text):
        return "broken_json", "a string holds an unpaired UTF-16 surrogate"
    return None


def _id_from_url(url: Any) -> tuple[str | None, str | None]:
    if not url or not isinstance(url, str):
        return None, None
    if url.startswith("urn:uuid:"):
        return None, url[len("urn:uuid:") :]
    m = _URL_TAIL.search(url.split("?")[0])
    return (m.group(1), m.group(2)) if m else (None, None)


@register
class FhirReader(SourceReader):
    """HL7 FHIR R4 JSON, NDJSON and NDJSON.gz files (under ``ehr/``/``fhir/`` or ``<Type>*.ndjson``)."""

    kind = "fhir"
    raw_tables = (RAW_TABLE,)

    def matches(self, rel: str) -> bool:
        low = rel.lower()
        if not low.endswith((".json", ".ndjson", ".ndjson.gz", ".json.gz")):
            return False
        parts = low.split("/")
        if "telemetry" in parts[:-1]:
            return False
        if {"ehr", "fhir"} & set(parts[:-1]):
            return True
        m = _NAME_RE.match(rel.rsplit("/", 1)[-1])
        return bool(m and is_resource_type(m.group(1)))

    def ensure_tables(self, store: Store) -> None:
        store.con.execute(DDL)

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        """Load in chunks of files of bounded total size (memory stays bounded)."""
        stats = LoadStats(self.kind)
        prof: dict[str, float] = {}
        chunk: list[SourceFile] = []
        size = 0
        try:
            for f in files:
                chunk.append(f)
                size += f.size
                if size >= CHUNK_BYTES:
                    self._load_chunk(chunk, store, stats, prof)
                    chunk, size = [], 0
            if chunk:
                self._load_chunk(chunk, store, stats, prof)
        finally:
            shutdown_pool()
        LAST_PROFILE.clear()
        LAST_PROFILE.update(prof)
        return stats

    def _load_chunk(
        self,
        files: Sequence[SourceFile],
        store: Store,
        stats: LoadStats,
        prof: dict[str, float],
    ) -> None:
        t0 = time.perf_counter()
        # Bundle/JSON files are parsed, validated and hashed whole in the pool when there are
        # enough of them; NDJSON lines are read here and validated in chunks (process_many).
        workers = _workers()
        whole = [f for f in files if not f.rel.endswith((".ndjson", ".ndjson.gz"))]
        if workers < 2 or sum(f.size for f in whole) < PARALLEL_MIN_BYTES:
            whole = []
        futures = {f.rel: _pool(workers).submit(_prepare_file, f) for f in whole}
        local = [_read_batch(f) for f in files if f.rel not in futures]
        t1 = time.perf_counter()
        _check_batches(local)
        done = {b.file.rel: b for b in local}
        for rel, fut in futures.items():
            try:
                done[rel] = fut.result()
            except Exception as exc:  # a worker died: the file is quarantined, not lost
                f = next(x for x in whole if x.rel == rel)
                done[rel] = _FileBatch(f, [_Rec("file", 0, "", None, problem=(
                    "validation_failed", f"file could not be validated: {exc!r}"))])  # fmt: skip
        batches = [done[f.rel] for f in files]
        for batch in batches:
            stats.file(batch.file.rel).records_in = len(batch.records)
        t2 = time.perf_counter()
        rows: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
        quarantine: list[QuarantineRow] = []
        for batch in batches:
            f = batch.file
            fs = stats.file(f.rel)
            for rec in batch.records:
                rhash = rec.hash
                lkey = lineage_key(f.sha256, rec.position, rhash)
                if rec.problem is None:
                    rec.problem = _unstorable(rec)
                if rec.problem is not None:
                    rule, reason = rec.problem
                    quarantine.append(
                        QuarantineRow(
                            stage="read",
                            table_name=RAW_TABLE,
                            source_kind=self.kind,
                            source_file=f.rel,
                            position=rec.position,
                            rule=rule,
                            reason=_safe(f"{f.rel} [{rec.position}]: {reason}"),
                            payload=_safe(rec.text[:MAX_PAYLOAD_IN_QUARANTINE]),
                            lineage_key=lkey,
                        )
                    )
                    fs.quarantined += 1
                    continue
                rtype, rid, vid, updated = rec.meta or (None, None, None, None)
                if rec.method == "DELETE":
                    rtype, rid = _id_from_url(rec.url)
                    if rtype is None:
                        rtype, rid = _id_from_url(rec.full_url)
                for col, val in (
                    ("lineage_key", lkey),
                    ("source_file", f.rel),
                    ("position", rec.position),
                    ("ordinal", rec.ordinal),
                    ("record_hash", rhash),
                    ("resource_type", rtype),
                    ("resource_id", rid),
                    ("version_id", vid),
                    ("last_updated", updated),
                    ("bundle_type", rec.bundle_type),
                    ("bundle_id", rec.bundle_id),
                    ("full_url", rec.full_url),
                    ("request_method", rec.method),
                    ("request_url", rec.url),
                    ("payload", None if rec.method == "DELETE" else rec.text),
                ):
                    rows[col].append(val)
                fs.loaded += 1
        t3 = time.perf_counter()
        if rows["lineage_key"]:
            import pyarrow as pa

            tbl = pa.table({c: pa.array(v, type=_COLUMNS[c]) for c, v in rows.items()})
            store.con.register("_fhir_batch", tbl)
            try:
                store.con.execute(
                    f"INSERT INTO {RAW_TABLE} SELECT lineage_key, source_file, position, ordinal, "
                    "record_hash, resource_type, resource_id, version_id, "
                    "TRY_CAST(last_updated AS TIMESTAMPTZ), bundle_type, bundle_id, full_url, "
                    "request_method, request_url, payload::JSON FROM _fhir_batch"
                )
            finally:
                store.con.unregister("_fhir_batch")
        store.quarantine(quarantine)
        t4 = time.perf_counter()
        for key, dt in (
            ("read_parse", t1 - t0),
            ("validate", t2 - t1),
            ("rows", t3 - t2),
            ("insert", t4 - t3),
            ("total", t4 - t0),
        ):
            prof[key] = prof.get(key, 0.0) + dt


def _read_batch(f: SourceFile) -> _FileBatch:
    try:
        text, lossy = _read_text(f)
    except (OSError, UnicodeError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        return _FileBatch(f, [_Rec("file", 0, "", None,
                                   problem=("broken_json", f"unreadable file: {exc}"))])  # fmt: skip
    return _FileBatch(f, list(_records(f, text, lossy)))


def _prepare_file(f: SourceFile) -> _FileBatch:
    """Pool worker: one file read, parsed, validated and hashed; parsed payloads dropped
    (only the text travels back)."""
    batch = _read_batch(f)
    _check_batches([batch])
    for rec in batch.records:
        _ = rec.hash
        rec.resource = None
    return batch


def _check_batches(batches: list[_FileBatch]) -> None:
    """Set ``problem`` (or the row metadata) on every record. Exact copies of a record
    are checked once."""
    deferred: dict[str, list[_Rec]] = {}
    parsed: dict[str, list[_Rec]] = {}
    for batch in batches:
        for rec in batch.records:
            if rec.deferred:
                deferred.setdefault(rec.text, []).append(rec)
                continue
            if rec.problem is not None or rec.method == "DELETE":
                if rec.problem is None and _id_from_url(rec.url)[0] is None:
                    rec.problem = (
                        "missing_required",
                        f"DELETE entry without a Type/id request.url ({rec.url!r})",
                    )
                continue
            res = rec.resource
            if isinstance(res, dict) and not res.get("id"):
                # PUT Type/id names the resource; a POST is identified by its fullUrl
                put = _id_from_url(rec.url) if rec.method == "PUT" else (None, None)
                uid = put[1] or _id_from_url(rec.full_url)[1]
                if uid:
                    res["id"] = uid
                    rec.text = _dumps(res)
                    rec._hash = None
            parsed.setdefault(rec.text, []).append(rec)
    texts = list(deferred)
    for text, (problem, meta) in zip(texts, process_many(texts), strict=True):
        for rec in deferred[text]:
            rec.problem, rec.meta = problem, meta
    for recs in parsed.values():
        res = recs[0].resource
        problem = _check_resource(res) or validate_resource(res)  # type: ignore[arg-type]
        for rec in recs:
            rec.problem = problem
            rec.meta = _meta_of(res) if isinstance(res, dict) else None


def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    s, i = pa.string(), pa.int64()
    return {
        "lineage_key": s,
        "source_file": s,
        "position": s,
        "ordinal": i,
        "record_hash": s,
        "resource_type": s,
        "resource_id": s,
        "version_id": s,
        "last_updated": s,
        "bundle_type": s,
        "bundle_id": s,
        "full_url": s,
        "request_method": s,
        "request_url": s,
        "payload": s,
    }


_COLUMNS = _arrow_types()
