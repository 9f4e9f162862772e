"""Clinical PHI recognizers for Presidio: patterns with context, and per-patient deny-lists.

Each recognizer is a Presidio ``EntityRecognizer``. Pattern recognizers use one compiled regex per
rule whose named group ``phi`` is the reported span (the rest is context such as ``MRN:``), so a
label like ``Acc#`` is never redacted but the number after it always is. Entity names are the
labels of the evaluation corpora: PERSON, LOCATION, ADDRESS, ZIP, DATE, AGE, PHONE, EMAIL, URL,
IP_ADDRESS, SSN, MRN, ACCESSION, DEVICE_SERIAL, ID.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from presidio_analyzer import EntityRecognizer, RecognizerResult

from twin_pipeline.deid.terms import DenyTerms

ENTITIES = (
    "PERSON",
    "LOCATION",
    "ADDRESS",
    "ZIP",
    "DATE",
    "AGE",
    "PHONE",
    "EMAIL",
    "URL",
    "IP_ADDRESS",
    "SSN",
    "MRN",
    "ACCESSION",
    "DEVICE_SERIAL",
    "ID",
)

STATES = [
    "AL",
    "AK",
    "AZ",
    "AR",
    "CA",
    "CO",
    "CT",
    "DE",
    "DC",
    "FL",
    "GA",
    "HI",
    "ID",
    "IL",
    "IN",
    "IA",
    "KS",
    "KY",
    "LA",
    "ME",
    "MD",
    "MA",
    "MI",
    "MN",
    "MS",
    "MO",
    "MT",
    "NE",
    "NV",
    "NH",
    "NJ",
    "NM",
    "NY",
    "NC",
    "ND",
    "OH",
    "OK",
    "OR",
    "PA",
    "RI",
    "SC",
    "SD",
    "TN",
    "TX",
    "UT",
    "VT",
    "VA",
    "WA",
    "WV",
    "WI",
    "WY",
    "PR",
    "GU",
    "VI",
]
STATE_NAMES = (
    "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|"
    "Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|"
    "Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|"
    "New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|"
    "Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|"
    "West Virginia|Wisconsin|Wyoming|Puerto Rico"
)
_STATE_RE = "(?:" + "|".join(STATES) + "|" + STATE_NAMES + ")"

MONTHS_FULL = (
    "January|February|March|April|May|June|July|August|September|October|November|December"
)
MONTHS_ABBR = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
_MON = rf"(?:{MONTHS_FULL}|(?:{MONTHS_ABBR})\.?)"
_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
_MO = r"(?:0?[1-9]|1[0-2])"
_YEAR4 = r"(?:1[89]\d\d|20\d\d|21\d\d)"
_MONTH_PREFIXES = (
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)

# A name token: capitalised or all-caps word, apostrophes/hyphens inside (O'Brien, Smith-Jones).
# Words that look like names in headers but never are (field labels, credentials).
_NOT_NAME = (
    r"(?!(?:MRN|DOB|SSN|MD|DO|RN|NP|PA|PhD|DNP|APRN|FNP|HPI|ID|Acc|Unit|Date|Bed|Room|Age|Sex|"
    r"Phone|Tel|Fax|Email|Address|Admitted|Discharged|Service|Location|Attending|Signed)(?![A-Za-z]))"
)
_NAME = (
    rf"{_NOT_NAME}(?:[A-Z](?:[a-z]+|[a-z]{{1,2}}[A-Z][a-z]+|['’][A-Z][a-z]+)(?:['’\-][A-Za-z]+)*"
    r"|[A-Z](?:[A-Z]+|['’][A-Z]{2,})(?:['’\-][A-Z]+)*"
    r"|[A-Z][a-z]+\d{1,3})(?![A-Za-z])"
)
_INITIAL = r"[A-Z]\.?(?![A-Za-z])"
_FULLNAME = rf"{_NAME}(?: (?:{_INITIAL} )?{_NAME}){{0,2}}"
_LASTFIRST = rf"{_NAME}, ?{_NAME}(?: {_INITIAL})?"
_CREDENTIAL = (
    r"(?:M\.?D\.?|D\.?O\.?|R\.?N\.?|N\.?P\.?|PA-C|P\.?A\.?|Ph\.?D\.?|DNP|CNM|CRNA|FNP|APRN|MBBS|"
    r"DPM|DDS|PharmD|LPN|CNA|RD|PT|OT|MSW|LCSW)"
)
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Court|Ct|Way|Boulevard|Blvd|Terrace|Ter|"
    r"Place|Pl|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Row|Path|Pike|Alley|Loop|"
    r"Crescent|Plaza|Heights)"
)


@dataclass(frozen=True)
class Rule:
    entity: str
    pattern: str
    score: float
    flags: int = 0
    name: str = ""
    # Cheap guard: the rule runs only if one of these occurs in the lower-cased text.
    requires: tuple[str, ...] = ()


# Rules: (entity, regex with a `phi` group or whole match, score). Order does not matter;
# overlaps are resolved by score then length after all recognizers ran.
RULES: tuple[Rule, ...] = (
    # --- people -------------------------------------------------------------------------------
    Rule(
        "PERSON",
        rf"\b(?:Dr|Doctor|Mr|Mrs|Ms|Mx|Miss|Prof|Professor)\.?[ \t]+(?P<phi>{_FULLNAME})",
        0.9,
        name="title_name",
    ),
    Rule(
        "PERSON",
        r"(?:\b(?i:Patient(?:[ \t]+[Nn]ame)?|Pt|Name|Attending(?:[ \t]+[Pp]hysician)?|"
        r"(?:Electronically[ \t]+)?[Ss]igned(?:[ \t]+by)?|Dictated[ \t]+by|Transcribed[ \t]+by|"
        r"Resident|Fellow|PCP|Referring(?:[ \t]+[Pp]hysician)?|Ordering(?:[ \t]+[Pp]hysician)?|"
        r"Surgeon|Author|Consultant|Radiologist|Nurse|Cc|CC|Emergency[ \t]+[Cc]ontact|"
        r"Next[ \t]+of[ \t]+kin|Guarantor|Physician|Provider)[ \t]*:[ \t]*)"
        rf"(?:(?:Dr|Mr|Mrs|Ms|Mx)\.?[ \t]+)?(?P<phi>{_LASTFIRST}|{_FULLNAME})",
        0.85,
        name="labelled_name",
    ),
    Rule(
        "PERSON",
        rf"(?P<phi>{_NAME}(?:[ \t]+{_INITIAL})?[ \t]+{_NAME}),?[ \t]+{_CREDENTIAL}(?![A-Za-z])",
        0.85,
        name="name_credential",
    ),
    Rule(
        "PERSON",
        r"\b(?:with|by|to|from|and|his|her|their)[ \t]+(?:(?:wife|husband|son|daughter|mother|"
        r"father|sister|brother|niece|nephew|aunt|uncle|grandmother|grandfather|partner|friend|"
        r"spouse|caregiver|guardian)[ \t]+)"
        rf"(?P<phi>{_NAME}(?:[ \t]+{_NAME})?)",
        0.8,
        name="relative_name",
    ),
    Rule(
        "PERSON",
        r"^[ \t]*(?P<phi>[A-Z]{2,}(?:['’\-][A-Z]+)*, ?[A-Z]{2,}(?: [A-Z]\.?)?)(?=[ \t]{2,}|[ \t]*$)",
        0.8,
        re.MULTILINE,
        name="caps_last_first_line",
    ),
    # Dictation trailer: author initials then typist names, "XGT:holmes", "GPP/church/olinger"
    Rule(
        "PERSON",
        r"^[ \t]*[A-Z]{2,4}[:/](?P<phi>[a-z]{2,}(?:/[a-z]{2,})*)[ \t]*$",
        0.8,
        re.MULTILINE,
        name="typist_trailer",
    ),
    # Synthea-style names carry digits: "Sumiko254 Larue605"
    Rule(
        "PERSON",
        r"\b(?P<phi>[A-Z][a-z'\-]+\d{1,3}(?:[ \t]+[A-Z][a-z'\-]+\d{1,3}){1,2})\b",
        0.9,
        name="synthea_name",
    ),
    # --- contact -------------------------------------------------------------------------------
    Rule(
        "PHONE",
        r"(?<![\d\-])(?P<phi>(?:\+?1[ \-.])?(?:\(\d{3}\)[ \t]?|\d{3}[\-.])\d{3}[\-.]\d{4})"
        r"(?:[ \t]*(?:x|ext\.?)[ \t]*\d{1,5})?(?![\d\-])",
        0.85,
        name="us_phone",
    ),
    Rule(
        "PHONE",
        r"\b(?:tel|phone|ph|cell|mobile|fax|pager|beeper)\.?[ \t]*(?:#|no\.?|number)?[ \t]*:?[ \t]*"
        r"(?P<phi>\d{3}[ \t]\d{3}[ \t]\d{4}|\d{10}|\d{3}[\-.]\d{4})\b",
        0.8,
        re.IGNORECASE,
        name="phone_ctx",
        requires=("tel", "phone", "ph", "cell", "mobile", "fax", "pager", "beeper"),
    ),
    Rule(
        "PHONE",
        r"\b(?:pager|beeper|pgr|ext)\.?[ \t]*#?[ \t]*:?[ \t]*(?P<phi>\d{4,5})\b",
        0.8,
        re.IGNORECASE,
        name="pager",
        requires=("pager", "beeper", "pgr", "ext"),
    ),
    Rule(
        "EMAIL",
        r"(?<![\w.+\-])(?P<phi>[A-Za-z0-9._%+\-']+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,})\b",
        0.95,
        name="email",
        requires=("@",),
    ),
    Rule(
        "URL",
        r"(?P<phi>\b(?:https?://|ftp://|www\.)[^\s<>\"'()]+[^\s<>\"'().,;:!?])",
        0.9,
        re.IGNORECASE,
        name="url",
        requires=("http", "www.", "ftp://"),
    ),
    Rule(
        "IP_ADDRESS",
        r"(?<![\d.])(?P<phi>(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))(?![\d.]*\d)",
        0.85,
        name="ipv4",
        requires=(".",),
    ),
    Rule(
        "IP_ADDRESS",
        r"(?<![\w:])(?P<phi>(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4})(?![\w:])",
        0.8,
        name="ipv6",
        requires=(
            "::",
            ":0",
            ":1",
            ":2",
            ":3",
            ":4",
            ":5",
            ":6",
            ":7",
            ":8",
            ":9",
            ":a",
            ":b",
            ":c",
            ":d",
            ":e",
            ":f",
        ),
    ),
    # --- government / record numbers -------------------------------------------------------------
    Rule(
        "SSN",
        r"(?<![\d\-])(?P<phi>(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4})(?![\d\-])",
        0.9,
        name="ssn",
        requires=("-",),
    ),
    Rule(
        "SSN",
        r"\b(?:SSN|Social[ \t]+Security(?:[ \t]+(?:No\.?|Number|#))?|SS#)[ \t]*[:#]?[ \t]*"
        r"(?P<phi>\d{3}[ \-]?\d{2}[ \-]?\d{4})\b",
        0.95,
        re.IGNORECASE,
        name="ssn_ctx",
        requires=("ssn", "social", "ss#"),
    ),
    Rule(
        "MRN",
        r"\b(?:MRN|MR#|MR(?=[ \t]*:)|MR[ \t]+No\.?|Med(?:ical)?[ \t]*Rec(?:ord)?\.?(?:[ \t]*(?:No\.?|Number|#))?|"
        r"Patient[ \t]+ID|Hospital[ \t]+(?:No\.?|Number)|Unit[ \t]+(?:No\.?|Number))[ \t]*[:#]?[ \t]*"
        r"(?P<phi>[A-Z]{0,3}-?\d{4,12}(?:-\d{1,4})?)\b",
        0.95,
        re.IGNORECASE,
        name="mrn_ctx",
        requires=("mr", "med", "patient id", "hospital", "unit"),
    ),
    Rule(
        "ACCESSION",
        r"\b(?:Acc(?:ession)?\.?(?:[ \t]*(?:No\.?|Num(?:ber)?\.?|#))?|Order[ \t]*#)[ \t]*[:#]?[ \t]*"
        r"(?P<phi>[A-Z]{0,4}-?\d{4,14})\b",
        0.95,
        re.IGNORECASE,
        name="accession_ctx",
        requires=("acc", "order"),
    ),
    Rule(
        "DEVICE_SERIAL",
        r"(?:\b(?:S/N|SN|Serial(?:[ \t]*(?:No\.?|Number|#))?|Device[ \t]+ID|UDI)[ \t]*[:#]?[ \t]*)"
        r"(?P<phi>(?=[A-Z0-9\-]*\d)[A-Z0-9][A-Z0-9\-]{3,30})\b",
        0.9,
        name="serial_ctx",
        requires=("sn", "s/n", "serial", "device", "udi"),
    ),
    Rule(
        "ID",
        r"\b(?:Account|Acct|Policy|Member[ \t]+ID|Insurance[ \t]+ID|Subscriber[ \t]+ID|License|Lic|"
        r"DEA|NPI|Plan[ \t]+ID|Certificate|Badge|Plate)[ \t]*(?:#|No\.?|Number)?[ \t]*[:#][ \t]*"
        r"(?P<phi>(?=[A-Z0-9\-]*\d)[A-Z0-9][A-Z0-9\-]{3,24})\b",
        0.85,
        re.IGNORECASE,
        name="id_ctx",
        requires=(
            "account",
            "acct",
            "policy",
            "member",
            "insurance",
            "subscriber",
            "lic",
            "dea",
            "npi",
            "plan",
            "certificate",
            "badge",
            "plate",
        ),
    ),
    # --- geography ---------------------------------------------------------------------------------
    Rule(
        "ADDRESS",
        rf"\b(?P<phi>\d{{1,6}}[A-Z]?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:[A-Z][A-Za-z'\-]*\.?[ \t]+){{1,4}}"
        rf"{_STREET_SUFFIX}\b(?:,?[ \t]+(?:Apt|Apartment|Unit|Suite|Ste|Fl|Floor|Rm|#)\.?[ \t]*#?[A-Za-z0-9\-]+)?)",
        0.9,
        name="street",
    ),
    Rule(
        "ADDRESS",
        r"\b(?P<phi>P\.?[ \t]?O\.?[ \t]+Box[ \t]+\d+)",
        0.9,
        re.IGNORECASE,
        name="po_box",
        requires=("box",),
    ),
    Rule(
        "LOCATION",
        rf"(?:\b{_STREET_SUFFIX}\.?(?:[ \t]+(?:Apt|Apartment|Unit|Suite|Ste|#)\.?[ \t]*#?[A-Za-z0-9\-]+)?,[ \t]*)"
        rf"(?P<phi>[A-Z][A-Za-z.'\-]+(?:[ \t]+[A-Z][A-Za-z.'\-]+){{0,2}})(?=,?[ \t]+{_STATE_RE}\b)",
        0.9,
        name="city_after_street",
    ),
    Rule(
        "LOCATION",
        rf"\b(?P<phi>[A-Z][a-z.'\-]+(?:[ \t]+[A-Z][a-z.'\-]+){{0,2}}),[ \t]*(?:{'|'.join(STATES)})[ \t]+\d{{5}}\b",
        0.85,
        name="city_state_zip",
    ),
    Rule(
        "ZIP",
        rf"\b(?:{'|'.join(STATES)}|{STATE_NAMES}),?[ \t]+(?P<phi>\d{{5}}(?:-\d{{4}})?)\b",
        0.9,
        name="zip_after_state",
    ),
    Rule(
        "ZIP",
        r"\b(?:ZIP|Zip[ \t]*[Cc]ode|Postal[ \t]*[Cc]ode)[ \t]*:?[ \t]*(?P<phi>\d{5}(?:-\d{4})?)\b",
        0.9,
        name="zip_ctx",
        requires=("zip", "postal"),
    ),
    # --- dates ---------------------------------------------------------------------------------------
    Rule(
        "DATE",
        rf"\b(?P<phi>{_YEAR4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01]))(?!\d)",
        0.9,
        name="iso_date",
    ),
    Rule(
        "DATE",
        rf"(?<![\d/])(?P<phi>{_MO}/{_DAY}/(?:{_YEAR4}|\d{{2}}))(?![\d/])",
        0.9,
        name="us_date",
    ),
    Rule(
        "DATE", rf"(?<![\d\-])(?P<phi>{_MO}-{_DAY}-{_YEAR4})(?![\d\-])", 0.85, name="us_dash_date"
    ),
    Rule(
        "DATE",
        rf"(?<![\d.])(?P<phi>{_DAY}\.{_MO}\.{_YEAR4})(?![\d.])",
        0.7,
        name="dot_date",
        requires=(".",),
    ),
    Rule(
        "DATE",
        rf"\b(?P<phi>{_DAY}[ \-]{_MON}[ \-,]*{_YEAR4})\b",
        0.9,
        name="d_mon_y",
        requires=_MONTH_PREFIXES,
    ),
    Rule(
        "DATE",
        rf"\b(?P<phi>{_MON}[ \t]+{_DAY}(?:st|nd|rd|th)?,?[ \t]+{_YEAR4})\b",
        0.9,
        name="mon_d_y",
        requires=_MONTH_PREFIXES,
    ),
    Rule(
        "DATE",
        rf"\b(?P<phi>{_MON}[ \t]+{_YEAR4})\b",
        0.8,
        name="mon_y",
        requires=_MONTH_PREFIXES,
    ),
    Rule(
        "DATE",
        rf"\b(?P<phi>(?:{MONTHS_FULL}|(?:{MONTHS_ABBR})\.)[ \t]+{_DAY}(?:st|nd|rd|th)?)\b(?![ \t]*(?:mg|mL|ml|units?|%))",
        0.7,
        name="mon_d",
        requires=_MONTH_PREFIXES,
    ),
    Rule(
        "DATE",
        r"\b(?:in|since|on|during|until|before|after|early|late|mid|last|next|of|this|from)[ \t\-]+"
        r"(?P<phi>January|February|April|June|July|August|September|October|November|December)\b",
        0.6,
        name="month_ctx",
        requires=_MONTH_PREFIXES,
    ),
    Rule("DATE", rf"(?<![\d/])(?P<phi>{_MO}/{_YEAR4})(?![\d/])", 0.7, name="mo_year"),
    # m/yy (2/03, 8/79); /10 is left alone (pain scores "6/10")
    Rule(
        "DATE",
        r"(?<![\d/.])(?P<phi>(?:0?[1-9]|1[0-2])/(?:0\d|1[1-9]|[2-9]\d))(?![\d/%.])",
        0.6,
        name="mo_yy",
    ),
    Rule("DATE", rf"(?<![\d\-])(?P<phi>{_MO}-{_DAY}-\d{{2}})(?![\d\-])", 0.7, name="us_dash_yy"),
    Rule(
        "DATE",
        r"(?<![\d.\-])(?P<phi>(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?![\d.\-])",
        0.5,
        name="dicom_date",
    ),
    # --- ages over 89 ------------------------------------------------------------------------------------
    Rule(
        "AGE",
        r"\b(?P<phi>(?:9\d|1[0-2]\d)(?:[ \-](?:year|yr)s?(?:[ \-]old)?|[ \t]*(?:y/?o|y\.o\.|yo)\b|"
        r"[ \t]+years?[ \t]+of[ \t]+age))",
        0.9,
        re.IGNORECASE,
        name="age_over_89",
    ),
    Rule(
        "AGE",
        r"\b(?:age|aged|Age)[ \t]*:?[ \t]*(?P<phi>9\d|1[0-2]\d)\b",
        0.85,
        name="age_ctx",
        requires=("age",),
    ),
)


class ClinicalPatternRecognizer(EntityRecognizer):  # type: ignore[misc]
    """All pattern rules of one entity type; reports the ``phi`` group of each match."""

    def __init__(self, entity: str, rules: Sequence[Rule]):
        self._compiled = [
            (re.compile(r.pattern, r.flags), r.score, r.name, r.requires) for r in rules
        ]
        self._rec_name = f"clinical_{entity.lower()}"
        super().__init__(
            supported_entities=[entity],
            name=f"clinical_{entity.lower()}",
            supported_language="en",
        )

    def load(self) -> None:
        return None

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        entity = self.supported_entities[0]
        out: list[RecognizerResult] = []
        low: str | None = None
        for rx, score, name, requires in self._compiled:
            if requires:
                low = text.lower() if low is None else low
                if not any(r in low for r in requires):
                    continue
            for m in rx.finditer(text):
                if "phi" in rx.groupindex and m.group("phi") is not None:
                    s, e = m.span("phi")
                else:
                    s, e = m.span()
                if e > s:
                    out.append(_result(entity, s, e, score, name, self._rec_name))
        return out


def _result(entity: str, s: int, e: int, score: float, rule: str, rec: str) -> RecognizerResult:
    return RecognizerResult(
        entity_type=entity,
        start=s,
        end=e,
        score=score,
        recognition_metadata={
            RecognizerResult.RECOGNIZER_NAME_KEY: rec,
            RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: f"{rec}:{rule}",
        },
    )


def pattern_recognizers() -> list[ClinicalPatternRecognizer]:
    by_entity: dict[str, list[Rule]] = {}
    for r in RULES:
        by_entity.setdefault(r.entity, []).append(r)
    return [ClinicalPatternRecognizer(e, rs) for e, rs in by_entity.items()]


# ----------------------------------------------------------------------------------------------
# Deny-lists: the structured record's own identifiers for the patient, and the staff directory.
# ----------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[A-Za-z][A-Za-z'’\-]*[A-Za-z]|[A-Za-z]")
_JOIN = re.compile(r"^(?:[ \t]*,?[ \t]*|[ \t]+[A-Z]\.?[ \t]+)$")


def name_tokens(names: Iterable[str]) -> set[str]:
    """Name parts of length >= 2 (initials are too ambiguous to deny-list)."""
    out: set[str] = set()
    for n in names:
        for t in _TOKEN.findall(n or ""):
            if len(t) >= 2:
                out.add(t)
    return out


_NON_DIGIT = re.compile(r"\D")
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Deny lists with at most this many terms (name variants + numbers + literals) are matched
# without compiling a name expression (DenyListRecognizer).
PROBE_MAX = 160


def _digits_regex(digits: str) -> str:
    """A value's digits with up to two separators between them, not inside a longer number."""
    return r"(?<!\d)" + r"[ \t().\-]{0,2}".join(digits) + r"(?!\d)"


