"""Mutation fuzzing of every source reader: malformed input must be quarantined, never crash.

``python -m twin_pipeline.fuzz --count 10000`` mutates valid seed records of each kind (FHIR NDJSON
and Bundle JSON, DICOM bytes, telemetry NDJSON and CSV, HL7 v2) with truncation, byte flips,
insertions, deletions, duplication, encoding changes and structural JSON damage, lands each as a
file, loads it through the reader registry into a scratch store, and checks:

* no exception escapes a reader (a crash) and no file takes longer than the hang limit;
* conservation per file: records in = records loaded + records quarantined;
* every quarantined record is in ``governance.quarantine`` with a rule and a reason.

It prints counts tried / quarantined / crashed (crashed must be 0) and exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import SHARED_DATA_DIR, Settings
from twin_pipeline.sources import SourceFile, classify, load_readers, sha256_file
from twin_pipeline.store import Store

# landing-relative folder and extension per fuzz target; the reader is whoever claims the path
TARGETS: dict[str, tuple[str, str]] = {
    "fhir_ndjson": ("ehr/bulk", ".ndjson"),
    "fhir_bundle": ("ehr/bundles", ".json"),
    "dicom": ("pacs/fuzz", ".dcm"),
    "telemetry_ndjson": ("telemetry", ".ndjson"),
    "telemetry_csv": ("telemetry", ".csv"),
    "hl7v2": ("hl7", ".hl7"),
}


class Hang(Exception):
    pass


@dataclass
class FuzzReport:
    tried: int = 0
    quarantined: int = 0  # files with at least one quarantined record
    loaded_clean: int = 0  # mutations that were still valid input
    crashed: int = 0
    hung: int = 0
    unbalanced: int = 0
    unexplained: int = 0  # quarantined without a rule or reason
    per_target: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not (self.crashed or self.hung or self.unbalanced or self.unexplained)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tried": self.tried,
            "quarantined": self.quarantined,
            "loaded_clean": self.loaded_clean,
            "crashed": self.crashed,
            "hung": self.hung,
            "unbalanced": self.unbalanced,
            "unexplained": self.unexplained,
            "per_target": self.per_target,
            "failures": self.failures[:20],
        }


# -- seeds -------------------------------------------------------------------------------------
def seed_corpus(work: Path) -> dict[str, list[bytes]]:
    """Valid inputs of every kind: a small generated hospital plus the shared real HL7 feeds."""
    from twin_pipeline.generate import generate_hospital

    hosp = work / "seed-hospital"
    generate_hospital(hosp, patients=20, seed=5)
    seeds: dict[str, list[bytes]] = {k: [] for k in TARGETS}
    for p in sorted((hosp / "ehr" / "bulk").glob("*.ndjson")):
        lines = p.read_bytes().splitlines(keepends=True)
        seeds["fhir_ndjson"].append(b"".join(lines[:5]))
    for p in sorted((hosp / "ehr" / "bundles").glob("*.json"))[:2]:
        seeds["fhir_bundle"].append(p.read_bytes())
    for p in sorted((hosp / "pacs").rglob("*.dcm"))[:6]:
        seeds["dicom"].append(p.read_bytes())
    for p in sorted((hosp / "telemetry").glob("*.ndjson"))[:1]:
        seeds["telemetry_ndjson"].append(b"".join(p.read_bytes().splitlines(keepends=True)[:20]))
    for p in sorted((hosp / "telemetry").glob("*.csv"))[:1]:
        seeds["telemetry_csv"].append(b"".join(p.read_bytes().splitlines(keepends=True)[:20]))
    hl7_dir = SHARED_DATA_DIR / "hl7v2"
    if hl7_dir.is_dir():
        seeds["hl7v2"] = [p.read_bytes() for p in sorted(hl7_dir.glob("*.hl7"))[:12]]
    else:  # pragma: no cover - shared data is present on every machine
        seeds["hl7v2"] = [
            b"MSH|^~\\&|A|B|C|D|20240101120000||ORU^R01|1|P|2.5\rPID|||123\r"
            b"OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F|||20240101120000\r"
        ]
    return {k: v for k, v in seeds.items() if v}


# -- mutations ---------------------------------------------------------------------------------
def _truncate(d: bytes, r: random.Random) -> bytes:
    return d[: r.randrange(0, max(1, len(d)))]


def _flip(d: bytes, r: random.Random) -> bytes:
    b = bytearray(d)
    for _ in range(r.randint(1, 8)):
        if b:
            b[r.randrange(len(b))] = r.randrange(256)
    return bytes(b)


def _insert(d: bytes, r: random.Random) -> bytes:
    i = r.randrange(len(d) + 1)
    junk = r.choice(
        [
            bytes(r.randrange(256) for _ in range(r.randint(1, 64))),
            b"\x00" * r.randint(1, 16),
            b'{"resourceType": "Spaceship"}\n',
            b"\xef\xbb\xbf",
            b"\r\n\r\n",
            b'","value": NaN, "x": [[[[',
            b"|^~\\&|",
            "é中文🙂".encode(),
        ]
    )
    return d[:i] + junk + d[i:]


def _delete(d: bytes, r: random.Random) -> bytes:
    if len(d) < 2:
        return b""
    i = r.randrange(len(d) - 1)
    return d[:i] + d[i + r.randint(1, min(256, len(d) - i)) :]


def _duplicate(d: bytes, r: random.Random) -> bytes:
    if not d:
        return d
    i = r.randrange(len(d))
    j = min(len(d), i + r.randint(1, 512))
    return d[:j] + d[i:j] + d[j:]


def _encoding(d: bytes, r: random.Random) -> bytes:
    text = d.decode("utf-8", "replace")
    return text.encode(r.choice(["utf-16", "utf-32", "latin-1"]), "replace")


def _json_damage(d: bytes, r: random.Random) -> bytes:
    """Parse-able JSON with wrong structure: wrong types, missing keys, huge numbers, deep nests."""
    out = []
    for line in d.splitlines() or [d]:
        try:
            obj = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        out.append(json.dumps(_damage(obj, r)).encode())
    return b"\n".join(out) + b"\n"


def _damage(obj: Any, r: random.Random, depth: int = 0) -> Any:
    if isinstance(obj, dict) and obj:
        key = r.choice(sorted(obj))
        choice = r.randrange(6)
        if choice == 0:
            del obj[key]
        elif choice == 1:
            obj[key] = r.choice([None, 1e308, -1, "", [], {}, True, "9" * 400, [[[[[]]]]]])
        elif choice == 2:
            obj[key] = {"nested": obj.get(key)}
        elif choice == 3 and depth < 6:
            obj[key] = _damage(obj[key], r, depth + 1)
        elif choice == 4:
            obj["\u0000" + key] = obj.pop(key)
        else:
            obj[key] = str(obj[key])[::-1]
        return obj
    if isinstance(obj, list) and obj:
        i = r.randrange(len(obj))
        obj[i] = _damage(obj[i], r, depth + 1)
        return obj
    return r.choice([None, "x", 0, -99999, float("1e300")])


MUTATORS: list[Callable[[bytes, random.Random], bytes]] = [
    _truncate,
    _flip,
    _insert,
    _delete,
    _duplicate,
    _encoding,
    _json_damage,
]


def mutate(data: bytes, r: random.Random) -> bytes:
    for _ in range(r.randint(1, 3)):
        data = r.choice(MUTATORS)(data, r)
    return data


def generate_inputs(
    seeds: dict[str, list[bytes]], count: int, seed: int
) -> Iterator[tuple[str, bytes]]:
    r = random.Random(seed)
    names = sorted(seeds)
    for _ in range(count):
        target = r.choice(names)
        yield target, mutate(r.choice(seeds[target]), r)


# -- running -----------------------------------------------------------------------------------
def _alarm(_sig: int, _frame: FrameType | None) -> None:
    raise Hang()


def check_inputs(
    inputs: Iterator[tuple[str, bytes]] | list[tuple[str, bytes]],
    work: Path,
    *,
    hang_s: float = 10.0,
) -> FuzzReport:
    """Land each input as its own file and load it, alone, through the reader that claims it
    (one file per load, so a crash is pinned to its input)."""
    home = work / "home"
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init(if_missing=True)
    readers = load_readers()
    report = FuzzReport()
    landing = work / "landing"
    with Store.open(settings) as store:
        for counter, (target, data) in enumerate(inputs):
            folder, ext = TARGETS[target]
            rel = f"{folder}/fuzz-{counter:06d}{ext}"
            path = landing / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            kind = classify(rel, readers)
            if kind is None:
                report.failures.append(f"{rel}: no reader claims fuzz target {target}")
                report.unexplained += 1
                continue
            f = SourceFile(path, rel, kind, sha256_file(path), path.stat().st_size)
            _check_one(store, readers[kind], target, f, report, hang_s)
    return report


def _check_one(
    store: Store, reader: Any, target: str, f: SourceFile, report: FuzzReport, hang_s: float
) -> None:
    t = report.per_target.setdefault(target, {"tried": 0, "quarantined": 0, "crashed": 0})
    report.tried += 1
    t["tried"] += 1
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        with store.transaction():
            reader.ensure_tables(store)
            stats = reader.load([f], store)
            fs = stats.file(f.rel)
            q = store.con.execute(
                "SELECT count(*), count(*) FILTER (WHERE coalesce(rule, '') = '' "
                "OR coalesce(reason, '') = '') FROM governance.quarantine WHERE source_file = ?",
                [f.rel],
            ).fetchone()
            assert q is not None
            raise _Rollback(fs.records_in, fs.loaded, fs.quarantined, int(q[0]), int(q[1]))
    except _Rollback as rb:
        if rb.records_in != rb.loaded + rb.quarantined:
            report.unbalanced += 1
            report.failures.append(
                f"{f.rel}: in={rb.records_in} loaded={rb.loaded} quarantined={rb.quarantined}"
            )
        if rb.quarantined and (rb.q_rows == 0 or rb.q_bad):
            report.unexplained += 1
            report.failures.append(f"{f.rel}: quarantined without a stored rule and reason")
        if rb.quarantined:
            report.quarantined += 1
            t["quarantined"] += 1
        else:
            report.loaded_clean += 1
    except Hang:
        report.hung += 1
        report.failures.append(f"{f.rel}: no result within {hang_s} s")
    except Exception as exc:
        report.crashed += 1
        t["crashed"] += 1
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        report.failures.append(f"{f.rel} ({target}): {tb}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _Rollback(Exception):
    """Carries one file's figures out of its transaction, which is then rolled back."""

    def __init__(self, records_in: int, loaded: int, quarantined: int, q_rows: int, q_bad: int):
        super().__init__("rollback")
        self.records_in, self.loaded, self.quarantined = records_in, loaded, quarantined
        self.q_rows, self.q_bad = q_rows, q_bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twin_pipeline.fuzz")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hang-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="twin-fuzz-"))
    try:
        t0 = time.perf_counter()
        seeds = seed_corpus(work)
        report = check_inputs(
            generate_inputs(seeds, args.count, args.seed), work, hang_s=args.hang_seconds
        )
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report.to_dict() | {"seconds": round(elapsed, 1)}, indent=2))
    else:
        print(
            f"tried {report.tried}, quarantined {report.quarantined}, still valid "
            f"{report.loaded_clean}, crashed {report.crashed}, hung {report.hung}, "
            f"unbalanced {report.unbalanced}, unexplained {report.unexplained} "
            f"({elapsed:.0f} s)"
        )
        for target, t in sorted(report.per_target.items()):
            print(f"  {target:18s} {t}")
        for line in report.failures[:20]:
            print(f"  ! {line}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
