"""``twin quality report [--json]``, ``run``, ``docs`` and ``suites``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quality", help="data-quality suites and their latest results")
    qsub = q.add_subparsers(dest="quality_command", metavar="ACTION")

    r = qsub.add_parser("report", help="summary of the latest run of every suite")
    r.add_argument("--json", action="store_true", help='{"checks": [{suite, expectation, ...}]}')
    r.add_argument("--failed", action="store_true", help="only expectations that failed")
    r.set_defaults(func=cmd_report)

    run = qsub.add_parser("run", help="run suites on the store now (quarantines failing rows)")
    run.add_argument("--table", action="append", help="schema.table to check (repeatable)")
    run.add_argument("--as-of", help="ISO-8601 time freshness is measured against")
    run.add_argument("--no-quarantine", action="store_true", help="report only, change nothing")
    run.add_argument("--no-docs", action="store_true", help="do not render Data Docs")
    run.add_argument(
        "--engine",
        choices=["auto", "gx", "sql"],
        default="auto",
        help="gx: validate everything in Great Expectations; sql/auto: push down into DuckDB",
    )
    run.set_defaults(func=cmd_run)

    d = qsub.add_parser(
        "docs", help="render Great Expectations Data Docs for the latest run of every suite"
    )
    d.add_argument("--force", action="store_true", help="render even if the site is current")
    d.set_defaults(func=cmd_docs)

    s = qsub.add_parser("suites", help="list the suites and their expectations")
    s.set_defaults(func=cmd_suites)
    q.set_defaults(func=cmd_report, json=False, failed=False)


def cmd_report(args: argparse.Namespace) -> int:
    from twin_pipeline.quality.docs import status
    from twin_pipeline.quality.results import latest, report_json

    settings = Settings.from_env()
    with Store.open(settings, read_only=True) as store:
        doc = report_json(store)
        rows = latest(store)
        docs_status = status(store, settings.data_docs_dir)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not rows:
        print("no validation results yet: run `twin run` or `twin quality run`")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="data quality: latest run of every suite")
    for col in ("suite", "expectation", "severity", "result", "failed rows", "action"):
        table.add_column(col, justify="right" if col == "failed rows" else "left")
    for r in rows:
        if args.failed and r["passed"]:
            continue
        result = "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"
        table.add_row(
            r["suite"],
            r["expectation"],
            r["severity"],
            result,
            f"{r['failed_rows']:,}",
            r["action"],
        )
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    n_fail = sum(1 for r in rows if not r["passed"])
    blocked = sum(1 for r in rows if r["action"] == "blocked")
    quarantined = sum(int(r["quarantined_rows"]) for r in rows)
    console.print(
        f"{len(rows)} expectations in {len({r['suite'] for r in rows})} suites: "
        f"{n_fail} failed, {blocked} blocking, {quarantined:,} rows quarantined"
    )
    index = settings.data_docs_dir / "index.html"
    if docs_status == "current":
        console.print(f"Data Docs: {index}")
    else:
        console.print(f"Data Docs: {docs_status} ({index}); render with `twin quality docs`")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from twin_pipeline.quality.docs import render

    settings = Settings.from_env()
    with Store.open(settings, read_only=True) as store:
        index, rendered = render(store, settings.data_docs_dir, force=args.force)
    print(f"{index} ({'rendered' if rendered else 'already current'})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from twin_pipeline.defs.runner import run_lock
    from twin_pipeline.quality.runner import run_suites
    from twin_pipeline.quality.suite import load_suites

    settings = Settings.from_env()
    suites = load_suites()
    if args.table:
        unknown = [t for t in args.table if t not in suites]
        if unknown:
            raise ConfigError(f"no suite for {', '.join(unknown)}")
        chosen = [suites[t] for t in args.table]
    else:
        chosen = list(suites.values())
    as_of = None
    if args.as_of:
        as_of = datetime.fromisoformat(args.as_of)
        as_of = as_of if as_of.tzinfo else as_of.replace(tzinfo=UTC)
    with run_lock(settings), Store.open(settings) as store:
        runs = run_suites(
            store,
            chosen,
            as_of=as_of,
            quarantine=not args.no_quarantine,
            docs_dir=None if args.no_docs else settings.data_docs_dir,
            engine=args.engine,
        )
    for run in runs:
        status = "ok" if run.passed else "BLOCKED"
        print(
            f"{run.suite:24s} {status:8s} rows {run.rows_before:>9,} -> {run.rows_after:>9,}  "
            f"failed expectations {sum(1 for r in run.results if not r.passed)}"
        )
    return 0 if all(r.passed for r in runs) else 1


def cmd_suites(args: argparse.Namespace) -> int:
    from twin_pipeline.quality.suite import load_suites

    for table, suite in load_suites().items():
        print(f"{table}  ({suite.suite}, {len(suite.expectations)} expectations)")
        for e in suite.expectations:
            flag = " row-level" if e.row_level else ""
            print(f"   {e.severity:7s}{flag:10s} {e.name}: {e.type}")
    return 0
