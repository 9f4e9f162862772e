"""The shape-compiled fast path gives exactly the full model's verdicts (Hypothesis)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline.harmonize.fhir_fastcheck import FastValidator, shape
from twin_pipeline.sources.fhir import _check_bindings, _model, validate_full

from .conftest import FIXTURES

TRICKY_STRINGS = [
    "",
    " ",
    "a b",
    " padded ",
    "two  spaces",
    "x" * 65,
    "ok-id.1",
    "2024-02-30",
    "2024-02-29",
    "2023-02-29",
    "2024-13-01T00:00:00Z",
    "2024-03-01T10:00:00",
    "2024-03-01T10:00:00+01:00",
    "2024-03-01T25:00:00Z",
    "1999",
    "1999-07",
    "10:61:00",
    "12:30:00",
    "urn:uuid:0b3f",
    "http://x y",
    "Patient/123",
    "+5",
    "1e3",
    "0.5",
    "true",
    "\n",
    "ünïcødé",
    "aGVsbG8=",
    "not base64!",
]


def _samples() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bulk = FIXTURES / "ehr" / "bulk" / "Observation.ndjson"
    for line in bulk.read_text().splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if validate_full(obj) is None:
            out.append(obj)
    bundle = json.loads((FIXTURES / "ehr" / "bundles" / "tx-0001.json").read_text())
    for e in bundle["entry"]:
        if "resource" in e:
            r = copy.deepcopy(e["resource"])
            r.setdefault("id", "x1")
            out.append(r)
    synthea = Path(__file__).resolve().parents[3] / "shared" / "data" / "synthea-10"
    for name in ("Patient", "Encounter", "Device", "Immunization", "MedicationRequest"):
        f = synthea / f"{name}.000.ndjson"
        if f.exists():
            out.append(json.loads(f.read_text().splitlines()[0]))
    return out


SAMPLES = _samples()


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [
            p for k, v in node.items() if k != "resourceType" for p in _leaf_paths(v, (*prefix, k))
        ]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaf_paths(v, (*prefix, i))]
    return [prefix]


def _set(node: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _same_type_value(draw: st.DrawFn, old: Any) -> Any:
    if isinstance(old, bool):
        return draw(st.booleans())
    if isinstance(old, int):
        return draw(st.sampled_from([0, -1, 1, 2**31, -(2**31) - 1, 2**63, 7]))
    if isinstance(old, float):
        return draw(st.sampled_from([0.0, -1.5, 1e300, 98.6, 0.1]))
    if isinstance(old, str):
        return draw(st.one_of(st.sampled_from(TRICKY_STRINGS), st.text(max_size=12)))
    return None


@st.composite
def mutated(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    original = draw(st.sampled_from(SAMPLES))
    res = copy.deepcopy(original)
    paths = _leaf_paths(res)
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        node: Any = res
        for p in path:
            node = node[p]
        _set(res, path, _same_type_value(draw, node))
    return original, res


@pytest.mark.skipif(len(SAMPLES) < 5, reason="fixture samples missing")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fast_path_verdict_equals_full_model(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    original, res = pair
    fast = FastValidator(validate_full)
    model = _model(original["resourceType"])
    assert fast.validate(original, model, _check_bindings) is None  # compiles the shape
    assert shape(res)[0] == shape(original)[0]  # same shape: the fast path is exercised
    assert fast.validate(res, model, _check_bindings) == validate_full(res)


def test_fast_path_is_used_for_a_known_shape() -> None:
    fast = FastValidator(validate_full)
    res = SAMPLES[0]
    model = _model(res["resourceType"])
    fast.validate(res, model, _check_bindings)
    fast.validate(copy.deepcopy(res), model, _check_bindings)
    assert fast.stats == {"shapes": 1, "fast": 1, "full": 1}


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["resourceType", "id", "status", "code", "meta", "x"]),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(json.dumps),
    )
)
def test_any_ndjson_line_gets_a_verdict_never_an_exception(line: str) -> None:
    from twin_pipeline.sources.fhir import _process_text

    problem, meta = _process_text(line)
    if problem is None:
        # only a valid resource passes, and then its type and id are known
        assert meta is not None and meta[0] and meta[1]
    else:
        assert problem[0] in {
            "broken_json",
            "unknown_resource_type",
            "missing_required",
            "validation_failed",
            "bad_timestamp",
        }
