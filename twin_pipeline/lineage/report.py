"""The auditor report: one self-contained HTML page (inline CSS and SVG, no scripts, no CDN).

Sections: tamper verification (hash chain and signatures), the lineage graph of the twin as it is
now (source files → assets → tables → snapshots/simulation results, laid out in layers as inline
SVG), runs with their signed PROV bundles, validation outcomes and quarantine, and a summary of
the access log. Built from the ledger, ``governance.*`` and the live tables only.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twin_pipeline import __version__
from twin_pipeline.activity import activities
from twin_pipeline.lineage import prov_build, storage
from twin_pipeline.store import Store

MAX_ROWS = 50


@dataclass
class Node:
    id: str
    kind: str  # source | asset | table | snapshot | validation
    label: str
    detail: str = ""
    layer: int = 0
    order: int = 0


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def edge(self, a: str, b: str) -> None:
        if a != b:
            self.edges.add((a, b))


def _source_group(path: str, kind: str) -> str:
    parts = path.split("/")
    if path.startswith("/"):  # a file outside the landing folder (e.g. a scenario spec)
        folder = parts[-2] if len(parts) > 2 else "/"
    else:
        folder = parts[0] if len(parts) > 1 else "."
    return f"{kind}: {folder}"


def _table_node_kind(table: str) -> str:
    t = prov_build.table_kind(table)
    return {
        prov_build.VALIDATION_RESULT: "validation",
        prov_build.SNAPSHOT: "snapshot",
        prov_build.SIMULATION_RESULT: "snapshot",
    }.get(t, "table")


# Written by nearly every stage; shown as a table in the report instead of as a graph hub.
HIDDEN_TABLES = frozenset({"governance.quarantine"})


def lineage_graph(store: Store) -> Graph:
    """The current twin: the latest activity of each asset, its files, inputs and outputs.

    An activity that rewrites a table it also reads (an expectation check removing failed rows)
    is drawn after that table, with its other outputs (validation results) after it.
    """
    latest: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in activities(store):
        latest[rec["asset_key"]] = rec
        for f in rec.get("source_files") or []:
            group = _source_group(str(f["path"]), str(f.get("kind") or "file"))
            files[rec["asset_key"]][group].append(f)
    g = Graph()
    for asset, rec in latest.items():
        ins = {str(tv["table"]) for tv in rec.get("input_versions") or []}
        updated = sorted(
            str(tv["table"]) for tv in rec.get("outputs") or [] if str(tv["table"]) in ins
        )
        detail = (
            f"updates {', '.join(updated)}"
            if updated
            else f"run {str(rec['run_id'])[:8]} by {rec.get('user')} ({rec.get('role')})"
        )
        a = g.add(Node(f"asset:{asset}", "asset", asset, detail))
        for group, fl in sorted(files[asset].items()):
            size = sum(int(f.get("size") or 0) for f in fl)
            s = g.add(Node(f"source:{group}", "source", group, f"{len(fl)} files, {size:,} bytes"))
            g.edge(s, a)
        for tv in rec.get("input_versions") or []:
            if tv["table"] in HIDDEN_TABLES:
                continue
            t = g.add(Node(f"table:{tv['table']}", _table_node_kind(tv["table"]), tv["table"]))
            g.edge(t, a)
        for tv in rec.get("outputs") or []:
            if tv["table"] in HIDDEN_TABLES or tv["table"] in ins:
                continue
            node = Node(
                f"table:{tv['table']}",
                _table_node_kind(tv["table"]),
                tv["table"],
                f"{int(tv['rows']):,} rows, hash {str(tv['content_hash'])[:12]}",
            )
            existing = g.nodes.get(node.id)
            if existing is not None:
                existing.detail = node.detail
            t = g.add(node)
            g.edge(a, t)
    _layout(g)
    return g


def _layout(g: Graph) -> None:
    """Longest-path layering (sources left), then barycentre ordering within each layer."""
    preds: dict[str, list[str]] = defaultdict(list)
    for a, b in g.edges:
        preds[b].append(a)
    memo: dict[str, int] = {}

    def depth(n: str, stack: frozenset[str] = frozenset()) -> int:
        if n in memo:
            return memo[n]
        if n in stack:  # a cycle: cut it
            return 0
        if not preds[n]:
            d = 0 if g.nodes[n].kind == "source" else 1  # sources alone in the first column
        else:
            d = 1 + max(depth(p, stack | {n}) for p in preds[n])
        memo[n] = d
        return d

    for nid, node in g.nodes.items():
        node.layer = depth(nid)
    by_layer: dict[int, list[Node]] = defaultdict(list)
    for node in g.nodes.values():
        by_layer[node.layer].append(node)
    for layer in sorted(by_layer):
        nodes = by_layer[layer]

        def key(n: Node) -> tuple[float, str, str]:
            ps = [g.nodes[p].order for p in preds[n.id] if g.nodes[p].layer < n.layer]
            return (sum(ps) / len(ps) if ps else -1.0, n.kind, n.label)

        for i, node in enumerate(sorted(nodes, key=key)):
            node.order = i


COLORS = {
    "source": ("#fde7c8", "#c27c0e"),
    "asset": ("#d7e8fb", "#1f5fa8"),
    "table": ("#dff3e3", "#237a3b"),
    "validation": ("#f3e0f7", "#7b2f95"),
    "snapshot": ("#fbdada", "#a32323"),
}
NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 250, 44, 56, 12, 16


def render_svg(g: Graph) -> str:
    if not g.nodes:
        return '<p class="empty">No materializations recorded yet.</p>'
    layers = max(n.layer for n in g.nodes.values()) + 1
    rows = max(n.order for n in g.nodes.values()) + 1
    width = PAD * 2 + layers * NODE_W + (layers - 1) * GAP_X
    height = PAD * 2 + rows * NODE_H + (rows - 1) * GAP_Y

    def pos(n: Node) -> tuple[int, int]:
        return PAD + n.layer * (NODE_W + GAP_X), PAD + n.order * (NODE_H + GAP_Y)

    out = [
        f'<svg id="lineage-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="lineage graph: sources, assets, tables, snapshots">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
        'fill="#666"/></marker></defs>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for a, b in sorted(g.edges):
        na, nb = g.nodes[a], g.nodes[b]
        (xa, ya), (xb, yb) = pos(na), pos(nb)
        x1, y1 = xa + NODE_W, ya + NODE_H // 2
        x2, y2 = xb, yb + NODE_H // 2
        if x2 <= x1:  # same or earlier layer: route around
            x2, y2 = xb + NODE_W // 2, yb
        mid = (x1 + x2) / 2
        out.append(
            f'<path class="edge" data-from="{html.escape(a)}" data-to="{html.escape(b)}" '
            f'd="M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}" fill="none" stroke="#888" '
            'stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
    for n in sorted(g.nodes.values(), key=lambda n: (n.layer, n.order)):
        x, y = pos(n)
        fill, stroke = COLORS.get(n.kind, ("#eee", "#555"))
        label = n.label if len(n.label) <= 34 else n.label[:33] + "…"
        detail = n.detail if len(n.detail) <= 42 else n.detail[:41] + "…"
        out.append(
            f'<g class="node node-{n.kind}" data-kind="{n.kind}" data-id="{html.escape(n.id)}">'
            f"<title>{html.escape(n.label)}: {html.escape(n.detail)}</title>"
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2"/>'
            f'<text x="{x + 8}" y="{y + 19}" font-size="13" font-weight="600" fill="#111">'
            f"{html.escape(label)}</text>"
            f'<text x="{x + 8}" y="{y + 36}" font-size="11" fill="#444">{html.escape(detail)}'
            "</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r)
        + "</tr>"
        for r in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _validation_section(store: Store) -> str:
    parts = []
    for t in store.tables(("governance",)):
        if prov_build.table_kind(t) != prov_build.VALIDATION_RESULT:
            continue
        cols = [c for c, _ in store.columns(t)]
        parts.append(f"<h3>{html.escape(t)} ({store.row_count(t):,} rows)</h3>")
        if set(cols) >= _SUITE_COLUMNS:
            parts.append(_suite_summary(store, t))
            continue
        rows = store.con.execute(f"SELECT * FROM {t} LIMIT {MAX_ROWS}").fetchall()
        parts.append(_table(cols, [[_cell(v) for v in r] for r in rows], "validation"))
    q = store.con.execute(
        "SELECT stage, table_name, rule, count(*) FROM governance.quarantine "
        "GROUP BY ALL ORDER BY 4 DESC, 1, 2, 3 LIMIT 100"
    ).fetchall()
    parts.append("<h3>Quarantine by stage, table and rule</h3>")
    parts.append(_table(["stage", "table", "rule", "records"], [list(r) for r in q], "quarantine"))
    return "\n".join(parts)


_SUITE_COLUMNS = frozenset(
    {"suite", "table_name", "expectation", "severity", "passed", "failed_rows", "quarantined_rows"}
)


def _suite_summary(store: Store, table: str) -> str:
    """Outcome per suite (latest result of each expectation), then every failed expectation."""
    order = "created_at" if any(c == "created_at" for c, _ in store.columns(table)) else "rowid"
    latest = (
        f"SELECT * FROM {table} QUALIFY row_number() OVER "
        f"(PARTITION BY suite, expectation ORDER BY {order} DESC) = 1"
    )
    per_suite = store.con.execute(
        f"SELECT suite, table_name, count(*), count(*) FILTER (passed), "
        f"count(*) FILTER (NOT passed AND severity = 'error'), "
        f"count(*) FILTER (NOT passed AND severity <> 'error'), "
        f"coalesce(sum(failed_rows), 0), coalesce(sum(quarantined_rows), 0) "
        f"FROM ({latest}) GROUP BY ALL ORDER BY 5 DESC, 6 DESC, 1"
    ).fetchall()
    failed = store.con.execute(
        f"SELECT suite, expectation, severity, failed_rows, quarantined_rows "
        f"FROM ({latest}) WHERE NOT passed ORDER BY severity, suite, expectation LIMIT 200"
    ).fetchall()
    return (
        _table(
            [
                "suite",
                "table",
                "expectations",
                "passed",
                "failed (error)",
                "failed (warning)",
                "failed rows",
                "quarantined rows",
            ],
            [list(r) for r in per_suite],
            "validation",
        )
        + "<h3>Failed expectations</h3>"
        + _table(
            ["suite", "expectation", "severity", "failed rows", "quarantined rows"],
            [list(r) for r in failed],
            "validation-failed",
        )
    )


def _cell(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= 120 else s[:119] + "…"


def _access_section(store: Store) -> str:
    from twin_pipeline.audit import access_events

    events = access_events(store)
    by = Counter((e.get("user"), e.get("role"), e.get("decision")) for e in events)
    rel = Counter(r for e in events for r in e.get("relations") or [])
    parts = [
        f"<p>{len(events):,} audited accesses: "
        f"{sum(1 for e in events if e.get('decision') == 'allow'):,} allowed, "
        f"{sum(1 for e in events if e.get('decision') == 'deny'):,} denied.</p>",
        _table(
            ["user", "role", "decision", "count"],
            [[u, r, d, n] for (u, r, d), n in sorted(by.items(), key=lambda kv: -kv[1])],
            "access-summary",
        ),
        "<h3>Relations read</h3>",
        _table(["relation", "queries"], [[k, n] for k, n in rel.most_common(30)]),
        "<h3>Latest accesses</h3>",
        _table(
            ["seq", "at", "user", "role", "decision", "rows", "relations", "reason", "sql"],
            [
                [
                    e["seq"],
                    str(e.get("at", ""))[:19],
                    e.get("user"),
                    e.get("role"),
                    e.get("decision"),
                    e.get("rows"),
                    ", ".join(e.get("relations") or []),
                    e.get("reason"),
                    _cell(e.get("sql") or ""),
                ]
                for e in events[-MAX_ROWS:][::-1]
            ],
            "access-log",
        ),
    ]
    return "\n".join(parts)


def _sources_section(store: Store) -> str:
    rows = store.con.execute(
        "SELECT path, kind, sha256, size_bytes, records_in, records_loaded, records_quarantined, "
        "first_seen FROM governance.source_file ORDER BY path"
    ).fetchall()
    total = len(rows)
    shown = [[*r[:2], r[2], f"{int(r[3] or 0):,}", *r[4:7], str(r[7])[:19]] for r in rows[:500]]
    return (
        f"<details><summary>{total:,} registered source files"
        + (" (first 500 shown)" if total > 500 else "")
        + "</summary>"
        + _table(
            [
                "path",
                "kind",
                "sha256",
                "bytes",
                "records in",
                "loaded",
                "quarantined",
                "first seen",
            ],
            shown,
            "sources",
        )
        + "</details>"
    )


def _runs_section(store: Store) -> str:
    runs = {
        r[0]: r
        for r in store.con.execute(
            "SELECT run_id, started_at, finished_at, user_name, role, status FROM governance.run"
        ).fetchall()
    }
    first_act: dict[str, dict[str, Any]] = {}
    for rec in activities(store):
        first_act.setdefault(str(rec["run_id"]), rec)
    rows = []
    for b in storage.bundles(store):
        r = runs.get(b.run_id)
        a = first_act.get(b.run_id, {})
        rows.append(
            [
                b.run_id,
                r[3] if r else a.get("user", ""),
                r[4] if r else a.get("role", ""),
                r[5] if r else ("materialized" if a else "nothing materialized"),
                str(r[1])[:19] if r else str(a.get("started_at", ""))[:19],
                f"{b.sha256[:16]}…",
                f"v{b.key_version} ({b.key_fingerprint})",
                b.ledger_seq,
            ]
        )
    return _table(
        [
            "run",
            "user",
            "role",
            "status",
            "started",
            "PROV bundle sha256",
            "signing key",
            "closes seq",
        ],
        rows,
        "runs",
    )


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.empty{color:#888}.ok{color:#1b7a36;font-weight:600}.bad{color:#b00020;font-weight:600}
.graph{overflow:auto;border:1px solid #ddd;padding:4px;background:#fff}
.legend span{display:inline-block;margin-right:14px;font-size:12px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;border:1px solid #555;vertical-align:middle}
"""


