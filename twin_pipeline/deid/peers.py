"""Peer de-identifiers for the benchmark: stock Presidio and philter-lite.

* Stock Presidio: ``AnalyzerEngine`` with its default recognizer registry, on the same spaCy
  model (the default ``en_core_web_lg`` is not installed and nothing may be downloaded).
* philter-lite (a fork of philter-ucsf, rule based): its POS-based filters call NLTK's
  perceptron tagger, whose data NLTK downloads on first use; offline we give philter the Penn
  Treebank tags of spaCy's tagger instead (same tag set). Its rules are otherwise unchanged.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from twin_pipeline.deid.text import MODEL, Span, configure_tldextract_offline

# Stock Presidio entity names -> our labels.
PRESIDIO_LABELS = {
    "PERSON": "PERSON",
    "LOCATION": "LOCATION",
    "DATE_TIME": "DATE",
    "PHONE_NUMBER": "PHONE",
    "EMAIL_ADDRESS": "EMAIL",
    "URL": "URL",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_SSN": "SSN",
    "MEDICAL_LICENSE": "ID",
    "US_DRIVER_LICENSE": "ID",
    "US_PASSPORT": "ID",
    "US_BANK_NUMBER": "ID",
    "US_ITIN": "ID",
    "CREDIT_CARD": "ID",
    "IBAN_CODE": "ID",
    "NRP": "OTHER",
    "CRYPTO": "ID",
}


@functools.lru_cache(maxsize=1)
def stock_presidio() -> Any:
    configure_tldextract_offline()
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    nlp = NlpEngineProvider(
        nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": "en", "model_name": MODEL}],
        }
    ).create_engine()
    return AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])


def stock_presidio_spans(texts: list[str]) -> list[list[Span]]:
    from presidio_analyzer import BatchAnalyzerEngine

    batch = BatchAnalyzerEngine(analyzer_engine=stock_presidio())
    results = batch.analyze_iterator(texts, language="en", batch_size=32)
    return [
        [
            Span(r.start, r.end, PRESIDIO_LABELS.get(r.entity_type, r.entity_type), r.score)
            for r in rs
        ]
        for rs in results
    ]


@functools.lru_cache(maxsize=1)
def _philter() -> tuple[Any, Any]:
    import philter_lite
    import philter_lite.philter as ph
    import spacy
    from spacy.tokens import Doc

    nlp = spacy.load(MODEL, exclude=["parser", "ner", "lemmatizer"])

    def spacy_pos(text: str) -> list[tuple[str, str]]:
        words = ph._get_clean(text)
        if not words:
            return []
        doc = Doc(nlp.vocab, words=words, spaces=[False] * len(words))
        for _, proc in nlp.pipeline:
            doc = proc(doc)
        return [(t.text, t.tag_ or "NN") for t in doc]

    ph._get_pos = spacy_pos  # NLTK's tagger data cannot be downloaded offline
    base = Path(philter_lite.__file__).parent
    filters = philter_lite.load_filters(str(base / "configs" / "philter_delta.toml"))
    return philter_lite, filters


def philter_available() -> bool:
    try:
        _philter()
    except Exception:  # any import/config failure means the peer is not usable here
        return False
    return True


def philter_spans(texts: list[str]) -> list[list[Span]]:
    philter_lite, filters = _philter()
    out: list[list[Span]] = []
    for t in texts:
        _, _, tracker = philter_lite.detect_phi(t, patterns=filters)
        out.append([Span(p.start, p.stop, "PHI") for p in tracker.phi])
    return out
