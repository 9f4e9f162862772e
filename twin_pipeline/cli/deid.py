"""``twin deid text [--jsonl]`` and ``twin deid eval --labels FILE.jsonl``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twin_pipeline.errors import ConfigError
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("deid", help="de-identify free text; evaluate PHI recognition")
    dsub = p.add_subparsers(dest="deid_command", metavar="ACTION")

    t = dsub.add_parser("text", help="de-identify stdin to stdout (keyed, consistent surrogates)")
    t.add_argument("--jsonl", action="store_true", help='lines {"text": ...} in, {"text": ...} out')
    t.add_argument("--workers", type=int, default=1, help="worker processes (each loads spaCy)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--patient", default="", help="patient key scoping surrogates and date shift")
    t.set_defaults(func=cmd_text)

    e = dsub.add_parser("eval", help="span-level recall/precision/F2 per entity type")
    e.add_argument("--labels", required=True, type=Path, help="JSONL with text and spans")
    e.add_argument(
        "--fhir",
        type=Path,
        default=None,
        help="folder of FHIR resources for deny-lists (default: ../ehr next to the labels, "
        "as in a generated hospital; 'none' to disable)",
    )
    e.add_argument("--no-ner", action="store_true", help="patterns and deny-lists only")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--examples", type=int, default=10, help="misses/false positives to show")
    e.set_defaults(func=cmd_eval)

    def _help(_: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


def _key() -> bytes:
    ring = KeyRing(Settings.from_env().keys_dir)
    return ring.pseudonym_key()


def cmd_text(args: argparse.Namespace) -> int:
    from twin_pipeline.deid.text import NoteContext, deidentify_stream

    key = _key()
    ctx = NoteContext(patient=args.patient)
    if not args.jsonl:
        text = sys.stdin.read()
        out = next(deidentify_stream([(text, ctx)], key, workers=1))
        sys.stdout.write(out)
        return 0

    def items() -> Iterator[tuple[str, NoteContext]]:
        for i, line in enumerate(sys.stdin, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                text = d["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"bad input line: {exc}", path="<stdin>", position=f"line:{i}"
                ) from exc
            yield text, NoteContext(patient=str(d.get("patient_id", args.patient)))

    for out in deidentify_stream(items(), key, workers=args.workers, batch_size=args.batch_size):
        sys.stdout.write(json.dumps({"text": out}, ensure_ascii=False) + "\n")
    return 0


def evaluate_file(
    labels: Path, fhir: Path | None, *, use_ner: bool = True
) -> tuple[dict[str, Any], Any, float]:
    """Score the engine on a labels file; returns (report dict, report, notes/s)."""
    from twin_pipeline.deid.context import DenyIndex, deny_index_from_fhir
    from twin_pipeline.deid.evaluate import load_labels, score
    from twin_pipeline.deid.text import NoteContext, engine

    notes = load_labels(labels)
    idx = deny_index_from_fhir(fhir) if fhir is not None and fhir.is_dir() else DenyIndex()
    eng = engine(use_ner=use_ner)
    eng.set_staff(sorted(idx.staff))
    ctxs = [NoteContext(n.patient_id, idx.for_patient(n.patient_id)) for n in notes]
    t0 = time.perf_counter()
    pred = eng.analyze_batch([n.text for n in notes], ctxs)
    rate = len(notes) / max(time.perf_counter() - t0, 1e-9)
    rep = score([n.text for n in notes], [n.spans for n in notes], pred)
    doc = rep.as_dict()
    doc["notes"] = len(notes)
    doc["deny_lists"] = {"patients": len(idx.patients), "staff": len(idx.staff)}
    return doc, rep, rate


def cmd_eval(args: argparse.Namespace) -> int:
    labels: Path = args.labels
    if not labels.is_file():
        raise ConfigError("labels file not found", path=str(labels))
    fhir = args.fhir
    if fhir is None:
        guess = labels.resolve().parent.parent / "ehr"
        fhir = guess if guess.is_dir() else None
    elif str(fhir) == "none":
        fhir = None
    doc, rep, rate = evaluate_file(labels, fhir, use_ner=not args.no_ner)
    doc["notes_per_s"] = round(rate, 1)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['notes']} notes, deny-lists: {doc['deny_lists']}, {rate:.0f} notes/s (1 process)")
    print(f"{'type':15s} {'gold':>6s} {'recall':>7s} {'prec':>7s} {'F2':>7s}")
    for name, s in [
        *doc["by_type"].items(),
        ("OVERALL", doc["overall"]),
        ("ANY", doc["any_label"]),
    ]:
        print(f"{name:15s} {s['gold']:6d} {s['recall']:7.4f} {s['precision']:7.4f} {s['f2']:7.4f}")
    for m in rep.misses[: args.examples]:
        print(f"  missed {m['label']}: {m['text']!r}")
    for f in rep.false_positives[: args.examples]:
        print(f"  false positive {f['label']}: {f['text']!r}")
    return 0
