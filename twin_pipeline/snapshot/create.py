"""``twin snapshot create``: a signed, reproducible, k-anonymous Parquet export for researchers.

The flow, all on the access gateway's locked connection (one attachment of the store, external
access off, so nothing here can read or write files through SQL):

1. the snapshot policy (``policies/snapshot.yaml``) decides whether the user's role may export
   at all, and only tables of the de-identified schema are ever exported; refusals are audited;
2. every table is read through the gateway as the user: one governed query counting every
   relation the export reads (:meth:`Gateway.query`: the gateway's own allow/deny decision and
   one audit entry naming them all), then the gateway's policy subquery for each relation (the
   role's row filters, e.g. research consent, and column masks) is the only way the export
   reads it;
3. released patients: consent (again, whatever the role's filters), not deleted, the cohort's
   criteria, then k-anonymity by suppression over the policy's quasi-identifiers, in SQL
   (:func:`.disclosure.k_anonymize_sql`): the released and suppressed ids stay in scratch
   tables of the connection's in-memory catalog and are joined, never passed as lists;
4. each table's released rows are written by DuckDB itself (``COPY (SELECT ...) TO ... (FORMAT
   parquet, RETURN_STATS)``, :func:`.writer.copy_parquet`), in the store's order (or sorted by
   lineage key, ``parquet.order``) with fixed writer settings, so the bytes are reproducible.
   The connection runs one DuckDB thread (see :mod:`.writer` for why); tables are exported
   several at once on cursors of their own, one per core. Row count, size and key versions come
   from the writer's statistics; each file is read once more, for its sha256, while the next
   table is written. The gateway's connection stays locked (external access off); the only
   place it may write is the snapshot's own temporary folder, allowed (DuckDB
   ``allowed_directories``) before the lock;
5. the manifest, PROV-JSON lineage, dataset card and public key are written, the manifest is
   signed with the current signing key, and in one store transaction the export is audited
   (:func:`twin_pipeline.audit.record_access`), recorded as an activity in the ledger whose
   output is the snapshot, and its PROV bundle is signed and stored. Only then does the folder
   appear (an atomic rename), so no snapshot exists without its audit and lineage records.

The interactive row cap of the role (``max_rows``) does not apply: bulk export is governed by
the snapshot policy (who may export, consent, k-anonymity) instead.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twin_pipeline import activity as act
from twin_pipeline.audit import record_access
from twin_pipeline.errors import AccessDenied, ConfigError, PolicyViolation
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import POLICIES_DIR, Settings
from twin_pipeline.policy import Gateway, PolicySet, Role, load_policies
from twin_pipeline.snapshot import card, manifest, provenance
from twin_pipeline.snapshot.config import (
    Cohort,
    SnapshotPolicy,
    load_cohort,
    load_snapshot_policy,
)
from twin_pipeline.snapshot.disclosure import KAnonResult, Scratch, ident, k_anonymize_sql, qi_sql
from twin_pipeline.snapshot.writer import WrittenFile, copy_parquet, duckdb_writer_id
from twin_pipeline.store import Store, fully_qualified

# DuckDB types Parquet cannot hold as such (or only as DuckDB-specific extension types): exported
# as their text form, e.g. INTERVAL '3 days'.
AS_TEXT = frozenset({"INTERVAL", "UHUGEINT", "VARINT", "BIGNUM", "TIME WITH TIME ZONE", "TIMETZ"})
_IDS = "(SELECT unnest(CAST(? AS VARCHAR[])))"
# Tables exported at once (one per core, at most this many): each writer holds a row group in
# memory, and they share the gateway connection's memory limit.
MAX_WORKERS = 8


class _ExportGateway(Gateway):
    """The access gateway, plus the policy subquery of one relation for bulk export.

    The subquery is the one :meth:`Gateway.query` splices in for a table reference: the role's
    row filters and column masks over ``twin.<schema>.<table>``.
    """

    def policy_relation(
        self, role_name: str, role: Role, relation: str
    ) -> tuple[str, dict[str, str], list[str]]:
        compiled = self._compile(role_name, role, relation)
        return compiled.sql, dict(compiled.masks), list(compiled.filters)

    def columns(self, relation: str) -> list[tuple[str, str]]:
        return list(self._relations[relation])


@dataclass
class SnapshotResult:
    out: Path
    snapshot_id: str
    manifest_sha256: str
    tables: list[dict[str, Any]]
    rows: int
    bytes: int
    seconds: float
    disclosure: dict[str, Any]
    audit_seq: int
    excluded: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "snapshot_id": self.snapshot_id,
            "manifest_sha256": self.manifest_sha256,
            "rows": self.rows,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows / self.seconds) if self.seconds else None,
            "tables": {t["table"]: t["rows"] for t in self.tables},
            "disclosure_control": self.disclosure,
            "excluded_tables": self.excluded,
            "audit_seq": self.audit_seq,
        }


@dataclass
class _Plan:
    relation: str
    columns: list[tuple[str, str]]
    link: str  # "patient_id" | "via deid.x.key" | "reference"
    sql: str = ""
    masks: dict[str, str] = field(default_factory=dict)
    filters: list[str] = field(default_factory=list)
    visible: int = 0


def _source_versions(store: Store, tables: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rows, content hash and producing run of each table's current version (read-only: the
    version cache is used when its row count still matches, else the hash is computed)."""
    known: dict[str, tuple[int, str, str | None]] = {}
    if store.table_exists("governance.table_version"):
        for name, rows, h, run in store.con.execute(
            "SELECT table_name, row_count, content_hash, run_id FROM governance.table_version"
        ).fetchall():
            known[str(name)] = (int(rows), str(h), str(run) if run else None)
    out: dict[str, dict[str, Any]] = {}
    row = (
        store.con.execute(
            "SELECT "
            + ", ".join(
                f"(SELECT count(*) FROM {fully_qualified(t)}) AS n{i}" for i, t in enumerate(tables)
            )
        ).fetchone()
        if tables
        else None
    )
    for i, t in enumerate(tables):
        rows = int(row[i]) if row else 0
        if t in known and known[t][0] == rows:
            out[t] = {"rows": rows, "content_hash": known[t][1], "run_id": known[t][2]}
        else:
            out[t] = {"rows": rows, "content_hash": store.content_hash(t), "run_id": None}
    return out


