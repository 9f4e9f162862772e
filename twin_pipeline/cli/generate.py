"""``twin generate``: write a deterministic sample hospital to a directory."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("dirty rate must be within [0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def register(subparsers: Any) -> None:
    """Add the ``generate`` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="generate a deterministic sample hospital (FHIR, DICOM, telemetry, notes)",
        description="Generate a deterministic sample hospital under --out.",
    )
    p.add_argument("--patients", type=_positive, default=100, help="number of patients")
    p.add_argument("--seed", type=_non_negative, default=42, help="random seed")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--dirty-rate", type=_rate, default=0.0, help="fraction of records with planted defects"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    """Run the generator; print a one-line JSON summary. Returns the exit code."""
    from twin_pipeline.generate.common import GeneratorError  # imports pydicom: only here

    started = time.perf_counter()
    try:
        report = _run_with_progress(args)
    except (GeneratorError, ValueError, OSError) as exc:
        print(f"twin generate: error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": str(args.out),
        "patients": report.patients,
        "seed": report.seed,
        "dirty_rate": report.dirty_rate,
        "resources": report.total_resources,
        "dicom_files": report.dicom_files,
        "telemetry_readings": report.telemetry_readings,
        "notes": report.notes,
        "dirty_records": report.dirty_records,
        "seconds": round(time.perf_counter() - started, 2),
    }
    print(json.dumps(summary))
    return 0


def _run_with_progress(args: argparse.Namespace) -> Any:
    from twin_pipeline.generate import generate_hospital

    quiet = bool(getattr(args, "quiet", False)) or not sys.stderr.isatty()
    try:
        from rich.progress import Progress
    except ImportError:  # pragma: no cover - rich is optional
        quiet = True
    if quiet:
        return generate_hospital(args.out, args.patients, args.seed, args.dirty_rate)
    with Progress(transient=True) as bar:
        task = bar.add_task("generating patients", total=args.patients)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"generating {stage}")

        return generate_hospital(args.out, args.patients, args.seed, args.dirty_rate, progress)
