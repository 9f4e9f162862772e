"""``twin watch DIR [--interval S] [--once]``: run the pipeline for new landing files only."""

from __future__ import annotations

import argparse
from pathlib import Path

from twin_pipeline.paths import Settings
from twin_pipeline.watch import SCOPES, WatchRound, watch


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "watch", help="poll a landing folder and ingest new or changed files as they arrive"
    )
    p.add_argument("landing", type=Path, help="landing folder to watch")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.add_argument("--once", action="store_true", help="process what is new, then exit")
    p.add_argument(
        "--full-graph",
        action="store_true",
        help="run every asset each round (default: the first round runs everything, later "
        "rounds only the raw assets of the new files' kinds and what is downstream of them)",
    )
    p.add_argument(
        "--scope",
        choices=SCOPES,
        default="harmonized",
        help="after the first round, run up to the harmonized tables (default; new data is "
        "queryable fastest) or everything downstream, de-identified and twin tables included",
    )
    p.add_argument("--as", dest="user", default="engineer")
    p.set_defaults(func=cmd_watch)


def _print(r: WatchRound) -> None:
    status = "ok" if r.success else "FAILED"
    print(
        f"{len(r.new_files)} new file(s) -> {len(r.selection)} asset(s) in {r.wall_s:.2f} s "
        f"[{status}]",
        flush=True,
    )
    for f in r.failures:
        print(f"  failed: {f}", flush=True)


def cmd_watch(args: argparse.Namespace) -> int:
    from twin_pipeline.cli.core import _role_of

    role = _role_of(args.user)
    try:
        rounds = watch(
            args.landing.resolve(),
            Settings.from_env(),
            interval=args.interval,
            once=args.once,
            full_graph=args.full_graph,
            scope=args.scope,
            user=args.user,
            role=role,
            on_round=_print,
        )
    except KeyboardInterrupt:
        return 0
    if args.once and not rounds:
        print("nothing new")
    return 0 if all(r.success for r in rounds) else 1
