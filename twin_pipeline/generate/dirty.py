"""Planting of deliberately defective records (``--dirty-rate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from random import Random

from twin_pipeline.generate.vocab import DIRTY_KINDS


@dataclass(slots=True)
class DirtyRecord:
    """One planted defect as listed in the manifest."""

    kind: str
    path: str
    position: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        """Manifest form."""
        return {
            "kind": self.kind,
            "path": self.path,
            "position": self.position,
            "detail": self.detail,
        }


@dataclass
class DirtPlanter:
    """Decides which records get a defect and remembers every planted one.

    Each eligible record is defective with probability ``rate``; while a kind has not been
    planted yet, the first record eligible for it gets it, so that every kind appears.
    """

    rate: float
    seed: int
    records: list[DirtyRecord] = field(default_factory=list)
    planted: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = Random(f"{self.seed}:dirty")

    @property
    def active(self) -> bool:
        """True when any defect may be planted."""
        return self.rate > 0.0

    def choose(self, kinds: Sequence[str]) -> str | None:
        """Pick a defect kind for the next record among ``kinds``, or None."""
        if self.rate <= 0.0 or not kinds:
            return None
        for kind in kinds:
            if kind not in self.planted:
                return kind
        if self.rng.random() < self.rate:
            return kinds[self.rng.randrange(len(kinds))]
        return None

    def chance(self, p: float) -> bool:
        """A Bernoulli draw from the defect stream (for rarer file-level defects)."""
        return self.rate > 0.0 and self.rng.random() < p

    def record(self, kind: str, path: str, position: str, detail: str) -> None:
        """Remember a planted defect."""
        assert kind in DIRTY_KINDS, kind
        self.planted.add(kind)
        self.records.append(DirtyRecord(kind, path, position, detail))
