"""Near-real-time ingestion: find new or changed landing files and run only what they feed.

Used by ``twin watch DIR`` and by the Dagster ``landing_sensor``. A snapshot maps each landed
file (landing-relative path) to its size, mtime and sha256; the sha256 is recomputed only when
size or mtime changed, so polling a large landing folder stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twin_pipeline.paths import Settings
from twin_pipeline.sources import (
    IGNORED_NAMES,
    classify,
    load_readers,
    sha256_file,
    walk_landing,
)

Snapshot = dict[str, dict[str, Any]]


def landing_snapshot(
    landing: Path, previous: Mapping[str, Mapping[str, Any]] | None = None
) -> Snapshot:
    """Each landed file (landing-relative path, in path order) with its size, mtime and sha256.

    One ``os.scandir`` walk (:func:`~twin_pipeline.sources.walk_landing`, the readers' own):
    ``Path.rglob`` with ``is_file`` and ``stat`` stat-ed each file twice and built two ``Path``
    objects for it (~1 s a poll over the ~21,000 files of a 10,000-patient landing). A folder
    that cannot be listed is left out, as ``rglob`` left it."""
    previous = previous or {}
    snap: Snapshot = {}
    for rel, entry in walk_landing(landing, {}):
        if entry.name in IGNORED_NAMES or entry.name.startswith(".") or not entry.is_file():
            continue
        st = entry.stat()
        old = previous.get(rel)
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            snap[rel] = dict(old)
            continue
        snap[rel] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(Path(entry.path)),
        }
    return snap


def changed_files(known: Mapping[str, Mapping[str, Any]], snap: Snapshot) -> list[str]:
    """Paths that are new or whose content changed since ``known``."""
    return sorted(
        rel for rel, info in snap.items() if known.get(rel, {}).get("sha256") != info["sha256"]
    )


SCOPES = ("harmonized", "all")


def selection_for(paths: list[str], scope: str = "harmonized") -> list[str]:
    """Asset key paths to run for these files: their raw assets and what is downstream of them
    (``scope="harmonized"``: up to the harmonized tables, the fast lane that makes new data
    queryable; ``"all"``: de-identified and twin tables too)."""
    import dagster as dg

    from twin_pipeline.definitions import defs

    readers = load_readers()
    kinds = {classify(p, readers) for p in paths}
    keys = [dg.AssetKey(["raw", k]) for k in sorted(k for k in kinds if k)]
    if None in kinds:
        keys.append(dg.AssetKey(["governance", "unclaimed_files"]))
    graph = defs.resolve_asset_graph()
    known = {k for k in keys if graph.has(k)}
    if not known:
        return []
    selected = dg.AssetSelection.assets(*known).downstream().resolve(graph)
    if scope == "harmonized":
        selected = {k for k in selected if k.path[0] in ("raw", "harmonized", "governance")}
    return sorted("/".join(k.path) for k in selected)


@dataclass
class WatchRound:
    new_files: list[str]
    selection: list[str]
    wall_s: float
    success: bool
    failures: list[str] = field(default_factory=list)
    steps_s: dict[str, float] = field(default_factory=dict)  # asset step -> seconds
    run_id: str = ""


def watch(
    landing: Path,
    settings: Settings | None = None,
    *,
    interval: float = 2.0,
    once: bool = False,
    full_graph: bool = False,
    scope: str = "harmonized",
    user: str = "engineer",
    role: str = "data_engineer",
    on_round: Callable[[WatchRound], None] | None = None,
    max_rounds: int | None = None,
    known: Snapshot | None = None,
) -> list[WatchRound]:
    """Poll ``landing``; for each batch of new files run the graph part they feed.

    The first round runs the whole graph (catch-up); later rounds run only the raw assets of
    the new files' kinds and what is downstream of them within ``scope``.
    """
    from twin_pipeline.defs.runner import run_pipeline

    settings = settings or Settings.from_env()
    first = known is None  # given a snapshot of what is already ingested, no catch-up round
    known = dict(known or {})
    rounds: list[WatchRound] = []
    while True:
        snap = landing_snapshot(landing, known)
        new = changed_files(known, snap)
        if new:
            selection = None if (full_graph or first) else selection_for(new, scope)
            t0 = time.perf_counter()
            summary = run_pipeline(
                landing, settings, user=user, role=role, selection=selection, wait=True
            )
            r = WatchRound(
                new,
                selection or ["*"],
                time.perf_counter() - t0,
                summary.success,
                summary.failures,
                dict(summary.steps_s),
                summary.run_id,
            )
            rounds.append(r)
            if on_round:
                on_round(r)
            known = snap
            first = False
        if once or (max_rounds is not None and len(rounds) >= max_rounds):
            return rounds
        time.sleep(interval)


def materialized_at(settings: Settings, run_id: str) -> dict[str, float]:
    """Epoch seconds at which each asset of a run was materialized (its data committed)."""
    import dagster as dg

    from twin_pipeline.defs.runner import dagster_instance

    instance = dagster_instance(settings)
    out: dict[str, float] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.dagster_event
        if event is not None and event.asset_key is not None:
            out[event.asset_key.to_user_string()] = entry.timestamp
    return out
