"""The governed query gateway: every read by a person goes through :meth:`Gateway.query`.

One query is:

1. mapped to the user's role (unknown users are refused);
2. checked and rewritten by :mod:`twin_pipeline.policy.sqlcheck` (one read-only SELECT over
   relations the role may read; each relation replaced by its row-filtered, masked subquery);
3. cross-checked with DuckDB's own parser: the original text must be exactly one SELECT to
   DuckDB too, and DuckDB's parse of the rewritten SQL may only touch the relations, CTEs and
   table functions the rewrite allowed (so a disagreement between the two parsers fails closed);
4. run on a connection that cannot escape: external access (files, URLs, ATTACH, COPY,
   INSTALL/LOAD) disabled, extension auto-loading off, Python replacement scans off and the
   configuration locked, with a time limit and a row cap;
5. audited, allowed or denied, in the same hash-chained ledger as lineage (who, role, SQL,
   relations, rows returned, decision, reason, time). If the audit entry cannot be written the
   result is not returned.

The connection writes nothing but audit entries; it is read-write only because DuckDB allows one
attachment of the store file per process and the audit log lives in that file.
"""

from __future__ import annotations

import contextlib
import csv
import hmac
import io
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from twin_pipeline import ledger
from twin_pipeline.errors import AccessDenied, StoreError, TwinPipelineError
from twin_pipeline.keys import KeyRing
from twin_pipeline.lineage.storage import Sealer
from twin_pipeline.paths import Settings
from twin_pipeline.policy.masks import relation_query
from twin_pipeline.policy.model import PolicySet, Role, load_policies
from twin_pipeline.policy.sqlcheck import (
    CATALOG,
    CATALOG_SCHEMAS,
    QueryDenied,
    Rewritten,
    function_denied,
    rewrite,
)
from twin_pipeline.store import SCHEMAS, Store

LOCKDOWN = (
    "SET enable_external_access = false",
    "SET allow_community_extensions = false",
    "SET allow_unsigned_extensions = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET python_enable_replacements = false",
    "SET lock_configuration = true",
)
CHECKED_CACHE = 512  # query texts per gateway whose checked rewrite is kept
DUCKDB_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
_QUOTED = re.compile(r"'(?:[^']|'')*'")


class QueryFailed(TwinPipelineError):
    """An allowed query failed while running (bad column, type error, time limit)."""


@dataclass
class QueryResult:
    user: str
    role: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    relations: list[str]
    elapsed_ms: float
    audit_seq: int
    masks: dict[str, dict[str, str]] = field(default_factory=dict)  # relation -> col -> mask
    row_filters: dict[str, list[str]] = field(default_factory=dict)  # relation -> filter names

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue()

    def to_json(self) -> str:
        return json.dumps(
            {
                "user": self.user,
                "role": self.role,
                "columns": self.columns,
                "rows": self.records(),
                "row_count": len(self.rows),
                "truncated": self.truncated,
                "relations": self.relations,
                "masks": self.masks,
                "row_filters": self.row_filters,
            },
            indent=2,
            default=str,
        )


@dataclass
class _Compiled:
    sql: str  # the policy subquery
    masks: dict[str, str]
    filters: list[str]
    reads: set[str]


