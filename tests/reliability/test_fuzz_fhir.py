"""Hypothesis-driven fuzzing of the FHIR reader (NDJSON and Bundle JSON).

Each example lands a batch of inputs — mutations of valid generated records
(``twin_pipeline.fuzz.mutate`` / ``_json_damage``) or arbitrary JSON values placed as Bundle
entries, resources and NDJSON lines — and loads every file through the reader
(``twin_pipeline.fuzz.check_inputs``): nothing may escape ``load``, conservation must hold per
file, and every quarantined record must carry a rule and a reason. Table-driven cases pin the
verdict (position, rule) for the malformed inputs the fuzzer found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import assert_fuzz_clean
from twin_pipeline.fuzz import _json_damage, mutate
from twin_pipeline.ingest import ingest_files
from twin_pipeline.paths import Settings
from twin_pipeline.sources import discover, load_readers
from twin_pipeline.store import Store

pytestmark = pytest.mark.slow  # runs the whole pipeline: scheduled first (conftest)
TARGETS = ("fhir_ndjson", "fhir_bundle")
FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# JSON values, including the awkward ones: NaN/Infinity (json.dumps writes them), unpaired
# surrogates (written as \ud800 escapes), NUL, huge numbers, and type confusion everywhere.
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["\ud800", "x\udfff", "\x00", "Patient/1", "urn:uuid:1", "2024-13-45", ""])
)
JSON = st.recursive(
    _LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
RESOURCE = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Observation", "Encounter", "Bundle", "Nope"])},
    optional={
        "id": JSON | st.just("p1"),
        "meta": st.fixed_dictionaries({}, optional={"versionId": JSON, "lastUpdated": JSON}),
        "gender": JSON | st.just("female"),
        "status": JSON | st.just("final"),
        "code": JSON,
        "subject": JSON | st.just({"reference": "Patient/p1"}),
        "entry": JSON,
    },
)
ENTRY = JSON | st.fixed_dictionaries(
    {},
    optional={
        "fullUrl": JSON | st.just("urn:uuid:0b1c"),
        "resource": RESOURCE | JSON,
        "request": JSON
        | st.fixed_dictionaries(
            {"method": st.sampled_from(["POST", "PUT", "DELETE", "delete"]) | JSON},
            optional={"url": JSON | st.just("Patient/p1")},
        ),
    },
)
BUNDLE = st.fixed_dictionaries(
    {"resourceType": st.just("Bundle")},
    optional={
        "id": JSON | st.just("b1"),
        "type": JSON | st.sampled_from(["collection", "transaction"]),
        "entry": st.lists(ENTRY, max_size=5) | JSON,
    },
)


@pytest.mark.parametrize("target", TARGETS)
@FUZZ
@given(data=st.data())
def test_mutated_seed_records_never_crash_the_reader(
    seeds: dict[str, list[bytes]], work: Path, target: str, data: st.DataObject
) -> None:
    rnd = data.draw(st.randoms(use_true_random=False))
    batch = data.draw(st.integers(min_value=3, max_value=8))
    inputs = []
    for _ in range(batch):
        seed = rnd.choice(seeds[target])
        # structural damage (wrong types, keys, nesting) half the time, bytes otherwise
        inputs.append(
            (target, _json_damage(seed, rnd) if rnd.random() < 0.5 else mutate(seed, rnd))
        )
    assert_fuzz_clean(work, inputs)


@FUZZ
@given(bundles=st.lists(BUNDLE | JSON, min_size=1, max_size=5))
def test_arbitrary_bundles_never_crash_the_reader(work: Path, bundles: list[Any]) -> None:
    assert_fuzz_clean(work, [("fhir_bundle", json.dumps(b).encode()) for b in bundles])


@FUZZ
@given(files=st.lists(st.lists(RESOURCE | BUNDLE | JSON, min_size=1, max_size=6), max_size=4))
def test_arbitrary_ndjson_lines_never_crash_the_reader(work: Path, files: list[list[Any]]) -> None:
    inputs = [("fhir_ndjson", "\n".join(json.dumps(x) for x in lines).encode()) for lines in files]
    if inputs:
        assert_fuzz_clean(work, inputs)


# -- pinned verdicts ---------------------------------------------------------------------------

PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female"}


def _bundle(entries: list[Any], **kw: Any) -> bytes:
    return json.dumps(
        {"resourceType": "Bundle", "type": "collection", **kw, "entry": entries}
    ).encode()


def _lines(*parts: bytes) -> bytes:
    return b"\n".join(parts) + b"\n"


_P = json.dumps(PATIENT).encode()
_P2 = json.dumps({**PATIENT, "id": "p2"}).encode()


@pytest.mark.parametrize(
    ("rel", "data", "loaded", "expected"),
    [
        # entry with a non-string fullUrl / request.url / id: that entry only
        (
            "ehr/b/full_url.json",
            _bundle(
                [{"fullUrl": True, "resource": PATIENT}, {"resource": {**PATIENT, "id": "p2"}}]
            ),
            1,
            [("entry:0", "validation_failed", "fullUrl is not a string")],
        ),
        (
            "ehr/b/url.json",
            _bundle([{"request": {"method": "DELETE", "url": 7}}]),
            0,
            [("entry:0", "validation_failed", "request.url is not a string")],
        ),
        (
            "ehr/b/bool_id.json",
            _bundle([{"resource": {**PATIENT, "id": True}}]),
            0,
            [("entry:0", "validation_failed", "id")],
        ),
        (
            "ehr/b/list_id.ndjson",
            _lines(json.dumps({**PATIENT, "id": [1]}).encode(), _P2),
            1,
            [("line:1", "validation_failed", "id")],
        ),
        # the envelope: a non-string Bundle.type or id, entries that are not an array
        (
            "ehr/b/type.json",
            _bundle([{"resource": PATIENT}], type={"x": 1}),
            0,
            [("entry:0", "validation_failed", "Bundle.type is not a string")],
        ),
        (
            "ehr/b/entry_obj.json",
            json.dumps(
                {"resourceType": "Bundle", "type": "collection", "entry": {"resource": PATIENT}}
            ).encode(),
            0,
            [("file", "validation_failed", "Bundle.entry is not an array")],
        ),
        # JSON that Python parses but is not storable JSON text
        (
            "ehr/b/nan.ndjson",
            _lines(b'{"resourceType": "Patient", "id": "p1", "x": NaN}', _P2),
            1,
            [("line:1", "broken_json", "NaN is not a JSON value")],
        ),
        (
            "ehr/b/surrogate.ndjson",
            _lines(b'{"resourceType": "Patient", "id": "p1", "name": [{"text": "\\ud800"}]}', _P2),
            1,
            [("line:1", "broken_json", "unpaired UTF-16 surrogate")],
        ),
        (
            "ehr/b/surrogate.json",
            _bundle(
                [
                    {"resource": {**PATIENT, "name": [{"text": "\ud800"}]}},
                    {"resource": {**PATIENT, "id": "p2"}},
                ]
            ),
            1,
            [("entry:0", "broken_json", "unpaired UTF-16 surrogate")],
        ),
        (
            "ehr/b/deep.ndjson",
            _lines(
                b'{"resourceType": "Patient", "id": "p1", "x": '
                + b"[" * 100_000
                + b"]" * 100_000
                + b"}",
                _P2,
            ),
            1,
            [("line:1", "broken_json", "nested too deeply")],
        ),
        # encodings: one bad line of NDJSON loses that line only; UTF-16 is refused whole
        (
            "ehr/b/latin1.ndjson",
            _lines(_P, b'{"resourceType": "Patient", "id": "\xe9"}', _P2),
            2,
            [("line:2", "broken_json", "not valid UTF-8")],
        ),
        (
            "ehr/b/utf16.ndjson",
            _lines(_P).decode().encode("utf-16"),
            0,
            [("file", "broken_json", "UTF-16")],
        ),
    ],
)
def test_malformed_input_is_quarantined_with_a_reason(
    twin_home: Settings,
    tmp_path: Path,
    rel: str,
    data: bytes,
    loaded: int,
    expected: list[tuple[str, str, str]],
) -> None:
    landing = tmp_path / "landing"
    path = landing / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    readers = load_readers()
    found, _ = discover(landing, readers)
    assert [f.kind for f in found] == ["fhir"]
    with Store.open(twin_home) as store:
        res = ingest_files(store, readers["fhir"], found)
        rows = store.con.execute(
            "SELECT position, rule, reason FROM governance.quarantine ORDER BY position"
        ).fetchall()
        raw = store.row_count("raw.fhir_resource")
    fs = res.stats.file(rel)
    assert (fs.loaded, fs.quarantined, raw) == (loaded, len(expected), loaded)
    assert fs.records_in == fs.loaded + fs.quarantined
    assert [(p, r) for p, r, _ in rows] == [(p, r) for p, r, _ in expected]
    for (_, _, reason), (_, _, want) in zip(rows, expected, strict=True):
        assert want in reason and rel in reason