def _tmp_folder(out: Path) -> Path:
    """Where the snapshot is assembled before its atomic rename to ``out``."""
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"


def _prepare_out(out: Path, force: bool, tmp: Path) -> Path:
    if out.exists():
        if not out.is_dir():
            raise ConfigError("output exists and is not a folder", path=str(out))
        if any(out.iterdir()) and not force:
            raise ConfigError(
                "output folder is not empty (use --force to replace it)", path=str(out)
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(parents=True)
    return tmp


def create_snapshot(
    user: str,
    out: Path,
    *,
    cohort_path: Path | None = None,
    tables: Sequence[str] | None = None,
    settings: Settings | None = None,
    policies: PolicySet | None = None,
    snapshot_policy: SnapshotPolicy | None = None,
    policies_dir: Path | None = None,
    force: bool = False,
) -> SnapshotResult:
    """Export a snapshot as ``user`` into ``out`` (see the module docstring)."""
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat()
    settings = settings or Settings.from_env()
    pdir = policies_dir or POLICIES_DIR
    access = policies or load_policies(pdir)
    spolicy = snapshot_policy or load_snapshot_policy(pdir / "snapshot.yaml")
    cohort: Cohort | None = None
    cohort_sha: str | None = None
    if cohort_path is not None:
        cohort, cohort_sha = load_cohort(Path(cohort_path))
    name = cohort.name if cohort else "consented-patients"
    out = Path(out).resolve()
    as_of = (cohort.as_of_year if cohort and cohort.as_of_year else None) or (
        spolicy.k_anonymity.as_of_year
    )
    command = f"twin snapshot create (cohort {name})"
    keyring = KeyRing(settings.keys_dir)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("output folder is not empty (use --force to replace it)", path=str(out))

    tmp = _tmp_folder(out)
    # One DuckDB thread: with more, DuckDB's order-keeping COPY of a query that joins (the
    # consent filter does) orders rows and cuts row groups by scheduling. The cores are used by
    # exporting tables side by side (_export_tables). The one folder it may write to is tmp.
    gw = _ExportGateway(settings, policies=access, threads=1, write_directories=[tmp])
    with gw:
        store = gw.store
        role_name = "unknown"

        def deny(reason: str, relations: Sequence[str] = ()) -> AccessDenied:
            record_access(
                store,
                user=user,
                role=role_name,
                sql=command,
                relations=list(relations),
                rows=0,
                decision="deny",
                reason=reason,
                action="snapshot",
                policy_version=access.version,
            )
            return AccessDenied(reason)

        try:
            role_name, role = access.role_of(user)
        except AccessDenied as exc:
            raise deny(str(exc)) from None
        if role_name not in spolicy.roles:
            raise deny(
                f"user {user!r} (role {role_name}) may not create snapshots "
                f"(snapshot policy allows: {', '.join(spolicy.roles)})"
            )
        existing = set(store.tables())
        schema = spolicy.source_schema
        excluded: dict[str, str] = {}
        if tables:
            selected = sorted(dict.fromkeys(tables))
            for rel in selected:
                if rel.split(".")[0] != schema:
                    raise deny(
                        f"{rel} is not a de-identified table: snapshots export only "
                        f"{schema}.* tables",
                        [rel],
                    )
                if rel not in existing:
                    raise ConfigError(f"no table {rel} in the store")
                if not role.may_read(rel):
                    raise deny(f"role {role_name} may not read {rel}", [rel])
        else:
            selected = sorted(
                rel
                for rel in existing
                if rel.split(".")[0] == schema
                and any(fnmatch.fnmatchcase(rel, p) for p in spolicy.tables)
            )
            for rel in [r for r in selected if not role.may_read(r)]:
                excluded[rel] = f"not readable by role {role_name}"
            selected = [r for r in selected if role.may_read(r)]
        pt = spolicy.patient
        if pt.table not in existing:
            raise ConfigError(
                f"the patient table {pt.table} is not in the store (run the pipeline)"
            )
        if not role.may_read(pt.table):
            raise deny(f"role {role_name} may not read the patient table {pt.table}", [pt.table])

        # -- plan each table: how its rows reach a patient -----------------------------------
        plans: dict[str, _Plan] = {}
        for rel in selected:
            cols = gw.columns(rel)
            names = {c for c, _ in cols}
            if pt.key in names:
                plans[rel] = _Plan(rel, cols, pt.key)
            elif rel in spolicy.links:
                link = spolicy.links[rel]
                if link.key not in names:
                    raise ConfigError(f"link of {rel}: it has no column {link.key}")
                plans[rel] = _Plan(rel, cols, f"via {link.via}.{link.key}")
            elif rel in spolicy.reference_tables:
                plans[rel] = _Plan(rel, cols, "reference")
            else:
                why = (
                    f"no {pt.key} column, no link to a patient and not a reference table in "
                    "the snapshot policy: cannot be restricted to released patients"
                )
                if tables:
                    raise PolicyViolation(f"{rel}: {why}")
                excluded[rel] = why
        # Every relation read goes through the gateway first (its decision, its audit entry).
        reads = set(plans) | {pt.table}
        reads |= {spolicy.links[r].via for r, p in plans.items() if p.link.startswith("via")}
        condition_table = f"{schema}.condition"
        if cohort and cohort.include.conditions:
            if condition_table not in existing:
                raise ConfigError(
                    f"the cohort selects on conditions but {condition_table} is absent"
                )
            reads.add(condition_table)
        # One governed query counts every relation the export reads (the gateway's decision
        # over all of them, one audit entry naming them all); raises QueryDenied.
        ordered_reads = sorted(reads)
        res = gw.query(
            user,
            "SELECT "
            + ", ".join(
                f"(SELECT count(*) FROM {rel}) AS n{i}" for i, rel in enumerate(ordered_reads)
            ),
        )
        visible = {rel: int(res.rows[0][i]) for i, rel in enumerate(ordered_reads)}
        sql_of: dict[str, str] = {}
        for rel in sorted(reads):
            sql_of[rel] = gw.policy_relation(role_name, role, rel)[0]
        for rel, plan in plans.items():
            plan.sql, plan.masks, plan.filters = gw.policy_relation(role_name, role, rel)
            plan.visible = visible[rel]
        # Rows reach released patients through these columns: a mask on one would silently
        # drop (or wrongly keep) rows, so refuse instead.
        for rel in sorted(reads):
            masks = gw.policy_relation(role_name, role, rel)[1]
            keys = {pt.key} | {link.key for r, link in spolicy.links.items() if link.via == rel}
            if rel in spolicy.links:
                keys.add(spolicy.links[rel].key)
            masked = sorted(k for k in keys if k in masks)
            if masked:
                raise PolicyViolation(
                    f"role {role_name} masks {', '.join(masked)} of {rel} ({masks[masked[0]]}); "
                    "rows cannot be linked to released patients, refusing to export"
                )
        con = store.con

        # -- released patients ---------------------------------------------------------------
        pcols = {c for c, _ in gw.columns(pt.table)}
        conds: list[str] = [f"__p.{ident(pt.key)} IS NOT NULL"]
        params: list[Any] = []
        if spolicy.exclude_deleted and "deleted" in pcols:
            conds.append("NOT coalesce(__p.deleted, false)")
        if spolicy.require_research_consent:
            if pt.consent_column not in pcols:
                raise PolicyViolation(
                    f"{pt.table} has no {pt.consent_column} column: research consent cannot be "
                    "checked, refusing to export"
                )
            conds.append(f"__p.{ident(pt.consent_column)} IS TRUE")
        if cohort:
            inc = cohort.include
            if inc.gender:
                conds.append(f"lower(CAST(__p.{ident(pt.gender_column)} AS VARCHAR)) IN {_IDS}")
                params.append(list(inc.gender))
            if inc.age_min is not None or inc.age_max is not None:
                if pt.birth_year_column not in pcols:
                    raise ConfigError(f"the cohort selects on age but {pt.table} has no birth year")
                age = f"({int(as_of)} - try_cast(__p.{ident(pt.birth_year_column)} AS INTEGER))"
                if inc.age_min is not None:
                    conds.append(f"{age} >= ?")
                    params.append(inc.age_min)
                if inc.age_max is not None:
                    conds.append(f"{age} <= ?")
                    params.append(inc.age_max)
            if inc.conditions:
                ccols = {c for c, _ in gw.columns(condition_table)}
                cc = [f"CAST(__c.code AS VARCHAR) IN {_IDS}"]
                params_c: list[Any] = [list(inc.conditions)]
                if inc.condition_system:
                    cc.append("__c.code_system = ?")
                    params_c.append(inc.condition_system)
                if spolicy.exclude_deleted and "deleted" in ccols:
                    cc.append("NOT coalesce(__c.deleted, false)")
                conds.append(
                    f"CAST(__p.{ident(pt.key)} AS VARCHAR) IN (SELECT CAST(__c.patient_id AS "
                    f"VARCHAR) FROM ({sql_of[condition_table]}) AS __c WHERE {' AND '.join(cc)})"
                )
                params.extend(params_c)
        qis = spolicy.k_anonymity.quasi_identifiers
        for q in qis:
            if q.source not in pcols:
                raise ConfigError(
                    f"quasi-identifier {q.name}: {pt.table} has no column {q.source}",
                    path=str(pdir / "snapshot.yaml"),
                )
        qi_exprs = [qi_sql(q, f"__p.{ident(q.source)}", as_of) for q in qis]
        # Released and suppressed ids stay in DuckDB: scratch tables in the connection's own
        # in-memory catalog (not the store), seen by every export cursor, dropped at the end.
        scratch = Scratch.named(f"memory.main.__snapshot_{uuid.uuid4().hex[:12]}")
        try:
            kres: KAnonResult = k_anonymize_sql(
                con,
                f"SELECT __p.{ident(pt.key)}, {', '.join(qi_exprs)} "
                f"FROM ({sql_of[pt.table]}) AS __p WHERE {' AND '.join(conds)}",
                params,
                spolicy.k_anonymity.k,
                [q.name for q in qis],
                scratch,
            )
            _prepare_out(out, force, tmp)
            exported = _export_tables(
                con,
                [plans[rel] for rel in sorted(plans)],
                spolicy=spolicy,
                scratch=scratch,
                any_suppressed=kres.patients_suppressed > 0,
                patient_table=pt.table,
                qis=qis,
                as_of=as_of,
                tmp=tmp,
                sql_of=sql_of,
                workers=min(os.cpu_count() or 1, MAX_WORKERS),
            )
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            _record_failure(store, user, role_name, command, sorted(plans), access, exc)
            raise
        finally:
            with contextlib.suppress(Exception):
                scratch.drop(con)
        try:
            table_docs = [e.doc for e in exported]
            rows_suppressed = {e.doc["table"]: e.suppressed for e in exported}
            key_versions_in_data = sorted({v for e in exported for v in e.key_versions})
            sources = _source_versions(store, sorted(reads))
            for doc in table_docs:
                doc["source_version"] = sources[doc["table"]]
            result = _finish(
                store=store,
                keyring=keyring,
                tmp=tmp,
                out=out,
                force=force,
                user=user,
                role_name=role_name,
                name=name,
                cohort=cohort,
                cohort_sha=cohort_sha,
                as_of=as_of,
                spolicy=spolicy,
                kres=kres,
                rows_suppressed=rows_suppressed,
                table_docs=table_docs,
                key_versions_in_data=key_versions_in_data,
                sources=sources,
                excluded=excluded,
                pdir=pdir,
                access=access,
                command=command,
                started=started,
                started_at=started_at,
            )
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            _record_failure(store, user, role_name, command, sorted(plans), access, exc)
            raise
    return result


def _record_failure(
    store: Store,
    user: str,
    role_name: str,
    command: str,
    relations: list[str],
    access: PolicySet,
    exc: BaseException,
) -> None:
    """Audit a snapshot that failed after it was allowed (best effort: the error is raised)."""
    with contextlib.suppress(Exception):
        record_access(
            store,
            user=user,
            role=role_name,
            sql=command,
            relations=relations,
            rows=0,
            decision="allow",
            reason=f"snapshot failed: {type(exc).__name__}: {str(exc)[:300]}",
            action="snapshot",
            status="error",
            policy_version=access.version,
        )


def _link_predicate(plan: _Plan, spolicy: SnapshotPolicy, via_sql: str | None, ids: str) -> str:
    """SQL that keeps rows of the patients in table ``ids`` (column ``pid``), over alias ``__t``."""
    key = spolicy.patient.key
    if plan.link == key:
        return f"CAST(__t.{ident(key)} AS VARCHAR) IN (SELECT pid FROM {ids})"
    link = spolicy.links[plan.relation]
    assert via_sql is not None
    return (
        f"CAST(__t.{ident(link.key)} AS VARCHAR) IN (SELECT CAST(__v.{ident(link.key)} AS "
        f"VARCHAR) FROM ({via_sql}) AS __v WHERE CAST(__v.{ident(key)} AS VARCHAR) IN "
        f"(SELECT pid FROM {ids}))"
    )


@dataclass
class _Exported:
    doc: dict[str, Any]
    suppressed: int  # rows of suppressed patients left out
    key_versions: set[int]  # pseudonym key versions in the released rows


def _export_tables(
    con: Any, plans: Sequence[_Plan], *, workers: int, **kwargs: Any
) -> list[_Exported]:
    """Export every table, several at once: each worker has its own cursor on the export
    connection (one DuckDB thread each, see :mod:`.writer`) and its own share of the tables,
    largest first, so the files do not depend on how many workers there are. Results come
    back in the order of ``plans``."""
    n = max(1, min(int(workers), len(plans)))
    shares: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(plans)), key=lambda i: (-plans[i].visible, plans[i].relation)):
        w = load.index(min(load))
        shares[w].append(i)
        load[w] += max(plans[i].visible, 1)
    cursors = [con.cursor() for _ in range(n)]
    results: dict[int, _Exported] = {}

    def work(w: int) -> None:
        for i in shares[w]:
            results[i] = _export_table(cursors[w], plans[i], **kwargs)

    try:
        if n == 1:
            work(0)
        else:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="twin-snapshot") as pool:
                for fut in [pool.submit(work, w) for w in range(n)]:
                    fut.result()
    finally:
        for cur in cursors:
            with contextlib.suppress(Exception):
                cur.close()
    return [results[i] for i in range(len(plans))]