class DenyListRecognizer(EntityRecognizer):  # type: ignore[misc]
    """Finds a patient's (or the staff's) own names and identifiers wherever they appear.

    Name parts match in Title or UPPER case as whole words (so the surname "Rose" does not hit
    the verb "rose"); adjacent parts joined by a space, comma or initial merge into one span.

    One list is built per patient and text column, and compiling its regular expressions cost
    ~2.6 ms, more than matching most texts. So a short list (a patient's: ``probe``) finds its
    name variants with ``str.find`` and compiles a number's or literal's expression only for a
    text that holds the value (:meth:`_values_in`); the spans are those of the expressions
    (tested). A long list (the staff's) is compiled once and matched by expression.
    """

    def __init__(
        self,
        terms: DenyTerms,
        name: str = "deny_list",
        min_parts: int = 1,
        *,
        probe: bool | None = None,
    ):
        self.terms = terms
        self._rec_name = name
        # Staff lists use min_parts=2: a lone staff surname ("Ward") is too often a plain word;
        # titled mentions ("Dr. Ward") are caught by the title patterns instead.
        self._min_parts = min_parts
        tokens = name_tokens(terms.names)
        variants: set[str] = set()
        for t in tokens:
            variants.update({t, t.upper(), t[:1].upper() + t[1:].lower(), t.title()})
        # longest first: at one position the expression takes the first (longest) variant
        self._variants = sorted(variants, key=len, reverse=True)
        # (entity, digits of the value, matched case-insensitively as a literal?)
        self._values: list[tuple[str, str, bool]] = []
        for entity, value in terms.numbers:
            digits = _NON_DIGIT.sub("", value)
            if len(digits) >= 7:
                self._values.append((entity, digits, False))
        for entity, value in terms.literals:
            v = (value or "").strip()
            if len(v) >= 3:
                self._values.append((entity, v, True))
        self._rx: dict[int, re.Pattern[str]] = {}
        self.probe = (
            len(self._variants) + len(self._values) <= PROBE_MAX if probe is None else probe
        )
        self._name_rx = (
            re.compile(
                r"(?<![A-Za-z])(?:"
                + "|".join(re.escape(v) for v in self._variants)
                + r")(?![A-Za-z])"
            )
            if self._variants and not self.probe
            else None
        )
        entities = sorted({"PERSON"} | {e for e, _, _ in self._values})
        super().__init__(supported_entities=entities, name=name, supported_language="en")

    def _value_rx(self, i: int) -> re.Pattern[str]:
        rx = self._rx.get(i)
        if rx is None:
            _, v, literal = self._values[i]
            rx = (
                re.compile(r"(?<!\w)" + re.escape(v) + r"(?!\w)", re.IGNORECASE)
                if literal
                else re.compile(_digits_regex(v))
            )
            self._rx[i] = rx
        return rx

    def _name_spans(self, text: str) -> list[tuple[int, int]]:
        """Whole-word occurrences of the name variants, as ``finditer`` of the alternation
        ``(?<![A-Za-z])(?:v1|v2|...)(?![A-Za-z])`` (longest first) gives them: scanning left
        to right, the leftmost start, there the longest variant, then on from its end."""
        if self._name_rx is not None:
            return [m.span() for m in self._name_rx.finditer(text)]
        found: list[tuple[int, int]] = []
        n = len(text)
        for v in self._variants:
            i = text.find(v)
            while i != -1:
                j = i + len(v)
                if (i == 0 or text[i - 1] not in _ASCII_LETTERS) and (
                    j == n or text[j] not in _ASCII_LETTERS
                ):
                    found.append((i, j))
                i = text.find(v, i + 1)
        found.sort(key=lambda se: (se[0], -se[1]))
        out: list[tuple[int, int]] = []
        pos = 0
        for st, en in found:
            if st >= pos:
                out.append((st, en))
                pos = en
        return out

    def _values_in(self, text: str) -> list[int]:
        """Indexes of the values that can match ``text``. Unprobed lists: all. A number's
        match leaves its digits in a row once the text's non-digits are removed (only
        separators lie between them); a literal matches case-insensitively, which
        ``str.lower`` decides exactly when both are ASCII."""
        if not self.probe:
            return list(range(len(self._values)))
        only = low = None
        out: list[int] = []
        for i, (_, v, literal) in enumerate(self._values):
            if literal:
                if not (text.isascii() and v.isascii()):
                    out.append(i)
                    continue
                low = text.lower() if low is None else low
                if v.lower() in low:
                    out.append(i)
            else:
                only = _NON_DIGIT.sub("", text) if only is None else only
                if v in only:
                    out.append(i)
        return out

    def load(self) -> None:
        return None

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: Any = None
    ) -> list[RecognizerResult]:
        out: list[RecognizerResult] = []
        merged: list[list[int]] = []
        for s, e in self._name_spans(text):
            if merged and _JOIN.match(text[merged[-1][1] : s]):
                merged[-1][1] = e
                merged[-1][2] += 1
            else:
                merged.append([s, e, 1])
        for s, e, parts in merged:
            if parts >= self._min_parts:
                out.append(_result("PERSON", s, e, 0.95, "name", self._rec_name))
        for i in self._values_in(text):
            entity = self._values[i][0]
            for m in self._value_rx(i).finditer(text):
                out.append(_result(entity, m.start(), m.end(), 0.95, "value", self._rec_name))
        return out


