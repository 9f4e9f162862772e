"""FHIR R4 reader (kind ``fhir``): Bundles, Bulk Data NDJSON (plain or gzip) and single resources.

Every resource is validated once, when its file is first loaded, with the ``fhir.resources``
R4B models (FHIR 4.3, wire-compatible with R4; see ``assets/ehr_fhir.yaml``) plus the required
bindings the models record but do not enforce. Valid resources become rows of
``raw.fhir_resource``; the rest go to quarantine with a rule, a reason naming the field, and
their position (``line:N``, ``entry:N``, ``file``). Bundle entries with ``request.method =
DELETE`` become rows without payload so the deletion is kept.

Validation is the expensive part: the models run ~8,000 resources/s per core. The model
decides every verdict, but it runs once per resource *shape*; resources of a known shape have
their primitive values validated in bulk with the models' own field types, each distinct
value once (:mod:`twin_pipeline.harmonize.fhir_fastcheck`). An NDJSON line of a shape already
accepted is checked straight from its text, neither parsed nor walked (``TextShapes``); the
other lines are parsed and validated. Large chunks of lines go to a process pool
(``TWIN_FHIR_WORKERS``, default: the idle cores) while this process inserts the lines already
decided; exact copies of a record are checked once. Files are loaded in chunks of bounded
size.
"""

from __future__ import annotations

import functools
import gc
import gzip
import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from twin_pipeline.memory import release as release_memory
from twin_pipeline.procs import usable_cores
from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import BATCH, QuarantineRow, Store, execute_over, lineage_key

RAW_TABLE = "raw.fhir_resource"
DDL = f"""
CREATE TABLE IF NOT EXISTS {RAW_TABLE} (
    -- digests and ids, (nearly) all distinct: uncompressed, they cost about half the write
    -- CPU (dictionary/FSST analysis of every value) for about twice the bytes
    lineage_key VARCHAR USING COMPRESSION uncompressed,
    source_file VARCHAR,
    position VARCHAR,        -- line:N | entry:N | line:N/entry:M | file
    ordinal BIGINT,          -- record order inside the file
    record_hash VARCHAR USING COMPRESSION uncompressed, -- sha256 of the resource JSON as received
    resource_type VARCHAR,
    resource_id VARCHAR USING COMPRESSION uncompressed,
    version_id VARCHAR,
    last_updated TIMESTAMPTZ,
    bundle_type VARCHAR,
    bundle_id VARCHAR,
    full_url VARCHAR,
    request_method VARCHAR,  -- Bundle entry request.method (DELETE rows have no payload)
    request_url VARCHAR,
    -- zstd: DuckDB's default for strings (dictionary/FSST, analysed at checkpoint) cost
    -- ~16 us a payload, as much as validating it; zstd ~3 us, and the file is smaller
    payload JSON USING COMPRESSION zstd
)
"""
PARALLEL_MIN = 4_000  # distinct NDJSON lines in a chunk before the process pool pays
PRIME_PER_FILE = 32  # first lines of each file checked before the pool forks (see _check_stream)
FLUSH_ROWS = 4_096  # raw rows per INSERT while the pool still works
PARALLEL_MIN_BYTES = 4 << 20  # JSON (Bundle) bytes in a chunk before files go to the pool
#: Seconds per stage of the last :meth:`FhirReader.load` in this process (for benchmarks).
LAST_PROFILE: dict[str, float] = {}
CHUNK = 500
MAX_PAYLOAD_IN_QUARANTINE = 200_000
CHUNK_BYTES = 64 << 20  # files are read, validated and inserted in chunks of this size
# A plain NDJSON file larger than this is read in pieces of about this size (whole lines), so
# one big file (Observation.ndjson: 175 MB at 10k patients) does not make a chunk of its own
# size: the records of a chunk in Python cost ~3x its bytes (issue #11: peak memory).
PIECE_BYTES = CHUNK_BYTES // 4
_NAME_RE = re.compile(r"^([A-Z][A-Za-z]+)(?:[._-][^/]*)?\.(?:ndjson|json)(?:\.gz)?$")
_URL_TAIL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_DATE_ERRORS = ("Date value", "DateTime value", "Instant value", "Time value")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"


