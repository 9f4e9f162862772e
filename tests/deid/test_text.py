"""The free-text engine: recognizers (table-driven), deny-lists, surrogates, evaluation, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twin_pipeline.deid.context import patient_terms
from twin_pipeline.deid.evaluate import i2b2_notes, load_labels, philter_corpus_dir, score
from twin_pipeline.deid.surrogates import Surrogates, shift_date_text
from twin_pipeline.deid.text import NoteContext, Span, TextEngine, engine, resolve
from twin_pipeline.errors import ConfigError
from twin_pipeline.paths import Settings

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def eng() -> TextEngine:
    e = engine()
    e.set_staff([])
    return e


CASES = [
    ("MRN: 10733103 DOB: 1940-10-19", [("10733103", "MRN"), ("1940-10-19", "DATE")]),
    (
        "Imaging (Acc# RA000300012) on 08/17/2022",
        [("RA000300012", "ACCESSION"), ("08/17/2022", "DATE")],
    ),
    ("bedside monitor SN MR15884955; desats", [("MR15884955", "DEVICE_SERIAL")]),
    (
        "call (508) 730-7986 or 508.365.8359",
        [("(508) 730-7986", "PHONE"), ("508.365.8359", "PHONE")],
    ),
    ("SSN 123-45-6789 verified", [("123-45-6789", "SSN")]),
    ("email zachary.cooper58@outlook.com now", [("zachary.cooper58@outlook.com", "EMAIL")]),
    (
        "see https://portal.example.org/share/abc123.",
        [("https://portal.example.org/share/abc123", "URL")],
    ),
    ("hub at IP 73.12.200.4.", [("73.12.200.4", "IP_ADDRESS")]),
    (
        "lives at 5339 Lincoln St Apt 4B, Worcester, MA 01671 with",
        [("5339 Lincoln St Apt 4B", "ADDRESS"), ("Worcester", "LOCATION"), ("01671", "ZIP")],
    ),
    ("Mr. Cooper is a 93-year-old man", [("Cooper", "PERSON"), ("93-year-old", "AGE")]),
    ("is a 63-year-old woman", []),
    (
        "seen by Dr. Douglas Martinez on August 5, 2021",
        [("Douglas Martinez", "PERSON"), ("August 5, 2021", "DATE")],
    ),
    (
        "Electronically signed: STEWART, LUIS MD 11/13/2023",
        [("STEWART, LUIS", "PERSON"), ("11/13/2023", "DATE")],
    ),
    (
        "Patient: ZACHARY COOPER   MRN: 10733103",
        [("ZACHARY COOPER", "PERSON"), ("10733103", "MRN")],
    ),
    ("Xzavian G. Tavares, M.D.", [("Xzavian G. Tavares", "PERSON")]),
    ("Sumiko254 Larue605\n is a 60 year-old", [("Sumiko254 Larue605", "PERSON")]),
    ("on 12 Aug 1932 and 2/17/80", [("12 Aug 1932", "DATE"), ("2/17/80", "DATE")]),
    # numbers that are not PHI: vitals, labs, doses, pain scores
    ("BP 134/76, HR 97, pain 6/10, Plt 300, heparin 5,000 units, EF 55-60%", []),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_recognizers(eng: TextEngine, text: str, expected: list[tuple[str, str]]) -> None:
    found = {(text[s.start : s.end], s.label) for s in eng.analyze(text)}
    for item in expected:
        assert item in found, (item, found)
    if not expected:
        assert not found, found


def test_deny_list_finds_the_patients_own_names_without_context(eng: TextEngine) -> None:
    text = "Follow-up: rose from chair. Rose Brennan tolerated it; BRENNAN, ROSE agrees."
    ctx = NoteContext("p9", patient_terms(names=["Rose", "Brennan"], mrn="55501234"))
    got = [(text[s.start : s.end], s.label) for s in eng.analyze(text, ctx)]
    assert ("Rose Brennan", "PERSON") in got and ("BRENNAN, ROSE", "PERSON") in got
    assert ("rose", "PERSON") not in got  # the verb is not the name


def test_surrogates_are_consistent_within_a_patient_and_differ_across(eng: TextEngine) -> None:
    a = NoteContext("p1", offset_days=-10)
    b = NoteContext("p2", offset_days=-100)
    t1 = "Dr. Maria Lopez saw the patient on 2024-03-15. Call 617-555-0199."
    t2 = "Per Dr. Maria Lopez, recheck on 2024-03-25."
    o1, o2 = eng.deidentify_batch([t1, t2], [a, a], KEY)
    o3 = eng.deidentify_batch([t1], [b], KEY)[0]
    assert "Maria" not in o1 + o2 + o3 and "Lopez" not in o1 + o2 + o3
    fake1 = o1.split("Dr. ")[1].split(" saw")[0]
    assert fake1 in o2  # same name, same fake within the patient
    assert fake1 not in o3  # another patient gets another fake
    assert "2024-03-05" in o1 and "2024-03-15" in o2  # both shifted by -10 days: interval kept
    assert "2023-12-06" in o3
    assert "617-555-0199" not in o1


@pytest.mark.parametrize(
    ("text", "offset", "expected"),
    [
        ("2024-03-15", -15, "2024-02-29"),
        ("03/15/2024", -1, "03/14/2024"),
        ("3/1/24", -1, "2/29/24"),
        ("15 Mar 2024", -20, "24 Feb 2024"),
        ("March 15, 2024", -366, "March 15, 2023"),
        ("Jan 2, 2020", -2, "Dec 31, 2019"),
        ("20240315", -1, "20240314"),
        ("November", -31, "October"),
    ],
)
def test_date_shift_keeps_format(text: str, offset: int, expected: str) -> None:
    assert shift_date_text(text, offset) == expected


def test_surrogate_shapes() -> None:
    s = Surrogates(KEY)
    assert s.ssn("p", "123-45-6789")[0] == "9"  # never a valid SSN area
    assert s.phone("p", "(617) 482-1937")[6:9] == "555"
    assert s.zip("03601", frozenset({"036"})) == "000XX"
    assert s.age("93-year-old") == "90+-year-old"
    assert s.person("p", "SMITH, JOHN").isupper()
    assert s.person("p", "John Smith") == s.person("p", "John Smith")


def test_resolve_unites_same_label_and_prefers_higher_score() -> None:
    spans = [Span(0, 5, "PERSON", 0.9), Span(3, 10, "PERSON", 0.6), Span(4, 8, "DATE", 0.5)]
    assert resolve(spans) == [Span(0, 10, "PERSON", 0.9, "")]


def test_tldextract_never_reaches_for_the_network(eng: TextEngine) -> None:
    import tldextract.tldextract as tx

    assert tx.TLD_EXTRACTOR.suffix_list_urls == ()
    assert tx.TLD_EXTRACTOR("https://mail.example.co.uk").suffix == "co.uk"


def test_score_matches_hand_computed_values() -> None:
    text = "John Smith 2024-01-01"
    gold = [[Span(0, 10, "PERSON"), Span(11, 21, "DATE")]]
    pred = [[Span(0, 4, "PERSON"), Span(11, 21, "DATE"), Span(5, 10, "LOCATION")]]
    rep = score([text], gold, pred)
    assert rep.by_type["PERSON"].found == 0  # "Smith" not covered by a PERSON span
    assert rep.any_label.found == 2  # but nothing leaks
    assert rep.by_type["DATE"].recall == 1.0
    assert rep.micro.precision == pytest.approx(2 / 3)


def test_load_labels_rejects_bad_spans(tmp_path: Path) -> None:
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps({"text": "abc", "spans": [{"start": 2, "end": 9, "label": "X"}]}))
    with pytest.raises(ConfigError, match="line:1"):
        load_labels(p)


def test_external_i2b2_corpus_parses() -> None:
    folder = philter_corpus_dir()
    if folder is None:
        pytest.skip("philter-lite (test extra) not installed")
    notes = i2b2_notes(folder)
    assert len(notes) == 5 and sum(len(n.spans) for n in notes) > 30


def test_cli_text_jsonl_keeps_order(twin_home: Settings) -> None:
    lines = [
        {"text": "Seen by Dr. Ana Ruiz on 2024-01-02."},
        {"text": "No PHI here."},
        {"text": "MRN: 12345678"},
    ]
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "deid", "text", "--jsonl"],
        input="\n".join(json.dumps(x) for x in lines) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    got = [json.loads(x)["text"] for x in out.stdout.splitlines()]
    assert len(got) == 3
    assert "Ana Ruiz" not in got[0] and "2024-01-02" not in got[0]
    assert got[1] == "No PHI here."
    assert "12345678" not in got[2] and got[2].startswith("MRN: ")


def test_cli_eval_reports_per_type(tmp_path: Path, twin_home: Settings) -> None:
    p = tmp_path / "labels.jsonl"
    text = "Patient: Ana Ruiz   MRN: 12345678   DOB: 1950-01-02"
    spans = [
        {"start": 9, "end": 17, "label": "PERSON"},
        {"start": 25, "end": 33, "label": "MRN"},
        {"start": 41, "end": 51, "label": "DATE"},
    ]
    p.write_text(json.dumps({"text": text, "spans": spans}) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "twin_pipeline", "deid", "eval", "--labels", str(p), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert set(doc["by_type"]) == {"PERSON", "MRN", "DATE"}
    assert doc["overall"]["recall"] == 1.0
    assert "f2" in doc["by_type"]["MRN"]


def test_worker_pool_gives_the_same_output_in_order(eng: TextEngine) -> None:
    from twin_pipeline.deid.text import deidentify_stream

    items = [
        (
            f"Seen by Dr. Ana Ruiz{i} on 2024-01-{i + 1:02d}. MRN: 1234567{i}",
            NoteContext(f"p{i % 3}"),
        )
        for i in range(9)
    ]
    one = list(deidentify_stream(items, KEY, workers=1, batch_size=2))
    two = list(deidentify_stream(items, KEY, workers=2, batch_size=2))
    assert one == two and len(one) == 9
    assert all("Ruiz" not in t for t in two)


@pytest.mark.parametrize(
    "text",
    [
        "Electronically signed: O'BRIEN, BRIAN MD 01/02/2023",
        "Seen by Dr. O'Brien today",
        "Patient: McDonald, Mary",
        "Attending: Dr. Anne-Marie Smith-Jones, MD",
    ],
)
def test_names_with_apostrophes_and_inner_capitals(eng: TextEngine, text: str) -> None:
    names = [text[s.start : s.end] for s in eng.analyze(text) if s.label == "PERSON"]
    assert names and all(any(c.isupper() for c in n) for n in names)
    leftover = text
    for n in names:
        leftover = leftover.replace(n, "")
    for part in ("O'BRIEN", "BRIAN", "O'Brien", "McDonald", "Mary", "Anne-Marie", "Smith-Jones"):
        assert part not in leftover


# -- deny-list probe and per-engine caches (descriptors repeat across thousands of patients) --
_PIECES = st.sampled_from(
    [
        "Rose",
        "ROSE",
        "rose",
        "Ann",
        "Annabel",
        "ANNABEL",
        "Anne",
        "Sean",
        "Brennan",
        "O'Neil",
        "o'neil",
        "55501234",
        "555-012-34",
        "5 5 5",
        "ab@x.org",
        "AB@X.ORG",
        "Main St",
        " ",
        ", ",
        "-",
        "(",
        ")",
        ".",
        "1",
        "x",
        "Ünïcode",
        "K",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(_PIECES, max_size=12).map("".join))
def test_deny_probe_never_skips_a_text_the_expressions_match(text: str) -> None:
    from twin_pipeline.deid.recognizers import DenyListRecognizer, DenyTerms

    terms = DenyTerms(
        names=("Rose Brennan", "Sean O'Neil", "Ann Annabel"),
        numbers=(("MRN", "55501234"), ("PHONE", "555-5555-55")),
        literals=(("EMAIL", "ab@x.org"), ("ADDRESS", "Main St"), ("ID", "kkk")),
    )
    probed = DenyListRecognizer(terms)
    assert probed.probe
    compiled = DenyListRecognizer(terms, probe=False)

    def spans(rec: DenyListRecognizer) -> list[tuple[int, int, str]]:
        return [(r.start, r.end, r.entity_type) for r in rec.analyze(text, ["PERSON"])]

    assert spans(probed) == spans(compiled)


def test_deny_probe_skips_compiling_for_texts_without_terms() -> None:
    from twin_pipeline.deid.recognizers import DenyListRecognizer

    rec = DenyListRecognizer(patient_terms(names=["Rose", "Brennan"], mrn="55501234"))
    assert rec.analyze("CT CHEST W CONTRAST 5mm 555-0123", ["PERSON"]) == []
    assert rec._name_rx is None and not rec._rx  # nothing compiled
    assert [r.entity_type for r in rec.analyze("f/u Rose Brennan MRN 555-01234", [])] == [
        "PERSON",
        "MRN",
    ]


def test_repeated_short_texts_give_the_same_output_as_fresh_engines() -> None:
    """The per-engine caches of patient-independent spans must not carry one patient's deny
    list to another, nor change any output against an engine that has seen nothing."""
    texts = [
        "CT HEAD Rose Brennan",
        "Axial 5mm per Dr. Maria Lopez",
        "CT HEAD Rose Brennan",
        "Bone 1mm 2024-03-15",
        "Axial 5mm per Dr. Maria Lopez",
    ]
    ctxs = [
        NoteContext("p1", patient_terms(names=["Rose", "Brennan"]), offset_days=-3),
        NoteContext("p2", offset_days=5),
        NoteContext("p2", patient_terms(names=["Lee"]), offset_days=5),
        NoteContext("p1", patient_terms(names=["Rose", "Brennan"]), offset_days=-3),
        NoteContext("p3", offset_days=-40),
    ]
    cached = TextEngine()
    cached.set_staff(["Kim Ward"])
    once = cached.deidentify_batch(texts, ctxs, KEY)
    again = cached.deidentify_batch(texts, ctxs, KEY)  # every text now in the caches
    fresh = []
    for t, c in zip(texts, ctxs, strict=True):
        e = TextEngine()
        e.set_staff(["Kim Ward"])
        fresh.append(e.deidentify_batch([t], [c], KEY)[0])
    assert once == again == fresh
    spans = cached.analyze_batch(texts, ctxs)
    assert {s.source for s in spans[0]} >= {"deny_list"}
    assert "deny_list" not in {s.source for s in spans[2]}  # p2's list does not name Rose
    assert "Brennan" not in once[0]
    assert "Lopez" not in once[1] + once[4] and "2024-03-15" not in once[3]
    assert len(cached._ner_cache) >= 1 and len(cached._shared_cache) == len(set(texts))


def test_a_surrogate_never_spells_the_patients_own_name(eng: TextEngine) -> None:
    """Syllable surrogates can spell a real name: with one 10k-patient key, the wife "Jessica"
    became "Steven", the patient's own given name, and the leak check blocked the run."""
    sur = Surrogates(KEY)
    would_be = sur.person("p7", "Jessica")  # what "Jessica" becomes for p7 when nothing is avoided
    own = frozenset({would_be.lower(), "garcia"})
    fake = sur.person("p7", "Jessica", own)
    assert fake != would_be and fake.lower() not in own
    assert sur.person("p7", "Jessica", own) == fake  # still a function of key, patient, name
    assert sur.person("p7", "Maria", own) == sur.person("p7", "Maria")  # others unchanged
    street = sur.address("p7", "12 Elm St").split()[1]
    assert sur.address("p7", "12 Elm St", frozenset({street.lower()})).split()[1] != street

    text = "Social: lives with wife Jessica Garcia, who visits daily."
    ctx = NoteContext("p7", patient_terms(names=[would_be, "Garcia"]), offset_days=3)
    out = eng.deidentify_batch([text], [ctx], KEY)[0]
    assert "Jessica" not in out and "Garcia" not in out
    assert would_be not in out and would_be.upper() not in out