def _key_versions(cur: Any, written: WrittenFile, select_sql: str) -> set[int]:
    """Key versions in the written rows: from the writer's statistics when one version (min =
    max) or none (all NULL) is present, else one DISTINCT over the released rows."""
    st = written.stats.get("key_version")
    if st is None or written.rows == 0:
        return set()
    if st.get("null_count") == str(written.rows):
        return set()
    lo, hi = st.get("min"), st.get("max")
    values: list[Any] = [lo] if lo is not None and lo == hi else []
    if not values:
        values = [
            v
            for (v,) in cur.execute(
                f"SELECT DISTINCT key_version FROM ({select_sql}) WHERE key_version IS NOT NULL"
            ).fetchall()
        ]
    out: set[int] = set()
    for v in values:
        with contextlib.suppress(TypeError, ValueError):
            out.add(int(v))
    return out


def _export_table(
    cur: Any,
    plan: _Plan,
    *,
    spolicy: SnapshotPolicy,
    scratch: Scratch,
    any_suppressed: bool,
    patient_table: str,
    qis: Sequence[Any],
    as_of: int,
    tmp: Path,
    sql_of: dict[str, str],
) -> _Exported:
    names = [c for c, _ in plan.columns]
    items: list[str] = []
    released_names: list[str] = []
    generalized = {q.source: q for q in qis} if plan.relation == patient_table else {}
    done: set[str] = set()
    types = dict(plan.columns)
    for c in names:
        q = generalized.get(c)
        if q is not None:
            if q.name in done:
                continue
            items.append(f"{qi_sql(q, f'__t.{ident(c)}', as_of)} AS {ident(q.name)}")
            released_names.append(q.name)
            done.add(q.name)
        elif c in {x.name for x in generalized.values()} and c not in generalized:
            continue  # a column named like a generalized field would shadow it
        elif types[c].upper() in AS_TEXT:
            items.append(f"CAST(__t.{ident(c)} AS VARCHAR) AS {ident(c)}")
            released_names.append(c)
        else:
            items.append(f"__t.{ident(c)}")
            released_names.append(c)
    where: list[str] = []
    via_sql = sql_of[spolicy.links[plan.relation].via] if plan.link.startswith("via") else None
    if spolicy.exclude_deleted and "deleted" in names:
        where.append("NOT coalesce(__t.deleted, false)")
    supp_where = list(where)
    if plan.link != "reference":
        where.append(_link_predicate(plan, spolicy, via_sql, scratch.released))
        supp_where.append(_link_predicate(plan, spolicy, via_sql, scratch.suppressed))
    select = f"SELECT {', '.join(items)} FROM ({plan.sql}) AS __t" + (
        f" WHERE {' AND '.join(where)}" if where else ""
    )
    order = ""
    if spolicy.parquet.order == "lineage_key":
        keys = []
        if "lineage_key" in released_names:
            keys.append(str(released_names.index("lineage_key") + 1))
        keys += [str(i + 1) for i, n in enumerate(released_names) if n != "lineage_key"]
        order = f" ORDER BY {', '.join(keys)}"
    fname = f"data/{plan.relation.split('.', 1)[1]}.parquet"
    written = copy_parquet(cur, select + order, [], tmp / fname, spolicy.parquet)
    n_supp = 0
    if plan.link != "reference" and any_suppressed:
        # only the link and deleted columns are read (DuckDB prunes the rest of the subquery)
        row = cur.execute(
            f"SELECT count(*) FROM ({plan.sql}) AS __t WHERE {' AND '.join(supp_where)}"
        ).fetchone()
        n_supp = int(row[0]) if row else 0
    doc = {
        "table": plan.relation,
        "file": fname,
        "rows": written.rows,
        "bytes": written.bytes,
        "sha256": written.sha256,
        "schema": written.schema,
        "masks": plan.masks,
        "row_filters": plan.filters,
        "patient_link": plan.link,
        "rows_visible_to_role": plan.visible,
    }
    return _Exported(doc, n_supp, _key_versions(cur, written, select))