def _loads(text: str, surrogates: bool = True) -> Any:
    """``json.loads`` for JSON as FHIR means it: a ``ValueError`` for anything that is not
    storable JSON text (NaN/Infinity, nesting too deep to walk and, with ``surrogates``,
    unpaired UTF-16 surrogates; Bundle entries are checked for those one by one)."""
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    try:
        obj = _DECODER.decode(text)
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


# One decoder for every record (``json.loads`` with an argument builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


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


def _fast() -> Any:
    global _FAST
    if _FAST is None:
        from twin_pipeline.harmonize.fhir_fastcheck import FastValidator

        _FAST = FastValidator(validate_full)
        _FAST.enabled = os.environ.get("TWIN_FHIR_FASTCHECK", "1") != "0"
    return _FAST


def _model_for(resource: dict[str, Any]) -> Any:
    return _model(str(resource.get("resourceType")))


def validate_resource(resource: dict[str, Any]) -> tuple[str, str] | None:
    """Validate like :func:`validate_full`, through the shape cache of
    :mod:`twin_pipeline.harmonize.fhir_fastcheck` (same verdicts, far fewer model runs)."""
    fast = _fast()
    if not fast.enabled:
        return validate_full(resource)
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not is_resource_type(rtype):
        return validate_full(resource)
    try:
        verdict: tuple[str, str] | None = fast.validate(resource, _model(rtype), _check_bindings)
    except RecursionError:
        return "validation_failed", f"{rtype}: nested too deeply to validate"
    return verdict


def validate_resources(resources: Sequence[Any]) -> list[tuple[str, str] | None]:
    """:func:`_check_resource`, then :func:`validate_resource`, over many resources at once:
    resources of one shape have their leaves checked together (one adapter call per field
    type and shape, only values not seen before)."""
    out: list[tuple[str, str] | None] = [None] * len(resources)
    idx: list[int] = []
    for i, res in enumerate(resources):
        problem = _check_resource(res)
        if problem is None:
            idx.append(i)
        else:
            out[i] = problem
    todo = [resources[i] for i in idx]
    fast = _fast()
    verdicts: list[tuple[str, str] | None]
    if not fast.enabled:
        verdicts = [validate_full(r) for r in todo]
    else:
        try:
            verdicts = fast.validate_many(todo, _model_for, _check_bindings)
        except RecursionError:  # one resource nested too deeply: take them one by one
            verdicts = [validate_resource(r) for r in todo]
    for i, verdict in zip(idx, verdicts, strict=True):
        out[i] = verdict
    return out


def reset_validation() -> None:
    """Forget compiled shapes, adapters and known-valid values (benchmarks start cold)."""
    global _FAST, _TEXT
    from twin_pipeline.harmonize import fhir_fastcheck

    _FAST = _TEXT = None
    fhir_fastcheck._VALID.clear()
    fhir_fastcheck._ADAPTERS.clear()


def validation_stats() -> dict[str, int]:
    """Shapes compiled and resources validated fast / by the full model in this process
    (``text_fast``: straight from the text, neither parsed nor walked)."""
    out = dict(_FAST.stats) if _FAST is not None else {}
    if _TEXT is not None:
        out.update(_TEXT.stats)
    return out


