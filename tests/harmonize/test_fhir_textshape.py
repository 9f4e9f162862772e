"""Verdicts read straight from the NDJSON text equal the parser's and the model's (Hypothesis).

The reference for every line is the authority itself: parse, the reader's own checks, then the
R4B model (``validate_full``), with the row metadata read from the parsed resource.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline.sources import fhir as fhir_source

from .test_fhir_fastcheck import SAMPLES, TRICKY_STRINGS, _leaf_paths, _set


def _compact(res: dict[str, Any]) -> str:
    return json.dumps(res, separators=(",", ":"), ensure_ascii=False)


def reference(line: str) -> tuple[Any, Any]:
    try:
        res = fhir_source._loads(line)
    except ValueError as exc:
        return ("broken_json", f"invalid JSON: {exc}"), None
    problem = fhir_source._check_resource(res) or fhir_source.validate_full(res)
    return problem, fhir_source._meta_of(res) if isinstance(res, dict) else None


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    fhir_source.reset_validation()
    yield
    fhir_source.reset_validation()


def _learn(text: str) -> None:
    """Teach the text shape of ``text`` (a valid resource) to this process."""
    assert fhir_source._process_texts([text]) == [reference(text)]


VALID = [_compact(r) for r in SAMPLES if reference(_compact(r))[0] is None]


def test_a_known_text_shape_is_decided_without_parsing() -> None:
    base = json.loads(VALID[0])
    lines = []
    for i in range(40):
        r = copy.deepcopy(base)
        r["id"] = f"copy-{i}"
        lines.append(_compact(r))
    _learn(VALID[0])
    got = fhir_source._process_texts(lines)
    assert got == [reference(line) for line in lines]
    assert fhir_source.validation_stats()["text_fast"] >= 39
    assert {m[1] for _, m in got} == {f"copy-{i}" for i in range(40)}


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda t: t.replace('"id":"', '"id":"",  "id":"', 1), id="duplicate-key"),
        pytest.param(lambda t: t.replace('"id":', '"id" :', 1), id="space-before-colon"),
        pytest.param(lambda t: t.replace('"id":"', '"id":"\\u0041', 1), id="escape"),
        pytest.param(lambda t: t.replace('"id":"', '"id":"\t', 1), id="tab-in-string"),
        pytest.param(lambda t: t.replace('"id":"', '"id":"\u00a0', 1), id="nbsp-in-string"),
        pytest.param(lambda t: t.replace('"id":"', '"id":"', 1) + " x", id="trailing-garbage"),
        pytest.param(lambda t: t.replace('"id":"', '"ID":"', 1), id="unknown-key"),
        pytest.param(lambda t: t[:-1], id="truncated"),
        pytest.param(lambda t: "\ufeff" + t, id="bom"),
        pytest.param(lambda t: t.replace('"id":"', '"id":""', 1), id="quote-in-value"),
    ],
)
def test_edited_text_gets_the_models_verdict(edit: Any) -> None:
    for line in VALID:
        _learn(line)
    for line in VALID:
        edited = edit(line)
        assert fhir_source._process_texts([edited]) == [reference(edited)], edited[:120]


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("01", "number"),
        ("1.", "number"),
        ("-0", "number"),
        ("1e5", "number"),
        ("1E+2", "number"),
        ("NaN", "number"),
        ("Infinity", "number"),
        ("true", "number"),
        ("null", "number"),
        ("truex", "number"),
        ("1" * 5000, "number"),
        ("9" * 60 + "e999", "number"),
        ('"12"', "number"),
        ("12", "string"),
        ("null", "string"),
        ("false", "string"),
        ("[]", "string"),
        ("{}", "string"),
    ],
)
def test_literals_in_place_of_values(value: str, path: str) -> None:
    """A literal where the learnt shape had a number (``valueQuantity.value``) or a string
    (``status``): only a literal of the same kind keeps the skeleton, and its value is then
    validated by the field type; anything else goes to the parser and the model."""
    obs = next(json.loads(v) for v in VALID if '"valueQuantity"' in v)
    line = _compact(obs)
    _learn(line)
    if path == "number":
        old = json.dumps(obs["valueQuantity"]["value"])
        edited = line.replace(f'"value":{old}', f'"value":{value}', 1)
    else:
        edited = line.replace(f'"status":"{obs["status"]}"', f'"status":{value}', 1)
    assert edited != line
    assert fhir_source._process_texts([edited]) == [reference(edited)]


@st.composite
def mutated_leaves(draw: st.DrawFn) -> tuple[str, str]:
    original = draw(st.sampled_from([json.loads(v) for v in VALID]))
    res = copy.deepcopy(original)
    for path in draw(
        st.lists(st.sampled_from(_leaf_paths(res)), min_size=1, max_size=3, unique=True)
    ):
        node: Any = res
        for p in path:
            node = node[p]
        value = draw(
            st.one_of(
                st.sampled_from(TRICKY_STRINGS),
                st.text(max_size=12),
                st.sampled_from([0, -1, 7, 2**63, 0.5, -1.5, 1e300, True, False, None]),
            )
            if not isinstance(node, bool | int | float)
            else st.sampled_from([0, -1, 7, 2**31, 0.1, 98.6, True, None, "5", "x"])
        )
        _set(res, path, value)
    return _compact(original), _compact(res)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_leaves())
def test_leaf_values_verdict_equals_the_model(pair: tuple[str, str]) -> None:
    original, line = pair
    _learn(original)
    assert fhir_source._process_texts([line]) == [reference(line)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(list('"{}[],:0123456789.eE+-tfnul x\\'))),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from(["insert", "replace", "delete"]),
)
def test_text_edits_verdict_equals_the_parser_and_model(
    original: str, edits: list[tuple[int, str]], how: str
) -> None:
    """Random edits of the raw text (quotes, brackets, digits, literal letters): whatever
    the text becomes, the verdict and row metadata are the reference's."""
    _learn(original)
    line = original
    for pos, ch in edits:
        i = pos % (len(line) + 1)
        if how == "insert":
            line = line[:i] + ch + line[i:]
        elif how == "replace":
            line = line[:i] + ch + line[i + 1 :]
        else:
            line = line[:i] + line[i + 1 :]
    assert fhir_source._process_texts([line]) == [reference(line)]


def test_same_skeleton_other_resource_type_is_not_confused() -> None:
    """Two resources with the same structure and keys but another resourceType."""
    a = '{"resourceType":"Organization","id":"o1","name":"A"}'
    b = '{"resourceType":"Location","id":"l1","name":"B"}'
    _learn(a)
    got = fhir_source._process_texts([b, b.replace("Location", "Basic")])
    assert got == [reference(b), reference(b.replace("Location", "Basic"))]
    assert got[0][1][0] == "Location"
