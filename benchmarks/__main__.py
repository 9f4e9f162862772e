"""``python -m benchmarks [--quick] [--patients N] [--only NAME]``: run every bench_* module."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

import benchmarks
from twin_pipeline.paths import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes (1,000 patients)")
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--only", action="append", help="run only these bench modules")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = Settings.from_env().ensure()
    args.workdir = args.workdir or settings.home / "bench"
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    names = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )
    for name in names:
        if args.only and name.removeprefix("bench_") not in args.only and name not in args.only:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name} ==", flush=True)
        t0 = time.perf_counter()
        results[name] = module.run(args)
        print(f"   ({time.perf_counter() - t0:.1f} s)\n", flush=True)
    out = args.workdir / "all_results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