def _warm(_: int = 0) -> int:
    """Import what validation needs (spec, the models of every mapped type) once, before
    the pool forks, so workers inherit it instead of each importing it again."""
    from twin_pipeline.harmonize.fhir_fastcheck import import_element_models
    from twin_pipeline.harmonize.fhir_spec import load_spec

    _bindings()
    models = [_model(n) for n in ("Bundle", *load_spec().mapped_types) if is_resource_type(n)]
    import_element_models(models)  # the data types they use (imported lazily otherwise)
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
        from twin_pipeline.procs import freeze_for_fork, worker_init

        freeze_for_fork()  # until shutdown_pool: the workers share the parent's pages
        _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init)
    return _POOL


def _pool_broke() -> None:
    """A worker of the pool died: say so once, and let the next chunk start a new pool (the
    batches the broken one held are checked in this process by the caller)."""
    import warnings

    if _POOL is not None:
        warnings.warn(
            "a FHIR validation worker process died (killed, or out of memory); its records "
            "are validated in this process",
            stacklevel=3,
        )
        shutdown_pool()


def shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        from twin_pipeline.procs import unfreeze_after_pool

        try:
            _POOL.shutdown(cancel_futures=True)
        finally:
            _POOL = None
            unfreeze_after_pool()


def _workers() -> int:
    """Validation processes: ``TWIN_FHIR_WORKERS`` if set, else the cores not busy with other
    work now (:func:`_busy`), so the pool is used when it can pay: on a machine whose cores
    are all taken, forked workers only add copying and switching."""
    try:
        asked = int(os.environ.get("TWIN_FHIR_WORKERS", "0"))
    except ValueError:
        asked = 0
    if asked > 0:
        return asked
    cores = usable_cores()
    return max(1, min(cores, round(cores - _busy())))


# How long _busy watches at most (samples x seconds apart).
BUSY_SAMPLES, BUSY_INTERVAL = 10, 0.01


def _busy() -> float:
    """Cores taken by other work: the fewest runnable tasks, besides this process's own
    running threads, seen in up to :data:`BUSY_SAMPLES` looks at ``/proc/loadavg``
    (:data:`BUSY_INTERVAL` s apart; the first that sees none ends the watch). One look counts
    any task that happens to run at that instant: a monitor sampling the pipeline's memory
    (the benchmark's took ~50 ms every 200 ms), a DuckDB checkpoint. On two cores that one
    look could take the pool from two workers to one (the 10k-patient ``raw/fhir`` step: ~57 s
    with one worker, ~35-41 s with two). Else the 1-minute load average."""
    fewest: int | None = None
    for i in range(BUSY_SAMPLES):
        if i:
            time.sleep(BUSY_INTERVAL)
        running = _running_now()
        if running is None:
            break
        others = max(0, running - _own_running())
        fewest = others if fewest is None else min(fewest, others)
        if fewest == 0:
            break
    if fewest is not None:
        return float(fewest)
    try:
        return max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        return 0.0


def _running_now() -> int | None:
    """Tasks running or runnable on the machine now (``/proc/loadavg``), None if unknown."""
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _own_running() -> int:
    """Threads of this process that are running or runnable now (at least this one)."""
    n = 0
    try:
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"{task.path}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            state = stat.rindex(")") + 2  # the state field follows the parenthesized name
            if stat[state : state + 1] == "R":
                n += 1
    except OSError:
        pass
    return max(1, n)


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
    return _process_texts([text])[0]


def _process_texts(texts: Sequence[str]) -> list[_Verdict]:
    """Parse and validate NDJSON lines (in a pool worker for large batches), ``CHUNK`` at a
    time with the cyclic garbage collector paused: parsed JSON holds no cycles, and a
    collection pass over thousands of live parsed records costs more than parsing them."""
    paused = gc.isenabled()
    gc.disable()
    try:
        out: list[_Verdict] = []
        for i in range(0, len(texts), CHUNK):
            out += _process_chunk(texts[i : i + CHUNK])
        return out
    finally:
        if paused:
            gc.enable()


