"""``twin query --as USER [--format table|csv|json] "SQL"``: governed, audited reads.

A refused query prints ``twin: denied: ...`` (naming the relation or construct) and exits 3;
``twin query --as USER --describe`` lists what the user may read, with masks and row filters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twin_pipeline.errors import AccessDenied
from twin_pipeline.paths import Settings

EXIT_DENIED = 3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "query",
        help="run one read-only SQL query through the policy gateway (audited)",
        description="Run one SELECT as USER: row filters and column masks of the user's role "
        "are applied, and the query is recorded in the audit log whether allowed or denied.",
    )
    p.add_argument("--as", dest="user", required=True, help="user to query as (users.yaml)")
    p.add_argument(
        "--format", choices=["table", "csv", "json"], default="table", help="output format"
    )
    p.add_argument(
        "--limit", type=_positive, default=None, help="return at most N rows (capped by role)"
    )
    p.add_argument(
        "--describe", action="store_true", help="list readable relations, masks and filters"
    )
    p.add_argument("sql", nargs="?", help="one SELECT statement ('-' reads it from stdin)")
    p.set_defaults(func=cmd_query)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def cmd_query(args: argparse.Namespace) -> int:
    from twin_pipeline.policy import Gateway

    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not args.describe and not sql:
        print("twin: error: a SQL query (or --describe) is required", file=sys.stderr)
        return 2
    try:
        with Gateway(Settings.from_env()) as gw:
            if args.describe:
                print(json.dumps(gw.describe(args.user), indent=2))
                return 0
            result = gw.query(args.user, sql, limit=args.limit)
    except AccessDenied as exc:
        print(f"twin: denied: {exc}", file=sys.stderr)
        return EXIT_DENIED
    try:
        if args.format == "csv":
            sys.stdout.write(result.to_csv())
        elif args.format == "json":
            print(result.to_json())
        else:
            _print_table(result.columns, result.rows)
            note = f"{len(result.rows):,} rows" + (" (truncated)" if result.truncated else "")
            print(note, file=sys.stderr)
        sys.stdout.flush()
    except BrokenPipeError:  # `twin query ... | head`: the reader stopped early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_table(columns: list[str], rows: list[tuple[object, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    Console().print(table)
