"""Researcher snapshots: signed, reproducible, k-anonymous Parquet exports of de-identified data.

- :mod:`.config` validates ``policies/snapshot.yaml`` and cohort files (``assets/cohorts/``);
- :mod:`.create` exports through the access gateway (``twin snapshot create``);
- :mod:`.disclosure` generalizes quasi-identifiers and enforces k-anonymity by suppression;
- :mod:`.writer` writes deterministic Parquet; :mod:`.manifest` signs and verifies
  (``twin snapshot verify``); :mod:`.provenance` writes ``lineage.json``; :mod:`.card` the
  dataset card.
"""

from __future__ import annotations

from twin_pipeline.snapshot.config import Cohort, SnapshotPolicy, load_cohort, load_snapshot_policy
from twin_pipeline.snapshot.create import SnapshotResult, create_snapshot
from twin_pipeline.snapshot.manifest import VerifyReport, verify

__all__ = [
    "Cohort",
    "SnapshotPolicy",
    "SnapshotResult",
    "VerifyReport",
    "create_snapshot",
    "load_cohort",
    "load_snapshot_policy",
    "verify",
]