def _process_chunk(texts: Sequence[str]) -> list[_Verdict]:
    """Lines of a known text shape are decided from their text (:class:`TextShapes`); the
    first line of each new skeleton is parsed and validated, teaching its shape; then the
    other lines are tried again, and what is left is parsed and validated."""
    text = _text_shapes()
    if text is None:
        return _parse_and_validate(texts, None)
    skeletons: list[str | None] = [None] * len(texts)
    out = text.check_many(texts, _check_bindings, skeletons)
    first: dict[str, int] = {}
    later: list[int] = []
    now: list[int] = []
    for i, verdict in enumerate(out):
        if verdict is not None:
            continue
        skel = skeletons[i]
        if skel is None or skel not in first:
            if skel is not None:
                first[skel] = i
            now.append(i)
        else:
            later.append(i)
    for i, v in zip(now, _parse_and_validate([texts[i] for i in now], text), strict=True):
        out[i] = v
    if later:
        again = text.check_many([texts[i] for i in later], _check_bindings)
        rest = [i for i, v in zip(later, again, strict=True) if v is None]
        for i, v in zip(later, again, strict=True):
            out[i] = v
        for i, v in zip(rest, _parse_and_validate([texts[i] for i in rest], text), strict=True):
            out[i] = v
    return out  # type: ignore[return-value]


def _parse_and_validate(texts: Sequence[str], text: Any) -> list[_Verdict]:
    """Parse, then validate with the models (through the shape cache); resources accepted
    teach ``text`` (a :class:`TextShapes`, or None) their text shape."""
    objs: list[Any] = []
    problems: list[tuple[str, str] | None] = []
    for t in texts:
        try:
            objs.append(_loads(t))
            problems.append(None)
        except ValueError as exc:
            objs.append(None)
            problems.append(("broken_json", f"invalid JSON: {exc}"))
    idx = [k for k, p in enumerate(problems) if p is None]
    for k, verdict in zip(idx, validate_resources([objs[k] for k in idx]), strict=True):
        problems[k] = verdict
        if verdict is None and text is not None:  # accepted: its text shape can go fast
            res = objs[k]
            rtype = res["resourceType"]
            text.learn(texts[k], res, _model(rtype), _bindings().get(rtype, {}))
    return [
        (p, _meta_of(o) if isinstance(o, dict) else None)
        for p, o in zip(problems, objs, strict=True)
    ]


_TEXT: Any = None


def _text_shapes() -> Any:
    """The text-shape checker of this process (None when the fast check is switched off)."""
    global _TEXT
    if not _fast().enabled:
        return None
    if _TEXT is None:
        from twin_pipeline.harmonize.fhir_fastcheck import TextShapes

        _TEXT = TextShapes()
    return _TEXT


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
    _check_utf16(data)
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        if not f.rel.endswith((".ndjson", ".ndjson.gz")):
            raise
        return data.decode("utf-8-sig", "surrogateescape"), True


def _check_utf16(data: bytes) -> None:
    if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") or data[:2] in (
        b"\xff\xfe",
        b"\xfe\xff",
    ):
        raise UnicodeError("file is UTF-16/UTF-32 encoded: FHIR JSON must be UTF-8")


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


def _records(
    f: SourceFile, text: str, lossy: bool = False, *, first_line: int = 0, first_ordinal: int = 0
) -> Iterator[_Rec]:
    """The records of a file's text (or of a piece of an NDJSON file whose lines start after
    ``first_line`` lines and ``first_ordinal`` records)."""
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
    ordinal = first_ordinal
    for n, line in enumerate(text.split("\n"), first_line + 1):
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


_PLAIN = frozenset({str, type(None)})


