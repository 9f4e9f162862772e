"""Graph queries over ``twin.node``/``twin.edge``: neighbours, k-hop reach and paths (recursive
CTEs), node filters, and chain patterns with time windows.

A *pattern* is a chain of node and edge steps, Cypher-like::

    Device -attached_to-> Patient <-subject- Encounter -located_at-> * -part_of*0..2-> CareUnit{name="Intensive Care Unit"}

Nodes are an interface name or ``*``, optionally with property filters ``{prop=value,
prop~substring}``; edges are ``-rel->`` (outgoing) or ``<-rel-`` (incoming), ``rel`` may be ``*``
(any), and ``*min..max`` makes a variable-length hop over that relationship (compiled to a
recursive CTE). With a time window, every fixed hop whose edge has a validity period must overlap
the window (edges without one always match).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from twin_pipeline.errors import TwinPipelineError
from twin_pipeline.store import Store
from twin_pipeline.twin.graph import EDGE_TABLE, NODE_TABLE

MAX_HOPS = 8


class QueryError(TwinPipelineError):
    """A graph query is malformed."""


@dataclass(frozen=True)
class NodeStep:
    twin_type: str | None  # None: any
    filters: tuple[tuple[str, str, str], ...] = ()  # (prop, op, value), op in {'=', '~'}


@dataclass(frozen=True)
class EdgeStep:
    rel: str | None  # None: any
    outgoing: bool
    min_hops: int = 1
    max_hops: int = 1

    @property
    def variable(self) -> bool:
        return (self.min_hops, self.max_hops) != (1, 1)


@dataclass
class Pattern:
    nodes: list[NodeStep] = field(default_factory=list)
    edges: list[EdgeStep] = field(default_factory=list)


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_NODE_RE = re.compile(rf"\s*(?P<type>{_IDENT}|\*)(?:\{{(?P<filters>[^}}]*)\}})?\s*")
_EDGE_RE = re.compile(
    rf"\s*(?P<in><)?-(?P<rel>{_IDENT}|\*)?(?:\*(?P<min>\d+)\.\.(?P<max>\d+))?-(?P<out>>)?\s*"
)
_FILTER_RE = re.compile(
    rf"^\s*(?P<prop>{_IDENT})\s*(?P<op>=|~)\s*(?P<val>\"[^\"]*\"|'[^']*'|[^,]*?)\s*$"
)


def _filters(text: str | None, pattern: str) -> tuple[tuple[str, str, str], ...]:
    if not text or not text.strip():
        return ()
    out: list[tuple[str, str, str]] = []
    for part in _split_filters(text):
        m = _FILTER_RE.match(part)
        if not m:
            raise QueryError(f"bad property filter {part!r} in pattern {pattern!r}")
        val = m["val"]
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
            val = val[1:-1]
        out.append((m["prop"], m["op"], val))
    return tuple(out)


def _split_filters(text: str) -> list[str]:
    parts, buf, quote = [], "", ""
    for ch in text:
        if quote:
            buf += ch
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            buf += ch
        elif ch == ",":
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    return [p for p in parts if p.strip()]


def parse_pattern(text: str) -> Pattern:
    """Parse a chain pattern; raises :class:`QueryError` naming what is wrong."""
    pat = Pattern()
    pos = 0
    m = _NODE_RE.match(text, pos)
    if not m or not m.group("type"):
        raise QueryError(f"pattern must start with a node (Type or *): {text!r}")
    while True:
        t = m["type"]
        pat.nodes.append(NodeStep(None if t == "*" else t, _filters(m["filters"], text)))
        pos = m.end()
        if pos >= len(text):
            break
        e = _EDGE_RE.match(text, pos)
        if not e or e.end() == pos:
            raise QueryError(f"expected an edge like -rel-> or <-rel- at {text[pos:]!r}")
        if bool(e["in"]) == bool(e["out"]):
            raise QueryError(f"edge must have exactly one direction (-r-> or <-r-): {e[0]!r}")
        lo, hi = (int(e["min"]), int(e["max"])) if e["min"] is not None else (1, 1)
        if lo > hi or hi > MAX_HOPS or hi < 1:
            raise QueryError(f"hop range must satisfy 0 <= min <= max <= {MAX_HOPS}: {e[0]!r}")
        rel = e["rel"]
        pat.edges.append(EdgeStep(None if rel in (None, "*") else rel, bool(e["out"]), lo, hi))
        pos = e.end()
        m = _NODE_RE.match(text, pos)
        if not m or m.end() == pos:
            raise QueryError(f"expected a node after the edge at {text[pos:]!r}")
    return pat


def _node_where(alias: str, step: NodeStep, params: list[Any]) -> list[str]:
    conds: list[str] = []
    if step.twin_type:
        conds.append(f"{alias}.twin_type = ?")
        params.append(step.twin_type)
    for prop, op, val in step.filters:
        if prop == "id":
            conds.append(f"({alias}.source_id = ? OR {alias}.node_id = ?)")
            params.extend([val, val])
        elif op == "=":
            conds.append(f"json_extract_string({alias}.props, ?) = ?")
            params.extend([f"$.{prop}", val])
        else:
            conds.append(f"json_extract_string({alias}.props, ?) ILIKE ?")
            params.extend([f"$.{prop}", f"%{val}%"])
    return conds


def _window(
    alias: str, since: datetime | None, until: datetime | None, params: list[Any]
) -> list[str]:
    conds: list[str] = []
    if since is not None:
        conds.append(f"({alias}.valid_to IS NULL OR {alias}.valid_to >= ?)")
        params.append(since)
    if until is not None:
        conds.append(f"({alias}.valid_from IS NULL OR {alias}.valid_from <= ?)")
        params.append(until)
    return conds


def compile_pattern(
    pat: Pattern, *, since: datetime | None = None, until: datetime | None = None, limit: int = 1000
) -> tuple[str, list[Any]]:
    """SQL (and parameters) returning one row per match: n0, n1, ... node ids."""
    ctes: list[str] = []
    cte_params: list[Any] = []
    joins: list[str] = []
    join_params: list[Any] = []
    where_params: list[Any] = []
    where: list[str] = _node_where("n0", pat.nodes[0], where_params)
    for i, (edge, node) in enumerate(zip(pat.edges, pat.nodes[1:], strict=True)):
        a, b = f"n{i}", f"n{i + 1}"
        near, far = ("src", "dst") if edge.outgoing else ("dst", "src")
        if not edge.variable:
            e = f"e{i}"
            on = [f"{e}.{near} = {a}.node_id"]
            if edge.rel:
                on.append(f"{e}.rel = ?")
                join_params.append(edge.rel)
            on += _window(e, since, until, join_params)
            joins.append(f"JOIN {EDGE_TABLE} {e} ON {' AND '.join(on)}")
            joins.append(f"JOIN {NODE_TABLE} {b} ON {b}.node_id = {e}.{far}")
        else:
            r = f"reach{i}"
            rel_cond = "TRUE"
            if edge.rel:
                rel_cond = "e.rel = ?"
                cte_params.append(edge.rel)
            # Seeded from every node: fine for structural relationships (part_of, located_in).
            ctes.append(
                f"""{r}(start, node, depth, trail) AS (
                    SELECT node_id, node_id, 0, [node_id] FROM {NODE_TABLE}
                    UNION ALL
                    SELECT r.start, e.{far}, r.depth + 1, list_append(r.trail, e.{far})
                    FROM {r} r JOIN {EDGE_TABLE} e ON e.{near} = r.node
                    WHERE r.depth < {edge.max_hops} AND {rel_cond}
                      AND NOT list_contains(r.trail, e.{far}))"""
            )
            joins.append(
                f"JOIN (SELECT DISTINCT start, node FROM {r} WHERE depth >= {edge.min_hops}) {r}j "
                f"ON {r}j.start = {a}.node_id"
            )
            joins.append(f"JOIN {NODE_TABLE} {b} ON {b}.node_id = {r}j.node")
        where += _node_where(b, node, where_params)
    cols = ", ".join(f"n{i}.node_id AS n{i}" for i in range(len(pat.nodes)))
    with_sql = f"WITH RECURSIVE {', '.join(ctes)} " if ctes else ""
    sql = (
        f"{with_sql}SELECT DISTINCT {cols} FROM {NODE_TABLE} n0 {' '.join(joins)} "
        f"WHERE {' AND '.join(where) or 'TRUE'} ORDER BY ALL LIMIT {int(limit)}"
    )
    return sql, [*cte_params, *join_params, *where_params]


@dataclass
class MatchResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def match(
    store: Store,
    pattern: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 1000,
) -> MatchResult:
    pat = parse_pattern(pattern)
    sql, params = compile_pattern(pat, since=since, until=until, limit=limit)
    rows = store.con.execute(sql, params).fetchall()
    return MatchResult([f"n{i}" for i in range(len(pat.nodes))], [tuple(r) for r in rows])


def as_of(store: Store) -> datetime | None:
    """The latest time the twin knows about (edge validity or timestamped properties)."""
    row = store.con.execute(
        f"SELECT max(t) FROM (SELECT max(valid_from) AS t FROM {EDGE_TABLE} "
        f"UNION ALL SELECT max(valid_to) FROM {EDGE_TABLE} WHERE valid_to IS NOT NULL)"
    ).fetchone()
    return row[0] if row else None


def window_since(
    store: Store, hours: float, now: datetime | None = None
) -> tuple[datetime | None, datetime | None]:
    """``[now - hours, now]`` with ``now`` defaulting to the twin's as-of time."""
    now = now or as_of(store)
    if now is None:
        return None, None
    return now - timedelta(hours=hours), now