def _finish(
    *,
    store: Store,
    keyring: KeyRing,
    tmp: Path,
    out: Path,
    force: bool,
    user: str,
    role_name: str,
    name: str,
    cohort: Cohort | None,
    cohort_sha: str | None,
    as_of: int,
    spolicy: SnapshotPolicy,
    kres: KAnonResult,
    rows_suppressed: dict[str, int],
    table_docs: list[dict[str, Any]],
    key_versions_in_data: list[int],
    sources: dict[str, dict[str, Any]],
    excluded: dict[str, str],
    pdir: Path,
    access: PolicySet,
    command: str,
    started: float,
    started_at: str,
) -> SnapshotResult:
    """Manifest, lineage, card, signature; audit + activity + PROV in one transaction; publish."""
    pt = spolicy.patient
    ka = spolicy.k_anonymity
    released_as = {
        "age_band": lambda q: f"age band of {q.width} years as of {as_of}, {q.top}+ top-coded",
        "zip3": lambda q: "three-digit ZIP area",
        "none": lambda q: "as recorded (lower case)",
    }
    filters = sorted({f for t in table_docs for f in t["row_filters"]})
    key_versions = act.key_versions(keyring.dir)
    body: dict[str, Any] = {
        "format": manifest.FORMAT,
        "name": name,
        "created_by": {"user": user, "role": role_name},
        "cohort": (
            {**cohort.model_dump(), "as_of_year": as_of, "file_sha256": cohort_sha}
            if cohort
            else None
        ),
        "selection": {
            "research_consent": spolicy.require_research_consent,
            "exclude_deleted": spolicy.exclude_deleted,
            "gateway_row_filters": filters,
        },
        "disclosure_control": {
            **kres.summary(),
            "as_of_year": as_of,
            "patient_table": pt.table,
            "generalized_fields": [
                {"name": q.name, "source": q.source, "released_as": released_as[q.generalize](q)}
                for q in ka.quasi_identifiers
            ],
            "rows_suppressed": {**rows_suppressed, "total": sum(rows_suppressed.values())},
        },
        "tables": table_docs,
        "excluded_tables": excluded,
        "source_versions": sources,
        "source_run_ids": sorted({str(v["run_id"]) for v in sources.values() if v["run_id"]}),
        "policy_versions": act.policy_versions(pdir),
        "key_versions": {
            **key_versions,
            "pseudonym_versions_in_data": key_versions_in_data,
        },
        "code_version": act.code_version(),
        "parquet": {
            **spolicy.parquet.model_dump(),
            "writer": duckdb_writer_id(),
            "order": (
                "lineage_key, then every column"
                if spolicy.parquet.order == "lineage_key"
                else "the store's order of each table (one writer thread per file)"
            ),
        },
    }
    snapshot_id = hashlib.sha256(manifest.canonical(body)).hexdigest()
    body["snapshot_id"] = snapshot_id
    signing = keyring.version("signing")
    body["signature"] = {
        "algorithm": "Ed25519",
        "file": manifest.SIGNATURE,
        "public_key": manifest.PUBLIC_KEY,
        "key_version": signing.version,
        "key_fingerprint": signing.fingerprint,
        "message": "domain tag + sha256 of manifest.json bytes",
    }
    lineage = provenance.build(
        snapshot_id=snapshot_id,
        name=name,
        user=user,
        role=role_name,
        tables=table_docs,
        policy_versions=body["policy_versions"],
        key_versions=key_versions,
        code_version=body["code_version"],
        k=ka.k,
    )
    (tmp / "lineage.json").write_text(lineage)
    (tmp / "README.md").write_text(card.render(body, pdir))
    (tmp / manifest.PUBLIC_KEY).write_bytes(keyring.public_key_pem(signing.version))
    files: dict[str, dict[str, Any]] = {
        t["file"]: {"sha256": t["sha256"], "bytes": t["bytes"]} for t in table_docs
    }
    for rel in ("lineage.json", "README.md", manifest.PUBLIC_KEY):
        p = tmp / rel
        files[rel] = {
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "bytes": p.stat().st_size,
        }
    body["files"] = dict(sorted(files.items()))
    manifest_bytes = manifest.canonical(body)
    (tmp / manifest.MANIFEST).write_bytes(manifest_bytes)
    (tmp / manifest.SIGNATURE).write_text(
        manifest.sign(manifest_bytes, keyring.signing_key(signing.version))
    )
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()

    from twin_pipeline.lineage import runs, storage

    total_rows = sum(int(t["rows"]) for t in table_docs)
    total_bytes = sum(int(f["bytes"]) for f in files.values()) + len(manifest_bytes)
    dc = body["disclosure_control"]
    with store.transaction():
        seq = record_access(
            store,
            user=user,
            role=role_name,
            sql=command,
            relations=sorted(sources),
            rows=total_rows,
            decision="allow",
            reason=None,
            action="snapshot",
            status="ok",
            snapshot_id=snapshot_id,
            manifest_sha256=manifest_sha,
            out=str(out),
            tables={t["table"]: t["rows"] for t in table_docs},
            k=ka.k,
            patients_released=dc["patients_released"],
            patients_suppressed=dc["patients_suppressed"],
            rows_suppressed=dc["rows_suppressed"]["total"],
            smallest_class_size=dc["smallest_class_size"],
            policy_version=access.version,
        )
        record = act.ActivityRecord(
            activity_id=f"{store.run_id}:snapshot/{name}:{snapshot_id[:8]}",
            run_id=store.run_id,
            asset_key=f"snapshot/{name}",
            started_at=started_at,
            ended_at=datetime.now(UTC).isoformat(),
            user=user,
            role=role_name,
            inputs=sorted(sources),
            input_versions=[
                act.TableVersion(t, int(v["rows"]), str(v["content_hash"]))
                for t, v in sorted(sources.items())
            ],
            outputs=[act.TableVersion(provenance.SNAPSHOT_TABLE, total_rows, snapshot_id)],
            params={
                "snapshot_id": snapshot_id,
                "manifest_sha256": manifest_sha,
                "out": str(out),
                "cohort": name,
                "k": ka.k,
                "audit_seq": seq,
            },
            code_version=body["code_version"],
            policy_versions=body["policy_versions"],
            key_versions=key_versions,
        )
        act.record_activity(store, record)  # ledger entry (and, in current code, its PROV)
        runs.ensure(store)
        has_prov = store.con.execute(
            "SELECT count(*) FROM governance.prov_activity WHERE activity_id = ?",
            [record.activity_id],
        ).fetchone()
        if not (has_prov and has_prov[0]):
            runs.record_prov(store, record)
        # the run's fragments merged, as the pipeline's finalize_run stores them
        storage.store_bundle(store, store.run_id, runs.run_json(store, store.run_id), keyring)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return SnapshotResult(
        out=out,
        snapshot_id=snapshot_id,
        manifest_sha256=manifest_sha,
        tables=table_docs,
        rows=total_rows,
        bytes=total_bytes,
        seconds=time.perf_counter() - started,
        disclosure=dc,
        audit_seq=seq,
        excluded=excluded,
    )