def build_report(store: Store) -> str:
    """The report as one HTML string."""
    from twin_pipeline.audit import verify_all

    verify = verify_all(store)
    g = lineage_graph(store)
    kinds = Counter(n.kind for n in g.nodes.values())
    status = (
        f'<p class="ok" id="verify-status">Verified: {verify.ledger_entries:,} ledger entries '
        f"chain correctly and {verify.bundles} PROV bundles carry valid Ed25519 signatures.</p>"
        if verify.ok
        else '<p class="bad" id="verify-status">Tampering or damage detected. First bad record: '
        f"{html.escape(str(verify.first_bad))}</p>"
        + _table(["problem"], [[str(p)] for p in verify.problems])
    )
    legend = "".join(
        f'<span><i style="background:{COLORS[k][0]};border-color:{COLORS[k][1]}"></i>{k} '
        f"({kinds.get(k, 0)})</span>"
        for k in COLORS
    )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>twin-pipeline lineage and audit report</title>
<style>{CSS}</style></head>
<body>
<h1>Lineage and audit report</h1>
<p>twin-pipeline {html.escape(__version__)} · store {html.escape(str(store.settings.store_path))} · generated {now}</p>
<h2>Tamper evidence</h2>
{status}
<h2>Lineage graph</h2>
<p class="legend">{legend}</p>
<p class="note">Each asset as last materialized; governance.quarantine, written by most stages, is
summarised under validation outcomes instead of drawn.</p>
<div class="graph">{render_svg(g)}</div>
<h2>Source files</h2>
{_sources_section(store)}
<h2>Runs and signed PROV bundles</h2>
{_runs_section(store)}
<h2>Validation outcomes</h2>
{_validation_section(store)}
<h2>Access log</h2>
{_access_section(store)}
</body></html>
"""
