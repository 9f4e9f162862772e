"""``twin snapshot create`` and ``twin snapshot verify``: researcher snapshots.

``create`` exits 0 on success, 3 when refused (audited; ``twin: denied: ...``), 2 on other
errors. ``verify`` exits 0 when every hash and the signature check out, 1 otherwise, naming
each file that changed, went missing or was added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twin_pipeline.errors import AccessDenied
from twin_pipeline.paths import Settings

EXIT_DENIED = 3
EXIT_VERIFY_FAILED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "snapshot",
        help="signed, reproducible Parquet snapshots of de-identified data for researchers",
    )
    ssub = p.add_subparsers(dest="snapshot_command", metavar="ACTION")
    c = ssub.add_parser(
        "create",
        help="export de-identified tables through the access gateway (k-anonymous, signed)",
        description="Export every de-identified table the user's role may read (or --table ...) "
        "as Parquet with a signed manifest, PROV lineage and a dataset card. Reads go through "
        "the access gateway as USER; the export is audited and recorded in lineage.",
    )
    c.add_argument("--as", dest="user", required=True, help="user exporting (users.yaml)")
    c.add_argument("--cohort", type=Path, default=None, help="cohort definition (YAML)")
    c.add_argument(
        "--table",
        dest="tables",
        action="append",
        default=None,
        help="export only this schema.table (repeatable; default: the policy's tables)",
    )
    c.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    c.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_create)

    v = ssub.add_parser("verify", help="check a snapshot's file hashes and manifest signature")
    v.add_argument("dir", type=Path, help="snapshot folder")
    v.add_argument(
        "--pubkey", type=Path, default=None, help="trusted public key (PEM) the manifest must match"
    )
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)


def cmd_create(args: argparse.Namespace) -> int:
    from twin_pipeline.snapshot import create_snapshot

    try:
        result = create_snapshot(
            args.user,
            args.out,
            cohort_path=args.cohort,
            tables=args.tables,
            settings=Settings.from_env(),
            force=args.force,
        )
    except AccessDenied as exc:
        print(f"twin: denied: {exc}", file=sys.stderr)
        return EXIT_DENIED
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    dc = result.disclosure
    print(f"snapshot {result.snapshot_id[:16]} written to {result.out}")
    for t in result.tables:
        print(f"  {t['table']:<32} {t['rows']:>10,} rows  {t['file']}")
    print(
        f"  {result.rows:,} rows in {result.seconds:.2f} s; k={dc['k']}: "
        f"{dc['patients_released']} patients released, {dc['patients_suppressed']} suppressed "
        f"({dc['rows_suppressed']['total']} rows), smallest class {dc['smallest_class_size']}"
    )
    for rel, why in sorted(result.excluded.items()):
        print(f"  not exported: {rel}: {why}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from twin_pipeline.snapshot import verify

    report = verify(args.dir, args.pubkey)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        trust = "trusted key" if report.trusted_key else "key shipped in the snapshot"
        print(
            f"ok: snapshot {str(report.snapshot_id)[:16]}: {report.files_checked} files match "
            f"the manifest; signature verified with the {trust} "
            f"(fingerprint {report.key_fingerprint})"
        )
    else:
        for problem in report.problems:
            print(f"FAILED: {problem}", file=sys.stderr)
    return 0 if report.ok else EXIT_VERIFY_FAILED
