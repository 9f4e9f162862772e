"""``twin ehr report``: what happened to every FHIR record, per resource type and per file."""

from __future__ import annotations

import argparse
import json

from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ehr", help="EHR (FHIR R4) harmonization report")
    esub = p.add_subparsers(dest="ehr_command", metavar="ACTION")
    r = esub.add_parser(
        "report",
        help="per resource type: harmonized/quarantined (with reasons); per file: conservation",
    )
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
    p.set_defaults(func=cmd_report, json=False)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        return _report(args)
    except BrokenPipeError:  # `twin ehr report | head`
        import os
        import sys

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _report(args: argparse.Namespace) -> int:
    from twin_pipeline.harmonize import fhir as ehr

    with Store.open(Settings.from_env(), read_only=True) as store:
        types = ehr.type_report(store)
        files = ehr.conservation(store)
    unbalanced = [f for f in files if not f["balanced"]]
    if args.json:
        print(json.dumps({"types": types, "files": files}, indent=2, sort_keys=True))
        return 1 if unbalanced else 0
    print(f"{'resource type':22s} {'table':20s} {'raw':>7s} {'harmonized':>10s} "
          f"{'superseded':>10s} {'duplicate':>9s} {'deleted':>7s} {'quarantined':>11s}  reasons")  # fmt: skip
    for rtype, d in sorted(types.items()):
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(d["reasons"].items()))
        print(
            f"{rtype:22s} {d['table'] or '(raw only)':20s} {d['raw']:>7,} {d['harmonized']:>10,} "
            f"{d['superseded']:>10,} {d['duplicate']:>9,} {d['delete']:>7,} "
            f"{d['quarantined']:>11,}  {reasons}"
        )
    print()
    print(f"{'file':50s} {'in':>7s} {'harm.':>7s} {'quar.':>6s} {'sup.':>5s} {'dup.':>5s} "
          f"{'del.':>5s} {'raw':>5s}  balanced")  # fmt: skip
    for f in files:
        print(
            f"{f['file'][:50]:50s} {f['in']:>7,} {f['harmonized']:>7,} {f['quarantined']:>6,} "
            f"{f['superseded']:>5,} {f['duplicate']:>5,} {f['deletes']:>5,} {f['raw_only']:>5,}  "
            f"{'yes' if f['balanced'] else 'NO'}"
        )
    return 1 if unbalanced else 0
