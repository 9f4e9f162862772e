"""``twin lineage trace|export|report|sign`` and ``twin audit verify``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

EXIT_TAMPERED = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from twin_pipeline.lineage.serialize import SERIALIZERS

    p = sub.add_parser("lineage", help="W3C PROV lineage: trace a value, export, auditor report")
    lsub = p.add_subparsers(dest="lineage_command", metavar="ACTION")

    t = lsub.add_parser(
        "trace",
        help="the chain from a row back to its raw source record",
        description="Follow a row of TABLE (by lineage_key, or by the value of the table's "
        "first column) back through every asset run to the source file bytes.",
    )
    t.add_argument("table", help="schema.table, e.g. deid.observation")
    t.add_argument("key", help="a lineage_key, or the value of the table's id column")
    t.add_argument("--json", action="store_true", help="print JSON with the chain's PROV-JSON")
    t.set_defaults(func=cmd_trace)

    e = lsub.add_parser("export", help="write the stored PROV graph in a standard format")
    e.add_argument("--format", choices=sorted(SERIALIZERS), default="json")
    e.add_argument("--run", help="only this run's signed bundle (run id or unique prefix)")
    e.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    e.set_defaults(func=cmd_export)

    r = lsub.add_parser("report", help="self-contained HTML report for auditors")
    r.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write")
    r.set_defaults(func=cmd_report)

    s = lsub.add_parser(
        "sign", help="close runs left without a signed PROV bundle (e.g. after a crash)"
    )
    s.set_defaults(func=cmd_sign)
    p.set_defaults(func=_help(p))

    a = sub.add_parser("audit", help="tamper evidence of the lineage and audit records")
    asub = a.add_subparsers(dest="audit_command", metavar="ACTION")
    v = asub.add_parser(
        "verify",
        help="recompute the hash chain and every signature; name the first bad record",
    )
    v.add_argument("--json", action="store_true")
    v.add_argument(
        "--tables",
        action="store_true",
        help="also check every table still has the content its last materialization recorded",
    )
    v.add_argument(
        "--deep",
        action="store_true",
        help="also rebuild each run's PROV from its ledger activity records and compare",
    )
    v.set_defaults(func=cmd_verify)
    a.set_defaults(func=_help(a))


def _help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def _open() -> Store:
    return Store.open(Settings.from_env(), read_only=True)


def cmd_trace(args: argparse.Namespace) -> int:
    from twin_pipeline.lineage import prov_build, trace

    with _open() as store:
        result = trace.trace(store, args.table, args.key)
        doc = trace.chain_document(store, result)
    if args.json:
        out = result.to_dict()
        out["verified"] = result.verified
        out["prov"] = json.loads(prov_build.to_json(doc))
        print(json.dumps(out, indent=2, default=str))
        return 0 if result.verified else EXIT_TAMPERED
    print(render_trace(result))
    return 0 if result.verified else EXIT_TAMPERED


def _yes(v: bool | None) -> str:
    return {True: "yes", False: "NO", None: "not checked"}[v]


def render_trace(result: object) -> str:
    from twin_pipeline.lineage.trace import Trace

    assert isinstance(result, Trace)
    lines = [f"{result.table} lineage_key={result.key}"]
    for i, step in enumerate(result.steps):
        arrow = "  " if i == 0 else "← "
        lines.append(
            f"{arrow}{step.table}: {step.rows} row(s) with this key, table version "
            f"{step.content_hash[:16]} ({step.table_rows:,} rows)"
            + ("" if step.version_recorded else "  [CHANGED since its recorded materialization]")
        )
        if step.activity:
            a = step.activity
            lines.append(
                f"     made by {a['asset_key']} in run {a['run_id']} as {a['user']} ({a['role']}), "
                f"{a['started_at']} → {a['ended_at']}, code {a['package']} @ {str(a['git_commit'])[:12]}"
            )
            if a.get("key_versions"):
                keys = ", ".join(f"{k} {v}" for k, v in sorted(a["key_versions"].items()))
                lines.append(f"     keys in force: {keys}")
        else:
            lines.append("     no recorded activity wrote this table")
        if step.record:
            r = step.record
            rh = r["record_hash"] or "not stored (hashed when traced)"
            lines.append(
                f"     raw record: {r['source_file']} at {r['position']}, record hash {rh}"
            )
    s = result.source
    if s is None:
        lines.append("← no raw source record found")
    else:
        lines.append(f"← source file {s.path} sha256 {s.sha256} size {s.size}")
        lines.append(f"     file on disk: {s.abs_path}")
        lines.append(f"     file bytes still match registered sha256: {_yes(s.file_sha256_ok)}")
        lines.append(
            f"     record at {s.position} matches record hash: {_yes(s.record_hash_ok)}"
            + (f" ({s.record_hash_method})" if s.record_hash_method else "")
        )
        lines.append(f"     lineage key = f(file, position, record hash): {_yes(s.lineage_key_ok)}")
        if s.note:
            lines.append(f"     note: {s.note}")
    lines.append("verified" if result.verified else "NOT VERIFIED")
    return "\n".join(lines)


def cmd_export(args: argparse.Namespace) -> int:
    from twin_pipeline.lineage import prov_build, serialize, storage

    ser = serialize.get(args.format)
    with _open() as store:
        _, problems = storage.verify_bundles(store)
        doc = storage.stored_document(store, args.run)
    for where, problem in problems:
        print(f"twin: warning: {where}: {problem}", file=sys.stderr)
    text = ser.write(doc)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if ser.read is not None:  # check what was written reads back to the same graph
        back = ser.read(args.output.read_text())
        if prov_build.canonical_records(back) != prov_build.canonical_records(doc):
            print(
                f"twin: error: {args.output} does not read back to the stored graph",
                file=sys.stderr,
            )
            return 1
    n = len(doc.get_records())
    print(f"wrote {n:,} PROV records ({args.format}) to {args.output}")
    return EXIT_TAMPERED if problems else 0


def cmd_report(args: argparse.Namespace) -> int:
    from twin_pipeline.lineage.report import build_report

    with _open() as store:
        page = build_report(store)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from twin_pipeline.lineage import runs, storage

    with Store.open(Settings.from_env()) as store:
        todo = runs.open_runs(store)
        for rid in todo:
            res = runs.finalize_run(store, rid)
            print(f"signed run {rid}: {res.activities} activities, bundle {res.sha256[:16]}")
        sealed = storage.seal(store)
    if not todo:
        print("every run already has a signed PROV bundle")
    if sealed:
        print(f"sealed ledger head at seq {sealed['seq']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from twin_pipeline.audit import verify_all

    with _open() as store:
        report = verify_all(store, tables=args.tables, deep=args.deep)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        print(
            f"ok: {report.ledger_entries:,} ledger entries chain correctly; "
            f"{report.bundles} signed PROV bundles verify"
        )
    else:
        print(f"TAMPERED: first bad record: {report.first_bad}")
        for p in report.problems[1:]:
            print(f"  also: {p}")
    return 0 if report.ok else EXIT_TAMPERED
