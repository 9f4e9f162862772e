"""Snapshot policy and cohort files: the shipped ones load; bad ones fail naming file and entry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import ASSETS_DIR, POLICIES_DIR
from twin_pipeline.snapshot.config import QuasiIdentifier, load_cohort, load_snapshot_policy
from twin_pipeline.snapshot.disclosure import (
    KAnonResult,
    Scratch,
    k_anonymize,
    k_anonymize_sql,
    qi_sql,
)


def test_shipped_policy_loads() -> None:
    policy = load_snapshot_policy(POLICIES_DIR / "snapshot.yaml")
    assert policy.roles == ["researcher"]
    assert policy.source_schema == "deid"
    assert [q.name for q in policy.k_anonymity.quasi_identifiers] == ["age_band", "gender", "zip3"]
    assert policy.k_anonymity.k >= 2


@pytest.mark.parametrize("path", sorted((ASSETS_DIR / "cohorts").glob("*.yaml")), ids=str)
def test_shipped_cohorts_load(path: Path) -> None:
    cohort, sha = load_cohort(path)
    assert cohort.name and len(sha) == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ninclude: {age_min: 70, age_max: 20}\n", "age_min 70 is above age_max 20"),
        ("name: x\ninclude: {smoker: true}\n", "include.smoker"),
        ("name: 'bad name/../x'\n", "cohort name"),
        ("description: no name\n", "name"),
        ("name: x\ninclude: {age_min: -3}\n", "include.age_min"),
        ("name: [unclosed\n", "cannot read YAML"),
    ],
)
def test_bad_cohort(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cohort.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_cohort(path)
    assert str(path) in str(exc.value)


def test_cohort_normalises_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: c\ninclude: {gender: Female, conditions: 44054006}\n")
    cohort, _ = load_cohort(path)
    assert cohort.include.gender == ["female"]
    assert cohort.include.conditions == ["44054006"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("source_schema: deid", "source_schema: harmonized"), "outside source_schema"),
        (
            ("reference_tables: [", "reference_tables: [harmonized.patient, "),
            "outside source_schema",
        ),
        (("  k: 5", "  k: 0"), "k_anonymity.k"),
        (("roles: [researcher]", "roles: []"), "roles"),
        (("compression: zstd", "compression: gzip"), "parquet.compression"),
    ],
)
def test_bad_policy(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    text = (POLICIES_DIR / "snapshot.yaml").read_text()
    assert edit[0] in text
    path = tmp_path / "snapshot.yaml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message):
        load_snapshot_policy(path)


@pytest.mark.parametrize(
    ("birth_year", "band"),
    [
        (2020, "0-9"),
        (1990, "30-39"),
        (1987, "30-39"),
        (1937, "80-89"),
        (1936, "90+"),
        (1900, "90+"),
        (None, "90+ or unknown"),
        (2030, "unknown"),
    ],
)
def test_age_band(birth_year: int | None, band: str) -> None:
    q = QuasiIdentifier(name="age_band", source="birth_year", generalize="age_band")
    row = duckdb.execute(
        f"SELECT {qi_sql(q, 'b', 2026)} FROM (SELECT CAST(? AS INTEGER) AS b)", [birth_year]
    ).fetchone()
    assert row == (band,)


@pytest.mark.parametrize(
    ("value", "zip3"),
    [("02139", "021"), ("021", "021"), ("000", "000"), ("9", "unknown"), (None, "unknown")],
)
def test_zip3(value: str | None, zip3: str) -> None:
    q = QuasiIdentifier(name="zip3", source="postal_code", generalize="zip3")
    row = duckdb.execute(
        f"SELECT {qi_sql(q, 'z', 2026)} FROM (SELECT CAST(? AS VARCHAR) AS z)", [value]
    ).fetchone()
    assert row == (zip3,)


def test_k_anonymize_iterates_until_stable() -> None:
    # p5 has two record versions: its second tuple sits in a class of one, so p5 is suppressed;
    # that shrinks class ("a",) from 3 to 2 < k, so p1 and p2 go in a second round.
    rows = [("p1", "a"), ("p2", "a"), ("p5", "a"), ("p5", "z")]
    rows += [(f"q{i}", "b") for i in range(3)]
    res = k_anonymize(rows, 3, ["band"])
    assert res.released == ["q0", "q1", "q2"]
    assert res.suppressed == ["p1", "p2", "p5"]
    assert res.rounds == 2
    assert res.smallest_class == 3
    assert res.smallest_class_before == 1


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_anonymize_k_holds(k: int) -> None:
    rows = [(f"p{i}", str(i % 7), str(i % 3)) for i in range(40)]
    res = k_anonymize(rows, k, ["a", "b"])
    assert all(n >= k for n in res.classes.values())
    assert len(res.released) + len(res.suppressed) == 40


def _sql_k_anonymity(
    rows: Sequence[tuple[str, ...]], k: int, names: list[str]
) -> tuple[KAnonResult, set[str], set[str]]:
    con = duckdb.connect()
    n = len(names)
    cols = ", ".join(f"c{i} VARCHAR" for i in range(n + 1))
    con.execute(f"CREATE TABLE src ({cols})")
    if rows:
        con.executemany(f"INSERT INTO src VALUES ({', '.join('?' * (n + 1))})", rows)
    scratch = Scratch.named("memory.main.__t")
    res = k_anonymize_sql(con, "SELECT * FROM src", [], k, names, scratch)
    released = {r[0] for r in con.execute(f"SELECT pid FROM {scratch.released}").fetchall()}
    suppressed = {r[0] for r in con.execute(f"SELECT pid FROM {scratch.suppressed}").fetchall()}
    scratch.drop(con)
    assert not con.execute("SELECT * FROM duckdb_tables() WHERE table_name LIKE '__t%'").fetchall()
    return res, released, suppressed


def test_k_anonymize_sql_iterates_until_stable() -> None:
    rows = [("p1", "a"), ("p2", "a"), ("p5", "a"), ("p5", "z")]
    rows += [(f"q{i}", "b") for i in range(3)]
    res, released, suppressed = _sql_k_anonymity(rows, 3, ["band"])
    assert released == {"q0", "q1", "q2"} and suppressed == {"p1", "p2", "p5"}
    assert res.rounds == 2
    assert res.summary()["smallest_class_size"] == 3


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([f"p{i}" for i in range(12)]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["x", "y"]),
        ),
        max_size=40,
    ),
    k=st.integers(min_value=1, max_value=5),
)
def test_k_anonymize_sql_matches_the_reference(rows: list[tuple[str, str, str]], k: int) -> None:
    """The SQL the export runs and the in-memory reference agree on every input."""
    ref = k_anonymize(rows, k, ["a", "b"])
    res, released, suppressed = _sql_k_anonymity(rows, k, ["a", "b"])
    assert released == set(ref.released) and suppressed == set(ref.suppressed)
    assert res.summary() == ref.summary()