def _unstorable(rec: _Rec) -> tuple[str, str] | None:
    """Values the model accepted but a raw row cannot hold as text (a non-string id, ...)."""
    rtype, rid, vid, updated = rec.meta or (None, None, None, None)
    plain = _PLAIN
    if not (  # the common case, once per record (620k at 10k): every value str or None
        type(rid) in plain
        and type(vid) in plain
        and type(updated) in plain
        and type(rec.bundle_type) in plain
        and type(rec.bundle_id) in plain
        and type(rec.full_url) in plain
        and type(rec.url) in plain
    ):
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
        """Load in chunks of files (and pieces of large NDJSON files) of bounded total size
        (memory stays bounded)."""
        stats = LoadStats(self.kind)
        prof: dict[str, float] = {}
        chunk: list[SourceFile | _Piece] = []
        size = 0
        try:
            for f in _units(files):
                chunk.append(f)
                size += f.size
                if size >= CHUNK_BYTES:
                    self._load_chunk(chunk, store, stats, prof)
                    chunk, size = [], 0
                    release_memory()  # the chunk's Arrow batches and heap, before the next
            if chunk:
                self._load_chunk(chunk, store, stats, prof)
        finally:
            shutdown_pool()
        LAST_PROFILE.clear()
        LAST_PROFILE.update(prof)
        return stats

    def _load_chunk(
        self,
        files: Sequence[SourceFile | _Piece],
        store: Store,
        stats: LoadStats,
        prof: dict[str, float],
    ) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        # Bundle/JSON files are parsed, validated and hashed whole in the pool when there are
        # enough of them; NDJSON lines are read here and validated in chunks (_check_stream),
        # by the pool when there are enough of them, while this process turns the records
        # already decided into raw rows and inserts them.
        # The pool size is decided only for a chunk big enough to use a pool: deciding it
        # watches the machine for up to 0.1 s (_busy), which a small file (a watch round, a
        # fuzz input) would pay on every load while another process runs.
        workers = 0
        whole = [
            f
            for f in files
            if isinstance(f, SourceFile) and not f.rel.endswith((".ndjson", ".ndjson.gz"))
        ]
        if sum(f.size for f in whole) >= PARALLEL_MIN_BYTES:
            workers = _workers()
        if workers < 2:
            whole = []
        futures = {f.rel: _pool(workers).submit(_prepare_file, f) for f in whole}
        local = [
            _read_piece(f) if isinstance(f, _Piece) else _read_batch(f)
            for f in files
            if isinstance(f, _Piece) or f.rel not in futures
        ]
        if not workers:
            deferred = sum(1 for b in local for r in b.records if r.deferred)
            workers = _workers() if deferred >= PARALLEL_MIN else 1
        stats.workers = max(stats.workers or 0, workers)
        t1, c1 = time.perf_counter(), time.process_time()
        rows: list[tuple[Any, ...]] = []
        quarantine: list[QuarantineRow] = []
        for ready in _check_stream(local, workers):
            for batch in ready:
                self._rows(batch, stats, rows, quarantine)
            if len(rows) >= FLUSH_ROWS:
                _insert(store, rows)
                rows = []
        for f in whole:  # the files sent to the pool, in order
            try:
                try:
                    batch = futures[f.rel].result()
                except BrokenProcessPool:  # a worker died (killed, out of memory): read it here
                    _pool_broke()
                    batch = _prepare_file(f)
            except Exception as exc:  # it cannot be read at all: quarantined, not lost
                batch = _FileBatch(f, [_Rec("file", 0, "", None, problem=(
                    "validation_failed", f"file could not be validated: {exc!r}"))])  # fmt: skip
            self._rows(batch, stats, rows, quarantine)
            # inserted while the pool still checks the next files, not all after it is done
            if len(rows) >= FLUSH_ROWS:
                _insert(store, rows)
                rows = []
        t2, c2 = time.perf_counter(), time.process_time()
        _insert(store, rows)
        store.quarantine(quarantine)
        t3, c3 = time.perf_counter(), time.process_time()
        for key, dt in (
            ("read", t1 - t0),
            ("validate_rows_insert", t2 - t1),
            ("insert_last", t3 - t2),
            ("total", t3 - t0),
            ("cpu_read", c1 - c0),
            ("cpu_validate_rows_insert", c2 - c1),
            ("cpu_insert_last", c3 - c2),
            ("cpu_total", c3 - c0),
        ):
            prof[key] = prof.get(key, 0.0) + dt

    def _rows(
        self,
        batch: _FileBatch,
        stats: LoadStats,
        rows: list[tuple[Any, ...]],
        quarantine: list[QuarantineRow],
    ) -> None:
        """Raw rows (appended to ``rows``) or quarantine rows of one file's decided records."""
        f = batch.file
        fs = stats.file(f.rel)
        fs.records_in += len(batch.records)  # a large NDJSON file comes in several batches
        loaded = 0
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
            rows.append(
                (lkey, f.rel, rec.position, rec.ordinal, rhash, rtype, rid, vid, updated,
                 rec.bundle_type, rec.bundle_id, rec.full_url, rec.method, rec.url,
                 None if rec.method == "DELETE" else rec.text)
            )  # fmt: skip
            loaded += 1
        fs.loaded += loaded


