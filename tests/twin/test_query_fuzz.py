"""Malformed patterns fail with QueryError only; well-formed ones compile to SQL that runs.

Values in property filters are bound as parameters, so quotes and SQL in them are inert."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.twin.graph import ensure_graph_tables
from twin_pipeline.twin.query import QueryError, match, parse_pattern

ident = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
value = st.text(
    alphabet=st.characters(blacklist_characters='"}', blacklist_categories=("Cs",)), max_size=12
)
node = st.builds(
    lambda t, f: t + (f"{{{f}}}" if f else ""),
    st.one_of(ident, st.just("*")),
    st.one_of(
        st.just(""),
        st.builds(lambda p, op, v: f'{p}{op}"{v}"', ident, st.sampled_from(["=", "~"]), value),
    ),
)
edge = st.builds(
    lambda rel, var, out: f"-{rel}{var}->" if out else f"<-{rel}{var}-",
    st.one_of(ident, st.just("*")),
    st.one_of(
        st.just(""),
        st.builds(lambda a, b: f"*{min(a, b)}..{max(a, b)}", st.integers(0, 3), st.integers(1, 3)),
    ),
    st.booleans(),
)
pattern = st.builds(
    lambda first, rest: first + "".join(f" {e} {n}" for e, n in rest),
    node,
    st.lists(st.tuples(edge, node), max_size=3),
)


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_parses_or_raises_query_error(text: str) -> None:
    with contextlib.suppress(QueryError):
        parse_pattern(text)


@pytest.fixture(scope="module")
def empty_graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    home: Path = tmp_path_factory.mktemp("fuzz_home")
    s = Settings.from_env(home).ensure()
    KeyRing(s.keys_dir).init()
    store = Store.open(s)
    ensure_graph_tables(store)
    store.con.execute(
        "INSERT INTO twin.twin.node VALUES ('A/1', 'A', 'dtmi:x:A;1', '1', 't', '{\"name\": \"x\"}', NULL), "
        "('B/2', 'B', 'dtmi:x:B;1', '2', 't', '{}', NULL)"
    )
    store.con.execute(
        "INSERT INTO twin.twin.edge VALUES ('A/1', 'r', 'B/2', 'A', 'B', NULL, NULL, 't', NULL)"
    )
    yield store
    store.close()


@given(pattern)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_well_formed_patterns_run(empty_graph: Store, text: str) -> None:
    res = match(empty_graph, text)
    assert all(len(r) == len(res.columns) for r in res.rows)


def test_injection_in_a_filter_value_is_inert(empty_graph: Store) -> None:
    res = match(empty_graph, 'A{name="x\' OR 1=1 --"} -r-> B')
    assert res.rows == []
    assert match(empty_graph, 'A{name="x"} -r-> B').rows == [("A/1", "B/2")]
    assert empty_graph.row_count("twin.node") == 2
