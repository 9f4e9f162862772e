"""Span-level evaluation of PHI recognition: recall, precision and F2 per entity type.

Input lines are ``{"text": str, "spans": [{"start", "end", "label"}]}`` (extra keys such as
``note_id`` and ``patient_id`` are kept). Matching is written for de-identification, where a
partly redacted name still leaks:

* a gold span is **found** when every letter and digit in it is covered by predicted spans of
  the same label (typed) — or of any label (the ``ANY`` row, what matters for leaks);
* a predicted span is **correct** when it overlaps a gold span of the same label (typed) or of
  any label (``ANY``).

F2 weighs recall four times as much as precision.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twin_pipeline.deid.text import Span
from twin_pipeline.errors import ConfigError


@dataclass
class LabeledNote:
    text: str
    spans: list[Span]
    note_id: str = ""
    patient_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def load_labels(path: Path, label_map: Mapping[str, str | None] | None = None) -> list[LabeledNote]:
    """Read a labels JSONL file; ``label_map`` renames labels (None drops the span)."""
    notes: list[LabeledNote] = []
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                text = d["text"]
                spans = []
                for s in d.get("spans", []):
                    label = s["label"]
                    if label_map is not None and label in label_map:
                        mapped = label_map[label]
                        if mapped is None:
                            continue
                        label = mapped
                    spans.append(Span(int(s["start"]), int(s["end"]), label))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"bad labels line: {exc}", path=str(path), position=f"line:{i}"
                ) from exc
            for s in spans:
                if not 0 <= s.start < s.end <= len(text):
                    raise ConfigError(
                        f"span {s.start}-{s.end} outside text of length {len(text)}",
                        path=str(path),
                        position=f"line:{i}",
                    )
            notes.append(
                LabeledNote(
                    text,
                    spans,
                    str(d.get("note_id", "")),
                    str(d.get("patient_id", "")),
                    {k: v for k, v in d.items() if k not in {"text", "spans"}},
                )
            )
    return notes


@dataclass
class TypeScore:
    gold: int = 0
    found: int = 0
    predicted: int = 0
    correct: int = 0

    @property
    def recall(self) -> float:
        return self.found / self.gold if self.gold else 1.0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 1.0

    @property
    def f2(self) -> float:
        p, r = self.precision, self.recall
        return 5 * p * r / (4 * p + r) if (p + r) else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "gold": self.gold,
            "found": self.found,
            "predicted": self.predicted,
            "correct": self.correct,
            "recall": round(self.recall, 4),
            "precision": round(self.precision, 4),
            "f2": round(self.f2, 4),
        }


@dataclass
class Report:
    by_type: dict[str, TypeScore]
    micro: TypeScore  # typed, all types pooled
    any_label: TypeScore  # untyped
    misses: list[dict[str, Any]] = field(default_factory=list)
    false_positives: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.micro.as_dict(),
            "any_label": self.any_label.as_dict(),
            "by_type": {k: v.as_dict() for k, v in sorted(self.by_type.items())},
        }


def _covered(text: str, gold: Span, preds: Iterable[Span]) -> bool:
    mask = [False] * (gold.end - gold.start)
    for p in preds:
        a, b = max(p.start, gold.start), min(p.end, gold.end)
        for i in range(a, b):
            mask[i - gold.start] = True
    return all(m or not text[gold.start + i].isalnum() for i, m in enumerate(mask))


def score(
    texts: Sequence[str],
    gold: Sequence[Sequence[Span]],
    pred: Sequence[Sequence[Span]],
    *,
    keep_examples: int = 50,
) -> Report:
    by_type: dict[str, TypeScore] = {}
    micro, anyl = TypeScore(), TypeScore()
    misses: list[dict[str, Any]] = []
    fps: list[dict[str, Any]] = []
    for n, (text, gs, ps) in enumerate(zip(texts, gold, pred, strict=True)):
        for g in gs:
            ts = by_type.setdefault(g.label, TypeScore())
            ts.gold += 1
            micro.gold += 1
            anyl.gold += 1
            overlapping = [p for p in ps if p.start < g.end and g.start < p.end]
            typed = _covered(text, g, [p for p in overlapping if p.label == g.label])
            if typed:
                ts.found += 1
                micro.found += 1
            if typed or _covered(text, g, overlapping):
                anyl.found += 1
            elif len(misses) < keep_examples:
                misses.append({"note": n, "label": g.label, "text": text[g.start : g.end]})
        for p in ps:
            ts = by_type.setdefault(p.label, TypeScore())
            ts.predicted += 1
            micro.predicted += 1
            anyl.predicted += 1
            overlapping = [g for g in gs if p.start < g.end and g.start < p.end]
            if any(g.label == p.label for g in overlapping):
                ts.correct += 1
                micro.correct += 1
            if overlapping:
                anyl.correct += 1
            elif len(fps) < keep_examples:
                fps.append({"note": n, "label": p.label, "text": text[p.start : p.end]})
    return Report(by_type, micro, anyl, misses, fps)


# ----------------------------------------------------------------------------------------------
# A corpus someone else wrote: the i2b2-format notes shipped inside the philter-lite wheel.
# ----------------------------------------------------------------------------------------------
# i2b2 2014 de-identification TYPE attributes -> our labels (None: not a Safe Harbor identifier).
I2B2_LABELS: dict[str, str | None] = {
    "PATIENT": "PERSON",
    "DOCTOR": "PERSON",
    "USERNAME": "PERSON",
    "DATE": "DATE",
    "AGE": "AGE",
    "STREET": "ADDRESS",
    "CITY": "LOCATION",
    "ZIP": "ZIP",
    "STATE": None,
    "COUNTRY": None,
    "HOSPITAL": None,
    "ORGANIZATION": None,
    "LOCATION-OTHER": "LOCATION",
    "PHONE": "PHONE",
    "FAX": "PHONE",
    "EMAIL": "EMAIL",
    "URL": "URL",
    "IPADDR": "IP_ADDRESS",
    "MEDICALRECORD": "MRN",
    "IDNUM": "ID",
    "DEVICE": "DEVICE_SERIAL",
    "BIOID": "ID",
    "HEALTHPLAN": "ID",
    "LICENSE": "ID",
    "PROFESSION": None,
}


def i2b2_notes(folder: Path) -> list[LabeledNote]:
    """Parse i2b2-format XML notes (``<TEXT>`` plus ``<TAGS>`` with start/end/TYPE)."""
    out: list[LabeledNote] = []
    for path in sorted(Path(folder).glob("*.xml")):
        root = ET.parse(path).getroot()
        text_el = root.find("TEXT")
        text = text_el.text if text_el is not None and text_el.text else ""
        spans: list[Span] = []
        tags = root.find("TAGS")
        for tag in tags if tags is not None else []:
            label = I2B2_LABELS.get(tag.get("TYPE", ""))
            if label is None:
                continue
            s, e = int(tag.get("start", "0")), int(tag.get("end", "0"))
            if text[s:e] != tag.get("text", text[s:e]):
                raise ConfigError(f"span text mismatch at {s}-{e}", path=str(path))
            spans.append(Span(s, e, label))
        out.append(LabeledNote(text, spans, note_id=path.stem))
    return out


def philter_corpus_dir() -> Path | None:
    """The i2b2 XML folder inside the installed philter-lite package, if present."""
    try:
        import philter_lite
    except ImportError:
        return None
    folder = Path(philter_lite.__file__).parent / "data" / "i2b2_xml"
    return folder if folder.is_dir() else None
