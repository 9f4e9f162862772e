"""Disclosure control: generalized quasi-identifiers and k-anonymity by suppression.

Every released patient falls in an equivalence class: the patients sharing all quasi-identifier
values (e.g. age band, sex, ZIP3). A class smaller than ``k`` would single people out, so its
patients are suppressed (left out of the snapshot with all their rows). Suppression is repeated
until no class is smaller than ``k`` (a patient with several quasi-identifier tuples, e.g. two
versions of the record, can leave a class when suppressed for another one).

The generalized values are what the snapshot releases, so the guarantee holds over the released
file, not only over the values the check looked at.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twin_pipeline.snapshot.config import QuasiIdentifier

UNKNOWN = "unknown"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qi_sql(qi: QuasiIdentifier, column: str, as_of_year: int) -> str:
    """SQL for the released (generalized) value of ``qi`` over ``column`` (already qualified).

    Never NULL: a missing value is its own class (``unknown``), so it cannot hide a small class.
    """
    if qi.generalize == "age_band":
        age = f"({int(as_of_year)} - try_cast({column} AS INTEGER))"
        top, width = int(qi.top), int(qi.width)
        lo = f"CAST(floor({age} / {width}) * {width} AS INTEGER)"
        band = (
            f"CAST({lo} AS VARCHAR) || '-' || CAST(least({lo} + {width - 1}, {top - 1}) AS VARCHAR)"
        )
        # Safe Harbor withholds the birth year when it implies an age over 89: NULL is then
        # "90 or over" far more often than "unknown", and the two are one class.
        return (
            f"CASE WHEN {age} IS NULL THEN '{top}+ or unknown' "
            f"WHEN {age} >= {top} THEN '{top}+' WHEN {age} < 0 THEN '{UNKNOWN}' ELSE {band} END"
        )
    if qi.generalize == "zip3":
        digits = f"left(regexp_replace(CAST({column} AS VARCHAR), '[^0-9]', '', 'g'), 3)"
        return f"CASE WHEN length(coalesce({digits}, '')) < 3 THEN '{UNKNOWN}' ELSE {digits} END"
    return f"coalesce(lower(trim(CAST({column} AS VARCHAR))), '{UNKNOWN}')"


@dataclass
class KAnonResult:
    k: int
    quasi_identifiers: list[str]
    patients_considered: int
    released: list[str]  # patient ids, sorted
    suppressed: list[str]  # patient ids, sorted
    classes_before: int
    smallest_class_before: int | None
    classes: dict[tuple[str, ...], int] = field(default_factory=dict)  # after suppression
    rounds: int = 0

    @property
    def smallest_class(self) -> int | None:
        return min(self.classes.values()) if self.classes else None

    def summary(self) -> dict[str, Any]:
        return {
            "method": "k-anonymity by suppression of small equivalence classes",
            "k": self.k,
            "quasi_identifiers": self.quasi_identifiers,
            "patients_considered": self.patients_considered,
            "patients_released": len(self.released),
            "patients_suppressed": len(self.suppressed),
            "equivalence_classes_before": self.classes_before,
            "smallest_class_before_suppression": self.smallest_class_before,
            "equivalence_classes": len(self.classes),
            "smallest_class_size": self.smallest_class,
            "suppression_rounds": self.rounds,
        }


def k_anonymize(rows: Iterable[Sequence[Any]], k: int, qi_names: Sequence[str]) -> KAnonResult:
    """``rows`` are ``(patient_id, qi_1, ..., qi_n)``; returns who is released and suppressed."""
    tuples: dict[str, set[tuple[str, ...]]] = {}
    for row in rows:
        pid = str(row[0])
        tuples.setdefault(pid, set()).add(tuple(str(v) for v in row[1:]))
    alive = set(tuples)

    def class_sizes(patients: set[str]) -> Counter[tuple[str, ...]]:
        sizes: Counter[tuple[str, ...]] = Counter()
        for pid in patients:
            for t in tuples[pid]:
                sizes[t] += 1
        return sizes

    sizes = class_sizes(alive)
    before_classes = len(sizes)
    before_min = min(sizes.values()) if sizes else None
    rounds = 0
    while True:
        small = {t for t, n in sizes.items() if n < k}
        if not small:
            break
        rounds += 1
        alive -= {pid for pid in alive if tuples[pid] & small}
        sizes = class_sizes(alive)
    return KAnonResult(
        k=k,
        quasi_identifiers=list(qi_names),
        patients_considered=len(tuples),
        released=sorted(alive),
        suppressed=sorted(set(tuples) - alive),
        classes_before=before_classes,
        smallest_class_before=before_min,
        classes=dict(sizes),
        rounds=rounds,
    )
