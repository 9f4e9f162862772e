"""Push GX expectations down into DuckDB: the same semantics, computed where the data lives.

Great Expectations validates pandas DataFrames row by row with a fixed cost per expectation;
on large tables that costs more than harmonizing the data. For the expectation types our
suites use, this module compiles the GX expectation (its type and kwargs, already validated by
GX) to SQL that returns the same counts and the failing row ids. Anything it cannot compile
(an unknown type, a row condition beyond ``col=="x"``/``.notnull()``/``and``/``or``) returns
``None`` and runs in GX. ``tests/quality`` checks both engines agree on every suite.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from twin_pipeline.quality.gx import GXOutcome
from twin_pipeline.store import Store

MAP_TYPES = frozenset(
    {
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_null",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_in_set",
        "expect_column_values_to_be_between",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_pair_values_to_be_in_set",
    }
)
AGG_TYPES = frozenset(
    {
        "expect_column_max_to_be_between",
        "expect_column_min_to_be_between",
        "expect_table_row_count_to_be_between",
    }
)
_COND_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lp>\()|(?P<rp>\))|
        (?P<op>and|or)\b|
        (?P<null>[A-Za-z_][A-Za-z0-9_]*)\.(?P<fn>notnull|isnull|notna|isna)\(\)|
        (?P<col>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<cmp>==|!=)\s*(?P<str>"[^"]*"|'[^']*')
    )""",
    re.VERBOSE,
)


@dataclass
class Compiled:
    kind: str  # map | agg
    domain: str  # SQL predicate: rows the expectation looks at (row_condition)
    unexpected: str = "FALSE"  # SQL predicate (map): failing rows within the domain
    agg_fn: str = ""  # agg: count | max | min, of ...
    agg_arg: str = "*"  # ... this SQL expression: the observed value
    bounds: tuple[Any, Any, bool, bool] = (None, None, False, False)
    ignore: str = "FALSE"  # SQL predicate: rows counted but not judged (GX ignore_row_if)


