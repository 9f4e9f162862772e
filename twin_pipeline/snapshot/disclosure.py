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
    patients_released: int
    patients_suppressed: int
    classes_before: int
    smallest_class_before: int | None
    classes_after: int
    smallest_class: int | None  # after suppression
    rounds: int = 0
    # filled by the in-memory reference (:func:`k_anonymize`) only; the export keeps the ids
    # in its scratch tables (:func:`k_anonymize_sql`)
    released: list[str] = field(default_factory=list)  # patient ids, sorted
    suppressed: list[str] = field(default_factory=list)  # patient ids, sorted
    classes: dict[tuple[str, ...], int] = field(default_factory=dict)  # after suppression

    def summary(self) -> dict[str, Any]:
        return {
            "method": "k-anonymity by suppression of small equivalence classes",
            "k": self.k,
            "quasi_identifiers": self.quasi_identifiers,
            "patients_considered": self.patients_considered,
            "patients_released": self.patients_released,
            "patients_suppressed": self.patients_suppressed,
            "equivalence_classes_before": self.classes_before,
            "smallest_class_before_suppression": self.smallest_class_before,
            "equivalence_classes": self.classes_after,
            "smallest_class_size": self.smallest_class,
            "suppression_rounds": self.rounds,
        }


def k_anonymize(rows: Iterable[Sequence[Any]], k: int, qi_names: Sequence[str]) -> KAnonResult:
    """``rows`` are ``(patient_id, qi_1, ..., qi_n)``; returns who is released and suppressed.

    The in-memory reference of the rule; the export runs the same rule in SQL
    (:func:`k_anonymize_sql`, tested against this one).
    """
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
        patients_released=len(alive),
        patients_suppressed=len(tuples) - len(alive),
        classes_before=before_classes,
        smallest_class_before=before_min,
        classes_after=len(sizes),
        smallest_class=min(sizes.values()) if sizes else None,
        rounds=rounds,
        released=sorted(alive),
        suppressed=sorted(set(tuples) - alive),
        classes=dict(sizes),
    )


@dataclass(frozen=True)
class Scratch:
    """Names of the scratch tables :func:`k_anonymize_sql` leaves behind (one column ``pid``
    VARCHAR in ``released`` and ``suppressed``)."""

    tuples: str
    released: str
    suppressed: str

    @classmethod
    def named(cls, prefix: str) -> Scratch:
        return cls(f"{prefix}_tuple", f"{prefix}_released", f"{prefix}_suppressed")

    def drop(self, con: Any) -> None:
        for name in (self.tuples, self.released, self.suppressed):
            con.execute(f"DROP TABLE IF EXISTS {name}")


def k_anonymize_sql(
    con: Any,
    rows_sql: str,
    params: Sequence[Any],
    k: int,
    qi_names: Sequence[str],
    scratch: Scratch,
) -> KAnonResult:
    """:func:`k_anonymize` in SQL, leaving the released and suppressed ids in ``scratch`` tables.

    ``rows_sql`` yields ``(patient_id, qi_1, ..., qi_n)`` (qi values never NULL: see
    :func:`qi_sql`). One pass builds the distinct (patient, tuple) pairs; each round is one
    GROUP BY over them and one DELETE of the patients in a class smaller than ``k`` (usually
    zero or one round), so the ids never travel through Python and are joined, not passed as
    lists, by the export.
    """
    n = len(qi_names)
    qs = [f"q{i}" for i in range(n)]
    qlist = ", ".join(qs)
    on = " AND ".join(f"__t.{q} = __s.{q}" for q in qs)
    con.execute(
        f"CREATE TABLE {scratch.tuples} AS SELECT DISTINCT CAST(__r.pid AS VARCHAR) AS pid, "
        + ", ".join(f"CAST(__r.{q} AS VARCHAR) AS {q}" for q in qs)
        + f" FROM ({rows_sql}) AS __r(pid, {qlist})",
        list(params),
    )
    con.execute(f"CREATE TABLE {scratch.released} AS SELECT DISTINCT pid FROM {scratch.tuples}")

    def classes(alive_only: bool) -> tuple[int, int | None]:
        join = f" JOIN {scratch.released} USING (pid)" if alive_only else ""
        row = con.execute(
            f"SELECT count(*), min(n) FROM (SELECT count(*) AS n FROM {scratch.tuples}{join} "
            f"GROUP BY {qlist})"
        ).fetchone()
        return (int(row[0]), None if row[1] is None else int(row[1])) if row else (0, None)

    row = con.execute(f"SELECT count(*) FROM {scratch.released}").fetchone()
    considered = int(row[0]) if row else 0
    before = classes(alive_only=False)
    rounds = 0
    while True:
        row = con.execute(
            f"DELETE FROM {scratch.released} WHERE pid IN (SELECT __t.pid FROM "
            f"{scratch.tuples} AS __t JOIN (SELECT {qlist} FROM {scratch.tuples} "
            f"JOIN {scratch.released} USING (pid) GROUP BY {qlist} HAVING count(*) < ?) AS __s "
            f"ON {on})",
            [int(k)],
        ).fetchone()
        if not (row and row[0]):
            break
        rounds += 1
    after = classes(alive_only=True)
    con.execute(
        f"CREATE TABLE {scratch.suppressed} AS SELECT DISTINCT pid FROM {scratch.tuples} "
        f"WHERE pid NOT IN (SELECT pid FROM {scratch.released})"
    )
    row = con.execute(f"SELECT count(*) FROM {scratch.released}").fetchone()
    released = int(row[0]) if row else 0
    return KAnonResult(
        k=k,
        quasi_identifiers=list(qi_names),
        patients_considered=considered,
        patients_released=released,
        patients_suppressed=considered - released,
        classes_before=before[0],
        smallest_class_before=before[1],
        classes_after=after[0],
        smallest_class=after[1],
        rounds=rounds,
    )