def _insert(store: Store, rows: list[tuple[Any, ...]]) -> None:
    """One INSERT of raw rows (an Arrow batch, columns as in :data:`_COLUMNS`)."""
    if not rows:
        return
    import pyarrow as pa

    columns = list(zip(*rows, strict=True))
    tbl = pa.table(
        {c: pa.array(v, type=t) for (c, t), v in zip(_COLUMNS.items(), columns, strict=True)}
    )
    del columns
    execute_over(
        store.con,
        f"INSERT INTO {RAW_TABLE} SELECT lineage_key, source_file, position, ordinal, "
        "record_hash, resource_type, resource_id, version_id, "
        "TRY_CAST(last_updated AS TIMESTAMPTZ), bundle_type, bundle_id, full_url, "
        f"request_method, request_url, payload::JSON FROM {BATCH}",
        tbl,
    )


@dataclass
class _Cursor:
    """Where the next piece of a file starts: lines and records before it."""

    lines: int = 0
    records: int = 0
    failed: bool = False  # the file could not be read: one "file" record, as if read whole


@dataclass
class _Piece:
    """The lines of ``file`` that start in bytes [lo, hi); the pieces of a file are read in
    order (each one's line numbers and ordinals follow the previous piece's, via ``cursor``)."""

    file: SourceFile
    lo: int
    hi: int
    cursor: _Cursor

    @property
    def size(self) -> int:
        return self.hi - self.lo


def _units(files: Sequence[SourceFile]) -> Iterator[SourceFile | _Piece]:
    """Files, with plain NDJSON files over ``PIECE_BYTES`` cut into pieces."""
    for f in files:
        if f.size <= PIECE_BYTES or not f.rel.endswith(".ndjson"):
            yield f
            continue
        cursor = _Cursor()
        for lo in range(0, f.size, PIECE_BYTES):
            yield _Piece(f, lo, min(lo + PIECE_BYTES, f.size), cursor)


def _piece_bytes(piece: _Piece) -> bytes:
    with piece.file.path.open("rb") as fh:
        if piece.lo > 0:
            fh.seek(piece.lo - 1)
            fh.readline()  # the line that started before lo belongs to the previous piece
        start = fh.tell()
        if start >= piece.hi:
            return b""
        data = fh.read(piece.hi - start)
        if data and not data.endswith(b"\n"):
            data += fh.readline()  # the last line that starts in this piece, whole
        return data


