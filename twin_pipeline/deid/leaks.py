"""Leak check for a de-identified table: do raw identifiers of ``harmonized.patient`` survive?

Two tests, both linear in the table size:

* **exact**: a text cell equal to a patient's raw MRN, SSN, phone, email, address line, full
  name or patient id;
* **in text**: for columns the policy redacts as free text, the row's own patient's name parts
  (Title or UPPER case, whole words), MRN, SSN, phone and email as substrings — the row's
  patient is found by re-computing the keyed pseudonym of every raw patient id in SQL.

This is what the ``deid/<table>`` blocking asset check runs after every materialization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import DeidPolicy
from twin_pipeline.keys import KeyRing
from twin_pipeline.store import Store


@dataclass
class LeakReport:
    table: str
    checked_columns: int = 0
    hits: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.hits


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def leak_check(store: Store, policy: DeidPolicy, table: str, *, limit: int = 20) -> LeakReport:
    rep = LeakReport(table)
    out = f"deid.{table}"
    if not store.table_exists(out) or not store.table_exists("harmonized.patient"):
        return rep
    pcols = {c for c, _ in store.columns("harmonized.patient")}
    exact_cols = [
        c for c in ("patient_id", "mrn", "ssn", "phone", "email", "address_line") if c in pcols
    ]
    con = store.con
    parts = [f"SELECT CAST({_q(c)} AS VARCHAR) AS v FROM harmonized.patient" for c in exact_cols]
    if {"given_name", "family_name"} <= pcols:
        parts.append(
            "SELECT given_name || ' ' || family_name FROM harmonized.patient "
            "WHERE given_name IS NOT NULL AND family_name IS NOT NULL"
        )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE __leak_exact AS SELECT DISTINCT v FROM ("
        + " UNION ALL ".join(parts)
        + ") WHERE v IS NOT NULL AND length(v) >= 3"
    )
    rule = policy.tables.get(table)
    text_cols = {c for c, r in rule.columns.items() if r.action == "redact_text"} if rule else set()
    try:
        for col, dtype in store.columns(out):
            if dtype != "VARCHAR":
                continue
            rep.checked_columns += 1
            for (v,) in con.execute(
                f"SELECT DISTINCT d.{_q(col)} FROM {out} d JOIN __leak_exact e "
                f"ON d.{_q(col)} = e.v LIMIT {limit}"
            ).fetchall():
                rep.hits.append(f"{out}.{col}: raw identifier value {v[:3]}… kept verbatim")
        if text_cols and "patient_id" in {c for c, _ in store.columns(out)}:
            rep.hits += _text_hits(store, policy, out, sorted(text_cols), pcols, limit)
    finally:
        con.execute("DROP TABLE IF EXISTS temp.__leak_exact")
    return rep


def _text_hits(
    store: Store,
    policy: DeidPolicy,
    out: str,
    text_cols: list[str],
    pcols: set[str],
    limit: int,
) -> list[str]:
    con = store.con
    ring = KeyRing(store.settings.keys_dir)
    key = ring.pseudonym_key(ring.version(policy.key_kind).version)
    params = keyed.SqlKey.from_key(key).params()
    rule = (
        policy.tables["patient"].columns.get("patient_id") if "patient" in policy.tables else None
    )
    domain = (rule.domain if rule else None) or "patient"
    length = rule.length if rule else 24
    values: list[str] = []
    for c in ("mrn", "ssn", "phone", "email"):
        if c in pcols:
            values.append(
                f"SELECT patient_id, CAST({_q(c)} AS VARCHAR) AS v, 'literal' AS how "
                f"FROM harmonized.patient"
            )
    for c in ("given_name", "family_name"):
        if c in pcols:
            values.append(
                f"SELECT patient_id, unnest(string_split({_q(c)}, ' ')) AS v, 'word' AS how "
                f"FROM harmonized.patient"
            )
    if not values:
        return []
    con.execute(
        "CREATE OR REPLACE TEMP TABLE __leak_text AS SELECT "
        + keyed.sql_pseudonym("patient_id", domain, length)
        + " AS pseudo, v, how FROM ("
        + " UNION ALL ".join(values)
        + ") WHERE v IS NOT NULL AND length(v) >= 3",
        params,
    )
    hits: list[str] = []
    try:
        for col in text_cols:
            rows = con.execute(
                f"""
                SELECT DISTINCT i.how FROM {out} d JOIN __leak_text i ON i.pseudo = d.patient_id
                WHERE d.{_q(col)} IS NOT NULL AND CASE
                  WHEN i.how = 'literal' THEN contains(lower(d.{_q(col)}), lower(i.v))
                  ELSE regexp_matches(d.{_q(col)}, '\\b(' || {_re_escape_sql("i.v")} || '|'
                       || upper({_re_escape_sql("i.v")}) || ')\\b')
                END
                LIMIT {limit}
                """
            ).fetchall()
            hits += [
                f"{out}.{col}: a patient's own {how} identifier appears in text" for (how,) in rows
            ]
    finally:
        con.execute("DROP TABLE IF EXISTS temp.__leak_text")
    return hits


def _re_escape_sql(expr: str) -> str:
    """SQL expression escaping RE2 metacharacters in ``expr``."""
    return f"regexp_replace({expr}, '([.^$|()\\[\\]{{}}*+?\\\\])', '\\\\\\1', 'g')"