def q(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


def lit(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, datetime):
        return f"TIMESTAMPTZ '{v.isoformat()}'"
    if isinstance(v, date):
        return f"TIMESTAMPTZ '{v.isoformat()}T00:00:00+00:00'"
    return "'" + str(v).replace("'", "''") + "'"


def translate_condition(cond: str, columns: Sequence[str]) -> str | None:
    """A pandas ``row_condition`` of the simple forms our suites use, as SQL; else None."""
    out: list[str] = []
    pos = 0
    cond = cond.strip()
    while pos < len(cond):
        m = _COND_TOKEN.match(cond, pos)
        if not m or m.end() == pos:
            return None
        pos = m.end()
        if m.group("lp"):
            out.append("(")
        elif m.group("rp"):
            out.append(")")
        elif m.group("op"):
            out.append(m.group("op").upper())
        elif m.group("null"):
            col = m.group("null")
            if col not in columns:
                return None
            neg = "NOT " if m.group("fn") in ("notnull", "notna") else ""
            out.append(f"{q(col)} IS {neg}NULL")
        else:
            col = m.group("col")
            if col not in columns:
                return None
            value = m.group("str")[1:-1]
            # pandas: NaN == "x" is False and NaN != "x" is True
            if m.group("cmp") == "==":
                out.append(f"coalesce({q(col)} = {lit(value)}, FALSE)")
            else:
                out.append(f"coalesce({q(col)} <> {lit(value)}, TRUE)")
        pos = len(cond) - len(cond[pos:].lstrip())
    return " ".join(out)


def _between(col: str, kw: dict[str, Any]) -> str:
    lo, hi = kw.get("min_value"), kw.get("max_value")
    parts = []
    if lo is not None:
        parts.append(f"{col} {'>' if kw.get('strict_min') else '>='} {lit(lo)}")
    if hi is not None:
        parts.append(f"{col} {'<' if kw.get('strict_max') else '<='} {lit(hi)}")
    return " AND ".join(parts) or "TRUE"


def compile_expectation(
    type_name: str, kwargs: dict[str, Any], columns: Sequence[str]
) -> Compiled | None:
    """SQL for one expectation (kwargs with tokens resolved), or None to run it in GX."""
    if type_name not in MAP_TYPES | AGG_TYPES:
        return None
    kw = dict(kwargs)
    if kw.get("mostly") not in (None, 1, 1.0):
        return None
    domain = "TRUE"
    cond = kw.get("row_condition")
    if cond:
        if kw.get("condition_parser") != "pandas":
            return None
        sql_cond = translate_condition(str(cond), columns)
        if sql_cond is None:
            return None
        domain = f"({sql_cond})"
    needed = [kw.get(k) for k in ("column", "column_A", "column_B") if kw.get(k) is not None]
    needed += list(kw.get("column_list") or [])
    if any(c not in columns for c in needed):
        return None  # GX reports the missing column as an evaluation error
    c = q(str(kw["column"])) if "column" in kw else ""
    if type_name == "expect_column_values_to_not_be_null":
        return Compiled("map", domain, f"{c} IS NULL")
    if type_name == "expect_column_values_to_be_null":
        return Compiled("map", domain, f"{c} IS NOT NULL")
    nn = f"{c} IS NOT NULL"
    if type_name in (
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_in_set",
    ):
        values = list(kw.get("value_set") or [])
        if not values:
            return None
        inlist = f"{c} IN ({', '.join(lit(v) for v in values)})"
        bad = f"NOT ({inlist})" if type_name.endswith("to_be_in_set") else inlist
        return Compiled("map", domain, f"{nn} AND {bad}")
    if type_name == "expect_column_values_to_be_between":
        return Compiled("map", domain, f"{nn} AND NOT ({_between(c, kw)})")
    if type_name in (
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
    ):
        match = f"regexp_matches(CAST({c} AS VARCHAR), {lit(kw['regex'])})"
        bad = f"NOT {match}" if "_to_match_" in type_name else match
        return Compiled("map", domain, f"{nn} AND {bad}")
    if type_name == "expect_column_value_lengths_to_be_between":
        return Compiled("map", domain, f"{nn} AND NOT ({_between(f'length({c})', kw)})")
    # Window counts run over every row of the table: the domain is part of the partition so
    # that only rows inside it count as each other's duplicates.
    within = "" if domain == "TRUE" else f"{domain}, "
    if type_name == "expect_column_values_to_be_unique":
        return Compiled("map", domain, f"{nn} AND count(*) OVER (PARTITION BY {within}{c}) > 1")
    if type_name == "expect_compound_columns_to_be_unique":
        cols = [q(str(x)) for x in kw["column_list"]]
        ignore = kw.get("ignore_row_if", "all_values_are_missing")
        if ignore == "all_values_are_missing":
            skip = "(" + " AND ".join(f"{x} IS NULL" for x in cols) + ")"
        elif ignore == "any_value_is_missing":
            skip = "(" + " OR ".join(f"{x} IS NULL" for x in cols) + ")"
        elif ignore == "never":
            skip = "FALSE"
        else:
            return None
        return Compiled(
            "map",
            domain,
            f"count(*) OVER (PARTITION BY {within}{', '.join(cols)}, {skip}) > 1",
            ignore=skip,
        )
    if type_name.startswith("expect_column_pair_"):
        a, b = q(str(kw["column_A"])), q(str(kw["column_B"]))
        # GX's pandas pair metrics skip rows with a missing value in ways that differ by
        # expectation; only the explicit "either_value_is_missing" is pushed down.
        if kw.get("ignore_row_if") != "either_value_is_missing":
            return None
        skip = f"({a} IS NULL OR {b} IS NULL)"
        if type_name == "expect_column_pair_values_a_to_be_greater_than_b":
            op = ">=" if kw.get("or_equal") else ">"
            return Compiled("map", domain, f"NOT coalesce({a} {op} {b}, FALSE)", ignore=skip)
        pairs = [tuple(p) for p in kw.get("value_pairs_set") or []]
        if not pairs:
            return None
        rows_sql = ", ".join(f"({lit(x)}, {lit(y)})" for x, y in pairs)
        return Compiled(
            "map",
            domain,
            f"NOT EXISTS (SELECT 1 FROM (VALUES {rows_sql}) p(a, b) "
            f"WHERE p.a IS NOT DISTINCT FROM {a} AND p.b IS NOT DISTINCT FROM {b})",
            ignore=skip,
        )
    bounds = (
        kw.get("min_value"),
        kw.get("max_value"),
        bool(kw.get("strict_min")),
        bool(kw.get("strict_max")),
    )
    if type_name == "expect_table_row_count_to_be_between":
        return Compiled("agg", "TRUE", agg_fn="count", bounds=bounds)
    fn = "max" if type_name == "expect_column_max_to_be_between" else "min"
    return Compiled("agg", domain, agg_fn=fn, agg_arg=c, bounds=bounds)


def _in_bounds(value: Any, bounds: tuple[Any, Any, bool, bool]) -> bool:
    lo, hi, strict_lo, strict_hi = bounds
    if value is None:
        return False
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if lo is not None and (value <= lo if strict_lo else value < lo):
        return False
    return not (hi is not None and (value >= hi if strict_hi else value > hi))


def run_batch(
    store: Store, table: str, plans: Sequence[tuple[str, Compiled]]
) -> dict[str, GXOutcome]:
    """Evaluate every compiled expectation of a table in one scan: per expectation, the rows
    it looks at, the failing row ids (ordered) or the aggregate it bounds.

    Each expectation becomes a few columns of one ``SELECT`` (its domain, failure and skip
    flags per row, then ``count``/``list`` aggregates filtered by them), so a suite costs one
    pass over the table instead of two queries per expectation.
    """
    if not plans:
        return {}
    flags: list[str] = []
    aggs: list[str] = []
    for i, (_, plan) in enumerate(plans):
        flags.append(f"coalesce({plan.domain}, FALSE) AS d{i}")
        if plan.kind == "agg":
            aggs.append(f"count(*) FILTER (WHERE d{i})")
            if plan.agg_fn == "count":
                aggs.append(f"count(*) FILTER (WHERE d{i})")
            else:
                flags.append(f"{plan.agg_arg} AS v{i}")
                aggs.append(f"{plan.agg_fn}(v{i}) FILTER (WHERE d{i})")
        else:
            flags.append(f"coalesce(({plan.unexpected}) AND NOT ({plan.ignore}), FALSE) AS b{i}")
            aggs.append(f"count(*) FILTER (WHERE d{i})")
            aggs.append(f"list(rid ORDER BY rid) FILTER (WHERE d{i} AND b{i})")
    row = store.con.execute(
        f"SELECT {', '.join(aggs)} FROM (SELECT rowid AS rid, {', '.join(flags)} FROM {table})"
    ).fetchone()
    assert row is not None  # an aggregate query always returns one row
    out: dict[str, GXOutcome] = {}
    for i, (name, plan) in enumerate(plans):
        n, got = int(row[2 * i] or 0), row[2 * i + 1]
        if plan.kind == "agg":
            out[name] = GXOutcome(
                name=name,
                success=_in_bounds(got, plan.bounds),
                evaluated=n,
                unexpected=0,
                observed=None if got is None else str(got),
            )
        else:
            index = [int(r) for r in got or []]
            out[name] = GXOutcome(
                name=name, success=not index, evaluated=n, unexpected=len(index), index=index
            )
    return out
