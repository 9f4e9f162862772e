"""Structured de-identification: one policy table compiled to one DuckDB statement.

``harmonized.<t>`` → ``deid.<t>``. Pseudonyms, UIDs and per-patient date offsets are HMACs
computed inside DuckDB (see :mod:`keyed`; the key's pads travel as statement parameters), so a
table of millions of rows never round-trips through Python. Only ``redact_text`` columns do:
they go through the Presidio engine in batches and join back by row number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import ColumnRule, DeidPolicy, TableRule, check_coverage
from twin_pipeline.errors import PolicyViolation
from twin_pipeline.keys import KeyRing
from twin_pipeline.store import Store

TextFn = Callable[[list[tuple[str, str]], bytes], list[str]]


@dataclass
class DeidResult:
    table: str
    status: str  # written | withheld | skipped
    rows: int = 0
    key_version: int | None = None
    key_fingerprint: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # output column -> action
    texts_redacted: int = 0
    reason: str | None = None
    unused_rules: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        md: dict[str, Any] = {"status": self.status, "rows": self.rows}
        if self.key_version is not None:
            md["key_version"] = self.key_version
        if self.reason:
            md["reason"] = self.reason
        if self.columns:
            md["actions"] = ", ".join(f"{c}={a}" for c, a in self.columns.items())
        if self.texts_redacted:
            md["texts_redacted"] = self.texts_redacted
        if self.unused_rules:
            md["unused_rules"] = ", ".join(self.unused_rules)
        return md


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _date_shift_sql(col: str, dtype: str) -> str:
    t = dtype.upper()
    if t == "DATE":
        return f"s.{col} + __pm.off"
    if t.startswith("TIMESTAMP"):
        return f"s.{col} + to_days(__pm.off)"
    if t == "VARCHAR":
        return (
            f"CASE WHEN s.{col} IS NULL THEN NULL ELSE "
            f"coalesce(strftime(try_cast(s.{col} AS TIMESTAMPTZ) + to_days(__pm.off), "
            f"'%Y-%m-%dT%H:%M:%S%z'), '[unparseable date withheld]') END"
        )
    raise PolicyViolation(f"date_shift cannot apply to a {dtype} column ({col})")


def column_sql(col: str, dtype: str, rule: ColumnRule, policy: DeidPolicy) -> str | None:
    """The SELECT expression for one column (None: dropped). Text columns are joined later."""
    c = f"s.{_q(col)}"
    a = rule.action
    if a == "drop":
        return None
    if a == "keep":
        return c
    if a == "pseudonymize":
        return keyed.sql_pseudonym(c, rule.domain or col, rule.length)
    if a == "uid":
        return keyed.sql_dicom_uid(c)
    if a == "date_shift":
        return _date_shift_sql(_q(col), dtype)
    if a == "generalize":
        if rule.to == "zip3":
            digits = f"left(regexp_replace(CAST({c} AS VARCHAR), '[^0-9]', '', 'g'), 3)"
            restricted = ", ".join(f"'{z}'" for z in policy.zip3_restricted)
            return (
                f"CASE WHEN {c} IS NULL OR length({digits}) < 3 THEN NULL "
                f"WHEN {digits} IN ({restricted}) THEN '000' ELSE {digits} END"
            )
        if rule.to == "age90":
            return (
                f"CASE WHEN try_cast({c} AS DOUBLE) > 89 THEN '90+' ELSE CAST({c} AS VARCHAR) END"
            )
        if rule.to == "year":
            d = f"try_cast({c} AS DATE)"
            age = (
                f"(date_diff('year', {d}, current_date) - "
                f"CAST(strftime(current_date, '%m%d') < strftime({d}, '%m%d') AS INTEGER))"
            )
            # Safe Harbor: a year implying an age over 89 is itself withheld (aggregated to 90+).
            return f"CASE WHEN {age} > 89 THEN NULL ELSE year({d}) END"
    if a == "redact_text":
        return f"__t_{col}.redacted"
    raise PolicyViolation(f"unknown action {a} for {col}")  # pragma: no cover


def _person_join(rule: TableRule, store: Store) -> tuple[str, str]:
    """(person expression, join clause) over alias ``s``."""
    p = rule.person
    if p is None:
        return "CAST(NULL AS VARCHAR)", ""
    if p.via_table is None:
        return f"CAST(s.{_q(p.column)} AS VARCHAR)", ""
    via = f"harmonized.{p.via_table}"
    if not store.table_exists(via):
        return "CAST(NULL AS VARCHAR)", ""
    key = _q(p.via_key or p.column)
    return (
        "CAST(__p.patient AS VARCHAR)",
        f"LEFT JOIN (SELECT {key} AS k, any_value({_q(p.via_patient)}) AS patient FROM {via} "
        f"GROUP BY {key}) __p ON __p.k = s.{_q(p.column)}",
    )


def deidentify_table(
    store: Store,
    policy: DeidPolicy,
    table: str,
    *,
    text_fn: TextFn | None = None,
) -> DeidResult:
    """Write ``deid.<table>`` from ``harmonized.<table>`` under ``policy`` (inside the caller's
    transaction). ``text_fn(items, key)`` de-identifies ``[(patient, text)]`` for redact_text
    columns (default: the Presidio engine with deny-lists from the store)."""
    src = f"harmonized.{table}"
    out = f"deid.{table}"
    if not store.table_exists(src):
        return DeidResult(table, "skipped", reason="missing input")
    cols = store.columns(src)
    check_coverage(policy, table, [c for c, _ in cols])
    rule = policy.tables[table]
    con = store.con
    if not rule.release:
        con.execute(f"DROP TABLE IF EXISTS {out}")
        return DeidResult(table, "withheld", reason=rule.reason)

    ring = KeyRing(store.settings.keys_dir)
    kv = ring.version(policy.key_kind)
    key = ring.pseudonym_key(kv.version)
    params = keyed.SqlKey.from_key(key).params()

    person_sql, join = _person_join(rule, store)
    text_cols = [c for c, _ in cols if rule.columns[c].action == "redact_text"]
    # Rows need stable numbers only when text is redacted in Python and joined back.
    if text_cols:
        con.execute("DROP TABLE IF EXISTS temp.__deid_src")
        con.execute(
            f"CREATE TEMP TABLE __deid_src AS SELECT s.*, {person_sql} AS __person, "
            f"row_number() OVER () AS __rn FROM {src} s {join}"
        )
        src_sql = "__deid_src"
    else:
        src_sql = f"(SELECT s.*, {person_sql} AS __person FROM {src} s {join})"

    # HMACs are computed once per distinct value (a patient has many rows), then joined.
    ctes = [
        f"__src AS MATERIALIZED ({'SELECT * FROM ' + src_sql if text_cols else src_sql[1:-1]})",
        "__pm AS (SELECT k, "
        + keyed.sql_day_offset("k", policy.date_shift.max_days)
        + " AS off FROM (SELECT DISTINCT coalesce(__person, '') AS k FROM __src))",
    ]
    select: list[str] = []
    joins: list[str] = ["LEFT JOIN __pm ON __pm.k = coalesce(s.__person, '')"]
    actions: dict[str, str] = {}
    texts = 0
    registered: list[str] = []
    try:
        for i, (col, dtype) in enumerate(cols):
            r = rule.columns[col]
            expr = column_sql(col, dtype, r, policy)
            if expr is None:
                continue
            name = r.rename or col
            if r.action in ("pseudonymize", "uid"):
                m = f"__m{i}"
                distinct = f"SELECT DISTINCT {_q(col)} AS v FROM __src WHERE {_q(col)} IS NOT NULL"
                if r.action == "pseudonymize":
                    mapped = keyed.sql_pseudonym("v", r.domain or col, r.length)
                    ctes.append(f"{m} AS (SELECT v, {mapped} AS p FROM ({distinct}))")
                else:  # one HMAC per UID, then its two 64-bit halves
                    h = keyed.sql_hmac_hex("v", "dicom-uid")
                    ctes.append(
                        f"{m} AS (SELECT v, {keyed.sql_uid_from_hex('h')} AS p FROM "
                        f"(SELECT v, {h} AS h FROM ({distinct})))"
                    )
                joins.append(f"LEFT JOIN {m} ON {m}.v = s.{_q(col)}")
                expr = f"{m}.p"
            if r.action == "redact_text":
                rows = con.execute(
                    f"SELECT __rn, coalesce(__person, ''), CAST({_q(col)} AS VARCHAR) "
                    f"FROM __deid_src WHERE {_q(col)} IS NOT NULL"
                ).fetchall()
                fn = text_fn or default_text_fn(store, policy.date_shift.max_days)
                redacted = fn([(p, t) for _, p, t in rows], key) if rows else []
                view = f"__t_{col}"
                con.register(
                    view,
                    pa.table(
                        {
                            "__rn": pa.array([r0 for r0, _, _ in rows], pa.int64()),
                            "redacted": pa.array(redacted, pa.string()),
                        }
                    ),
                )
                registered.append(view)
                joins.append(f"LEFT JOIN {view} ON {view}.__rn = s.__rn")
                texts += len(rows)
            select.append(f"{expr} AS {_q(name)}")
            actions[name] = r.action if r.action != "generalize" else f"generalize:{r.to}"
        for name, add in rule.add.items():
            if add.value is not None:
                lit = add.value.replace("'", "''")
                select.append(f"'{lit}' AS {_q(name)}")
            elif add.flag_unless is not None:
                fc, fv = add.flag_unless
                lit = fv.replace("'", "''")
                select.append(f"(s.{_q(fc)} IS DISTINCT FROM '{lit}') AS {_q(name)}")
            actions[name] = "added"
        select.append(f"CAST({kv.version} AS INTEGER) AS key_version")
        con.execute(f"DROP TABLE IF EXISTS {out}")
        con.execute(
            f"CREATE TABLE {out} AS WITH {', '.join(ctes)} SELECT {', '.join(select)} "
            f"FROM __src s " + " ".join(joins),
            params,
        )
    finally:
        for v in registered:
            con.unregister(v)
        con.execute("DROP TABLE IF EXISTS temp.__deid_src")
    actual = {c for c, _ in cols}
    unused = sorted(c for c in rule.columns if c not in actual)
    return DeidResult(
        table,
        "written",
        rows=store.row_count(out),
        key_version=kv.version,
        key_fingerprint=kv.fingerprint,
        columns=actions,
        texts_redacted=texts,
        unused_rules=unused,
    )


def default_text_fn(
    store: Store,
    max_days: int = keyed.MAX_SHIFT_DAYS,
    *,
    workers: int | None = None,
    batch_size: int | None = None,
) -> TextFn:
    """Presidio engine with deny-lists from the store; one day offset per patient from the key.

    ``workers=None`` picks worker processes from the number of texts
    (:func:`~twin_pipeline.deid.text.pool_workers`: both cores from a few hundred notes up);
    the output is the same either way.
    """
    from twin_pipeline.deid.context import deny_index_from_store
    from twin_pipeline.deid.text import BATCH_SIZE, NoteContext, deidentify_stream, pool_workers

    idx = deny_index_from_store(store.con)
    size = batch_size or BATCH_SIZE

    def run(items: list[tuple[str, str]], key: bytes) -> list[str]:
        stream = (
            (
                text,
                NoteContext(
                    patient=p,
                    deny=idx.for_patient(p),
                    offset_days=keyed.day_offset(key, p, max_days),
                ),
            )
            for p, text in items
        )
        n = workers if workers is not None else pool_workers(len(items))
        return list(
            deidentify_stream(stream, key, staff=sorted(idx.staff), workers=n, batch_size=size)
        )

    return run