def neighbours(
    store: Store,
    node_id: str,
    *,
    rel: str | None = None,
    direction: str = "both",
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """Nodes one edge away from ``node_id`` (``direction`` out/in/both)."""
    if direction not in ("out", "in", "both"):
        raise QueryError(f"direction must be out, in or both, not {direction!r}")
    parts: list[str] = []
    params: list[Any] = []
    for d, near, far in (("out", "src", "dst"), ("in", "dst", "src")):
        if direction not in (d, "both"):
            continue
        conds = [f"e.{near} = ?"]
        p: list[Any] = [node_id]
        if rel:
            conds.append("e.rel = ?")
            p.append(rel)
        conds += _window("e", since, until, p)
        parts.append(
            f"SELECT '{d}' AS direction, e.rel, n.node_id, n.twin_type, CAST(n.props AS VARCHAR), "
            f"e.valid_from, e.valid_to FROM {EDGE_TABLE} e JOIN {NODE_TABLE} n "
            f"ON n.node_id = e.{far} WHERE {' AND '.join(conds)}"
        )
        params += p
    rows = store.con.execute(" UNION ALL ".join(parts) + " ORDER BY ALL", params).fetchall()
    keys = ["direction", "rel", "node_id", "twin_type", "props", "valid_from", "valid_to"]
    return [dict(zip(keys, r, strict=True)) for r in rows]


def k_hop(
    store: Store,
    node_id: str,
    k: int,
    *,
    rels: Sequence[str] | None = None,
    directed: bool = False,
) -> list[dict[str, Any]]:
    """Every node within ``k`` hops of ``node_id`` with its shortest distance (recursive CTE)."""
    if not 1 <= k <= MAX_HOPS:
        raise QueryError(f"k must be between 1 and {MAX_HOPS}")
    adj, adj_params = _adjacency(rels, directed)
    rows = store.con.execute(
        f"""
        WITH RECURSIVE adj AS ({adj}),
        walk(node, depth, trail) AS (
            SELECT ?::VARCHAR, 0, [?::VARCHAR]
            UNION ALL
            SELECT a.b, w.depth + 1, list_append(w.trail, a.b)
            FROM walk w JOIN adj a ON a.a = w.node
            WHERE w.depth < ? AND NOT list_contains(w.trail, a.b))
        SELECT w.node, n.twin_type, min(w.depth) AS distance
        FROM walk w JOIN {NODE_TABLE} n ON n.node_id = w.node
        WHERE w.depth > 0
        GROUP BY ALL ORDER BY distance, w.node
        """,
        [*adj_params, node_id, node_id, k],
    ).fetchall()
    return [{"node_id": r[0], "twin_type": r[1], "distance": int(r[2])} for r in rows]


def _adjacency(rels: Sequence[str] | None, directed: bool) -> tuple[str, list[Any]]:
    cond = "TRUE"
    params: list[Any] = []
    if rels:
        cond = f"rel IN ({', '.join('?' for _ in rels)})"
        params = list(rels)
    sql = f"SELECT src AS a, dst AS b, rel FROM {EDGE_TABLE} WHERE {cond}"
    if not directed:
        sql += f" UNION ALL SELECT dst, src, rel FROM {EDGE_TABLE} WHERE {cond}"
        params = params + params
    return sql, params


def paths(
    store: Store,
    src: str,
    dst: str,
    *,
    max_hops: int = 4,
    rels: Sequence[str] | None = None,
    directed: bool = False,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Simple paths from ``src`` to ``dst`` up to ``max_hops`` edges, shortest first."""
    if not 1 <= max_hops <= MAX_HOPS:
        raise QueryError(f"max_hops must be between 1 and {MAX_HOPS}")
    adj, adj_params = _adjacency(rels, directed)
    rows = store.con.execute(
        f"""
        WITH RECURSIVE adj AS ({adj}),
        walk(node, depth, trail, rels) AS (
            SELECT ?::VARCHAR, 0, [?::VARCHAR], []::VARCHAR[]
            UNION ALL
            SELECT a.b, w.depth + 1, list_append(w.trail, a.b), list_append(w.rels, a.rel)
            FROM walk w JOIN adj a ON a.a = w.node
            WHERE w.depth < ? AND NOT list_contains(w.trail, a.b) AND w.node <> ?)
        SELECT DISTINCT trail, rels, depth FROM walk WHERE node = ? AND depth > 0
        ORDER BY depth, trail LIMIT ?
        """,
        [*adj_params, src, src, max_hops, dst, dst, limit],
    ).fetchall()
    return [{"nodes": list(r[0]), "rels": list(r[1]), "hops": int(r[2])} for r in rows]


def filter_nodes(
    store: Store,
    twin_type: str | None = None,
    *,
    where: Sequence[str] = (),
    limit: int = 1000,
) -> list[dict[str, Any]]:
    """Nodes of a type whose properties match ``prop=value`` / ``prop~substring`` filters."""
    step = NodeStep(twin_type, _filters(",".join(where), ",".join(where)) if where else ())
    params: list[Any] = []
    conds = _node_where("n", step, params)
    rows = store.con.execute(
        f"SELECT node_id, twin_type, model_id, CAST(props AS VARCHAR) FROM {NODE_TABLE} n "
        f"WHERE {' AND '.join(conds) or 'TRUE'} ORDER BY node_id LIMIT {int(limit)}",
        params,
    ).fetchall()
    return [{"node_id": r[0], "twin_type": r[1], "model_id": r[2], "props": r[3]} for r in rows]