def _read_piece(piece: _Piece) -> _FileBatch:
    """One piece of a large NDJSON file: the same records, positions and ordinals as the
    whole file read at once would give (UTF-16/32 and the BOM are looked for at its start)."""
    f, cur = piece.file, piece.cursor
    if cur.failed:
        return _FileBatch(f, [])
    try:
        data = _piece_bytes(piece)
        if piece.lo == 0:
            _check_utf16(data)
        enc = "utf-8-sig" if piece.lo == 0 else "utf-8"
        try:
            text, lossy = data.decode(enc), False
        except UnicodeDecodeError:
            text, lossy = data.decode(enc, "surrogateescape"), True
    except (OSError, UnicodeError) as exc:
        cur.failed = True
        return _FileBatch(f, [_Rec("file", 0, "", None,
                                   problem=("broken_json", f"unreadable file: {exc}"))])  # fmt: skip
    records = list(_records(f, text, lossy, first_line=cur.lines, first_ordinal=cur.records))
    cur.lines += text.count("\n")
    cur.records += len(records)
    return _FileBatch(f, records)


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
    """Set ``problem`` (or the row metadata) on every record (in this process)."""
    for _ in _check_stream(batches, 1):
        pass


def _check_stream(batches: list[_FileBatch], workers: int) -> Iterator[list[_FileBatch]]:
    """Set ``problem`` (or the row metadata) on every record of ``batches``, yielding runs of
    batches, in order, as soon as all their records are decided (so the caller can insert
    them while the pool checks the next lines). Exact copies of a record are checked once.

    NDJSON lines go to the process pool when there are at least ``PARALLEL_MIN`` of them
    and ``workers`` > 1; the first lines of every file are checked here first, so the forked
    workers inherit the compiled shapes and known values instead of each building them."""
    deferred: dict[str, list[_Rec]] = {}
    parsed: dict[str, list[_Rec]] = {}
    for batch in batches:
        for rec in batch.records:
            if rec.deferred:
                got = deferred.get(rec.text)
                if got is None:
                    deferred[rec.text] = [rec]
                else:
                    got.append(rec)
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

    def decide(lo: int, verdicts: list[_Verdict], idx: Sequence[int] | None = None) -> None:
        for k, (problem, meta) in enumerate(verdicts):
            for rec in deferred[texts[idx[k] if idx is not None else lo + k]]:
                rec.problem, rec.meta = problem, meta

    use_pool = workers > 1 and len(texts) >= PARALLEL_MIN
    pending: list[tuple[int, Any]] = []  # (end index, future of texts[..end])
    if use_pool:
        index = {t: i for i, t in enumerate(texts)}
        primed: list[int] = []
        if _POOL is None:  # first use: check a sample here, then fork
            for batch in batches:
                firsts = {index[r.text] for r in batch.records[:PRIME_PER_FILE] if r.deferred}
                primed.extend(sorted(firsts))
            decide(0, _process_texts([texts[i] for i in primed]), primed)
        pool = _pool(workers)
        skip = set(primed)
        rest = [i for i in range(len(texts)) if i not in skip] if skip else range(len(texts))
        for k in range(0, len(rest), CHUNK):
            part = rest[k : k + CHUNK]
            fut = pool.submit(_process_texts, [texts[i] for i in part])
            pending.append((part[-1] + 1, (fut, part)))
        last = [max((index[r.text] for r in b.records if r.deferred), default=-1) for b in batches]
    # Bundle entries (already parsed) are checked here, meanwhile.
    groups = list(parsed.values())
    verdicts = validate_resources([recs[0].resource for recs in groups])
    for recs, problem in zip(groups, verdicts, strict=True):
        res = recs[0].resource
        for rec in recs:
            rec.problem = problem
            rec.meta = _meta_of(res) if isinstance(res, dict) else None
    if not use_pool:
        decide(0, _process_texts(texts))
        yield batches
        return
    done = 0
    for end, (fut, part) in pending:
        try:
            checked = fut.result()
        except BrokenProcessPool:  # a worker died (killed, out of memory): check them here
            _pool_broke()
            checked = _process_texts([texts[i] for i in part])
        decide(0, checked, part)
        ready = []
        while done < len(batches) and last[done] < end:
            ready.append(batches[done])
            done += 1
        if ready:
            yield ready
    if done < len(batches):
        yield batches[done:]


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