# Words that spaCy's small model tends to tag as PERSON/LOCATION in clinical text but that are
# not identifiers. Generic clinical vocabulary, not tuned to any corpus.
NER_STOPWORDS = frozenset(
    [
        "hpi",
        "pmh",
        "psh",
        "ros",
        "exam",
        "plan",
        "assessment",
        "impression",
        "history",
        "labs",
        "vitals",
        "imaging",
        "social",
        "family",
        "medications",
        "allergies",
        "patient",
        "pt",
        "unit",
        "bed",
        "room",
        "ward",
        "icu",
        "ed",
        "er",
        "or",
        "pacu",
        "nicu",
        "picu",
        "ccu",
        "bp",
        "hr",
        "rr",
        "spo2",
        "temp",
        "wt",
        "ht",
        "bmi",
        "na",
        "k",
        "cl",
        "hco3",
        "bun",
        "cr",
        "wbc",
        "hgb",
        "hct",
        "plt",
        "inr",
        "ptt",
        "ast",
        "alt",
        "alp",
        "po",
        "iv",
        "im",
        "sc",
        "sq",
        "bid",
        "tid",
        "qid",
        "qhs",
        "prn",
        "q4h",
        "q6h",
        "q8h",
        "q12h",
        "q24h",
        "daily",
        "nc",
        "ra",
        "mri",
        "ct",
        "cta",
        "cxr",
        "ekg",
        "ecg",
        "echo",
        "tte",
        "tee",
        "us",
        "xr",
        "dx",
        "cr",
        "mr",
        "pet",
        "tylenol",
        "lasix",
        "coumadin",
        "heparin",
        "insulin",
        "metformin",
        "lisinopril",
        "metoprolol",
        "aspirin",
        "albuterol",
        "furosemide",
        "ceftriaxone",
        "acetaminophen",
        "potassium",
        "magnesium",
        "glargine",
        "fleischner",
        "glasgow",
        "apgar",
        "braden",
        "morse",
        "wells",
        "dr",
        "mr",
        "mrs",
        "ms",
        "md",
        "do",
        "rn",
        "np",
        "pa",
    ]
)