def sanitize_error(exc: BaseException) -> str:
    """First line of a DuckDB error with quoted values removed (they may come from rows a
    filter hides: filters and user predicates can be evaluated in either order)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _QUOTED.sub("'…'", first)


def _record_access(store: Store, **event: Any) -> int:
    """Audit one query; the caller seals (the gateway's :class:`Sealer`)."""
    from twin_pipeline.audit import record_access

    return int(record_access(store, seal=False, **event))


def _audit_event(store: Store, **event: Any) -> int:
    from twin_pipeline.audit import audit

    return int(audit(store, event, seal=False))


class Gateway:
    """Governed, audited read access to the twin store for people.

    Use as a context manager; the store stays open (and locked against other writers) until
    :meth:`close`. Not for concurrent use from several threads.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        policies: PolicySet | None = None,
        timeout_s: float = 60.0,
        memory_limit: str = "4GB",
        threads: int = 1,
        write_directories: Sequence[Path] = (),
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.policies = policies or load_policies()
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit
        # One DuckDB thread per governed query by default: interactive queries are small, the
        # hand-off between DuckDB worker threads dominates their latency on a busy machine
        # (measured ~8x on the audit append), and one user's query cannot take every core.
        self.threads = max(1, int(threads))
        # Folders the connection may still write to with external access off (a snapshot's
        # temporary output folder): DuckDB's allowed_directories, set before the lock.
        self.write_directories = [Path(d).resolve() for d in write_directories]
        self._store: Store | None = None
        self._relations: dict[str, list[tuple[str, str]]] = {}
        self._compiled: dict[tuple[str, str], _Compiled] = {}
        self._salt = ""
        self._lock = threading.Lock()
        self._watchdog: _Watchdog | None = None
        self._checked: OrderedDict[tuple[str, str], Rewritten] = OrderedDict()
        self._sealer: Sealer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> Gateway:
        if self._store is not None:
            return self
        if not self.settings.store_path.exists():
            raise StoreError(
                "no store yet: run `twin run` first", path=str(self.settings.store_path)
            )
        store = Store.open(self.settings, private=True)  # its settings get locked
        try:
            ledger.ensure(store)
            con = store.con
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            con.execute(f"SET threads = {self.threads}")
            if self.write_directories:
                dirs = ", ".join(
                    "'" + (str(d).rstrip("/") + "/").replace("'", "''") + "'"
                    for d in self.write_directories
                )
                con.execute(f"SET allowed_directories = [{dirs}]")
            for stmt in LOCKDOWN:
                con.execute(stmt)
            self._relations = {
                t: store.columns(t) for t in store.tables(SCHEMAS) if t.split(".")[0] in SCHEMAS
            }
        except BaseException:
            store.close()
            raise
        ring = KeyRing(self.settings.keys_dir)
        try:
            self._salt = hmac.new(
                ring.pseudonym_key(), b"twin-gateway-mask-v1", "sha256"
            ).hexdigest()[:32]
            self._sealer = Sealer(store, ring)  # needs the signing key: no audit without a seal
        except BaseException:
            store.close()
            raise
        self._store = store
        return self

    def audited(self, seq: int) -> int:
        """Hand the head just committed by an audit entry to the sealer; returns ``seq``."""
        store = self._store
        if self._sealer is not None and store is not None and not store._tx_depth:
            head = store._ledger_head
            if head is not None and head[0] == seq:
                self._sealer.note(head)
        return seq

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._sealer is not None:
            try:
                if self._store is not None:
                    self._sealer.close()  # the session's last word: its committed head, signed
            finally:
                self._sealer = None
        if self._store is not None:
            if not self._store.read_only and not self._store._tx_depth:
                # One session per `twin query`: each left its audit entries in a row group
                # (and a 256 KB block) of their own in the ledger. Merged when they add up;
                # a query never fails over it.
                with contextlib.suppress(duckdb.Error):
                    self._store.compact(("governance",), only=("governance.ledger",))
            self._store.close()
            self._store = None
        self._compiled.clear()
        self._checked.clear()

    def __enter__(self) -> Gateway:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Store:
        if self._store is None:
            self.open()
        assert self._store is not None
        return self._store

    # -- policy compilation -------------------------------------------------------------------
    def _compile(self, role_name: str, role: Role, relation: str) -> _Compiled:
        key = (role_name, relation)
        hit = self._compiled.get(key)
        if hit is None:
            q, masks, filters, reads = relation_query(
                relation, self._relations[relation], role, self._salt
            )
            missing = sorted(r for r in reads if r not in self._relations)
            if missing:
                raise QueryDenied(
                    f"row filter of role {role_name} on {relation} needs {', '.join(missing)}, "
                    "which is not in the store: refusing rather than showing unfiltered rows",
                    construct=relation,
                    relations=[relation],
                )
            sql = q.sql(dialect="duckdb", comments=False)
            hit = self._compiled[key] = _Compiled(sql, masks, filters, reads)
        return hit

    def describe(self, user: str) -> dict[str, Any]:
        """What ``user`` may read: relations with columns, masks and row filters (audited)."""
        store = self.store
        try:
            role_name, role = self.policies.role_of(user)
        except AccessDenied as exc:
            self.audited(
                _audit_event(
                    store,
                    action="describe",
                    user=user,
                    role="unknown",
                    decision="deny",
                    reason=str(exc),
                )
            )
            raise
        self.audited(
            _audit_event(store, action="describe", user=user, role=role_name, decision="allow")
        )
        out: dict[str, Any] = {}
        for rel, cols in sorted(self._relations.items()):
            if not role.may_read(rel):
                continue
            out[rel] = {
                "columns": [{"name": c, "type": t, "mask": role.mask_for(rel, c)} for c, t in cols],
                "row_filters": [f.name for f in role.filters_for(rel, [c for c, _ in cols])],
            }
        return {"user": user, "role": role_name, "relations": out}

    # -- the query path -----------------------------------------------------------------------
    def query(self, user: str, sql: str, *, limit: int | None = None) -> QueryResult:
        """Run one governed query as ``user``. Raises :class:`QueryDenied` (audited) when refused."""
        with self._lock:
            return self._query(user, sql, limit)

    def _query(self, user: str, sql: str, limit: int | None) -> QueryResult:
        store = self.store
        started = time.perf_counter()
        role_name = "unknown"
        relations: list[str] = []
        try:
            role_name, role = self.policies.role_of(user)
            try:
                rw = self._checked.get((role_name, sql))
                if rw is None:
                    rw = rewrite(
                        sql,
                        role_name=role_name,
                        may_read=role.may_read,
                        relations=self._relations,
                        relation_query=lambda rel: self._compile(role_name, role, rel).sql,
                        catalog_views=role.catalog_views,
                    )
                    relations = rw.relations
                    self._duckdb_agrees(sql, rw, role_name, role)
                    self._remember(role_name, sql, rw)
                else:
                    self._checked.move_to_end((role_name, sql))
                relations = rw.relations
            except RecursionError:
                raise QueryDenied("the query is nested too deeply", construct="nesting") from None
            except (AccessDenied, TwinPipelineError):
                raise
            except Exception as exc:  # a checker failure must fail closed, and be audited
                raise QueryDenied(
                    f"the query could not be checked ({type(exc).__name__})", construct="check"
                ) from exc
        except AccessDenied as exc:
            construct = getattr(exc, "construct", None)
            relations = getattr(exc, "relations", None) or relations
            self.audited(
                _record_access(
                    store,
                    user=user,
                    role=role_name,
                    sql=sql,
                    relations=relations,
                    rows=0,
                    decision="deny",
                    reason=str(exc),
                    status="denied",
                    construct=construct,
                    policy_version=self.policies.version,
                    elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
                )
            )
            raise
        cap = role.max_rows if limit is None else max(1, min(int(limit), role.max_rows))
        try:
            columns, rows = self._execute(store.con, rw.sql, cap + 1)
        except Exception as exc:  # DuckDB errors, and any failure converting the result
            reason = sanitize_error(exc) if isinstance(exc, duckdb.Error) else type(exc).__name__
            self.audited(
                _record_access(
                    store,
                    user=user,
                    role=role_name,
                    sql=sql,
                    relations=relations,
                    rows=0,
                    decision="allow",
                    reason=f"query failed: {reason}",
                    status="error",
                    policy_version=self.policies.version,
                    elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
                )
            )
            raise QueryFailed(f"query failed: {reason}") from None
        truncated = len(rows) > cap
        rows = rows[:cap]
        elapsed = (time.perf_counter() - started) * 1000
        seq = self.audited(
            _record_access(
                store,
                user=user,
                role=role_name,
                sql=sql,
                relations=relations,
                rows=len(rows),
                decision="allow",
                reason=None,
                status="ok",
                truncated=truncated,
                policy_version=self.policies.version,
                elapsed_ms=round(elapsed, 3),
            )
        )
        compiled = {
            r: self._compiled[(role_name, r)]
            for r in relations
            if "." in r and (role_name, r) in self._compiled
        }
        return QueryResult(
            user=user,
            role=role_name,
            columns=columns,
            rows=rows,
            truncated=truncated,
            relations=relations,
            elapsed_ms=elapsed,
            audit_seq=seq,
            masks={r: c.masks for r, c in compiled.items() if c.masks},
            row_filters={r: c.filters for r, c in compiled.items() if c.filters},
        )

    def _remember(self, role_name: str, sql: str, rw: Rewritten) -> None:
        """Keep the checked rewrite of a query text (policies and store tables are fixed for the
        gateway's lifetime, so the same text by the same role always checks the same way)."""
        self._checked[(role_name, sql)] = rw
        while len(self._checked) > CHECKED_CACHE:
            self._checked.popitem(last=False)

    def _execute(
        self, con: duckdb.DuckDBPyConnection, sql: str, fetch: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        if self._watchdog is None:
            self._watchdog = _Watchdog(con)
        self._watchdog.arm(self.timeout_s)
        try:
            cur = con.execute(sql)
            columns = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(fetch)
        except duckdb.InterruptException:
            raise duckdb.InterruptException(
                f"time limit of {self.timeout_s:g} s exceeded"
            ) from None
        finally:
            self._watchdog.disarm()
        return columns, rows

    # -- second opinion from DuckDB's parser --------------------------------------------------
    def _duckdb_agrees(self, sql: str, rw: Rewritten, role_name: str, role: Role) -> None:
        con = self.store.con
        try:
            kinds = [s.type for s in con.extract_statements(sql)]
        except (duckdb.Error, RuntimeError, IndexError) as exc:
            raise QueryDenied(
                f"DuckDB cannot parse the query: {sanitize_error(exc)}", construct="syntax"
            ) from None
        if len(kinds) != 1 or getattr(kinds[0], "name", "") != "SELECT":
            raise QueryDenied(
                "DuckDB does not read this as exactly one SELECT statement",
                construct="multiple statements" if len(kinds) != 1 else str(kinds[0]),
                relations=rw.relations,
            )
        row = con.execute("SELECT json_serialize_sql(?)", [rw.sql]).fetchone()
        tree: dict[str, Any] = json.loads(row[0]) if row else {"error": True}
        if tree.get("error") or len(tree.get("statements", [])) != 1:
            raise QueryDenied(
                "the rewritten query is not one SELECT to DuckDB", construct="statement"
            )
        allowed = set(rw.relations)
        for rel in rw.relations:
            c = self._compiled.get((role_name, rel))
            if c is not None:
                allowed |= c.reads
        ctes = set(rw.cte_names)
        for node in _walk(tree["statements"]):
            kind = node.get("type")
            if kind == "BASE_TABLE":
                cat = str(node.get("catalog_name", "")).lower()
                sch = str(node.get("schema_name", "")).lower()
                tab = str(node.get("table_name", "")).lower()
                # store tables may only be read by policy SQL (aliases in the reserved namespace)
                alias = str(node.get("alias", ""))
                ok = (
                    (cat == CATALOG and f"{sch}.{tab}" in allowed and alias.startswith("__"))
                    or (not cat and not sch and tab in ctes)
                    or (role.catalog_views and sch in CATALOG_SCHEMAS and f"{sch}.{tab}" in allowed)
                )
                if not ok or node.get("at_clause"):
                    name = ".".join(p for p in (cat, sch, tab) if p)
                    raise QueryDenied(
                        f"relation {name} is not readable by role {role_name}",
                        construct=name,
                        relations=rw.relations,
                    )
            elif kind == "TABLE_FUNCTION":
                fn = node.get("function") or {}
                name = str(fn.get("function_name", "?")).lower()
                if name not in DUCKDB_TABLE_FUNCTIONS:
                    raise QueryDenied(
                        f"table function {name}() is not allowed",
                        construct=f"{name}()",
                        relations=rw.relations,
                    )
            if node.get("class") == "FUNCTION" and function_denied(
                str(node.get("function_name", ""))
            ):
                name = str(node.get("function_name")).lower()
                raise QueryDenied(
                    f"function {name}() is not allowed",
                    construct=f"{name}()",
                    relations=rw.relations,
                )


class _Watchdog:
    """One thread per gateway that interrupts the running query when its time is up.

    A thread per query would cost more than the rest of the gateway, and so would waking this
    one for every query: it sleeps until the earliest deadline it knows of and is woken only
    when a new deadline is earlier than that (in steady use, about once per time limit).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._wake_at: float | None = None  # when the thread will look again (None: never)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="twin-gateway-watchdog", daemon=True)
        self._thread.start()

    def arm(self, seconds: float) -> None:
        with self._cond:
            self._deadline = time.monotonic() + seconds
            if self._wake_at is None or self._wake_at > self._deadline:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._wake_at = None
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._wake_at = self._deadline
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
                self._con.interrupt()


def _walk(obj: Any) -> Iterator[dict[str, Any]]:
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield cur
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
