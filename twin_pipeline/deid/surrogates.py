"""Consistent surrogates for PHI found in free text.

Every surrogate is a function of (key, patient, entity type, normalised value): the same name in
two notes of one patient becomes the same fake name; another patient (or another key version)
gets another one. Dates are shifted by the patient's offset and written back in their own
format, so intervals within a patient survive. Fake names are built from syllables rather than
drawn from a list of real names. Syllables can still spell a real name ("Ste" + "ven"), so the
words to ``avoid`` (the patient's own name parts) are never produced: a surrogate that spelled
one is drawn again from the next HMAC. Otherwise the leak check would rightly report the
patient's own name in a de-identified note (seen at 10k patients with one key in ~200k names).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import date, timedelta

from twin_pipeline.deid.keyed import hmac_hex

_ONSET = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "pl",
    "st",
]
_VOWEL = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODA = ["", "", "n", "r", "l", "s", "x"]
_STREET_SUFFIX_WORDS = {"street", "st", "avenue", "ave", "road", "rd", "lane", "ln", "drive", "dr"}
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


class Surrogates:
    """Surrogate maker for one key; ``patient`` scopes consistency."""

    def __init__(self, key: bytes):
        self._key = key

    def _h(self, patient: str, kind: str, value: str) -> str:
        return hmac_hex(self._key, f"text-surrogate:{kind}", f"{patient}\x1f{value}")

    # -- words -----------------------------------------------------------------------------
    def pseudo_word(
        self,
        patient: str,
        kind: str,
        value: str,
        syllables: int = 3,
        avoid: Collection[str] = (),
    ) -> str:
        """A pronounceable word from the HMAC of ``value``; never one of ``avoid`` (lower
        case): such a draw is repeated from the HMAC of ``value`` and a counter."""
        salt = ""
        for attempt in range(1, 65):
            h = self._h(patient, kind, value + salt)
            n = int(h[:2], 16)
            parts = []
            for i in range(syllables if n % 3 else syllables - 1):
                a, b, c = (int(h[2 + 6 * i + j * 2 : 4 + 6 * i + j * 2], 16) for j in range(3))
                parts.append(
                    _ONSET[a % len(_ONSET)] + _VOWEL[b % len(_VOWEL)] + _CODA[c % len(_CODA)]
                )
            word = "".join(parts).capitalize()
            if word.lower() not in avoid:
                return word
            salt = f"\x1f{attempt}"
        return word  # 64 draws all in ``avoid``: not reachable with a patient's few names

    def person(self, patient: str, text: str, avoid: Collection[str] = ()) -> str:
        """Each name part to a fake part, keeping case, order and punctuation; no fake part is
        one of ``avoid`` (lower case)."""

        def repl(m: re.Match[str]) -> str:
            tok = m.group(0)
            if len(tok) == 1:
                letter = chr(ord("A") + int(self._h(patient, "initial", tok.upper())[:2], 16) % 26)
                return letter if tok.isupper() else letter.lower()
            fake = self.pseudo_word(patient, "name", tok.lower(), avoid=avoid)
            return _case_like(tok, fake)

        out = re.sub(r"[A-Za-z][A-Za-z'’\-]*", repl, text)
        return self.digits(patient, "name-digits", out) if any(c.isdigit() for c in out) else out

    def location(self, patient: str, text: str) -> str:
        fake = self.pseudo_word(patient, "city", text.lower().strip(), 2) + "ville"
        return _case_like(text, fake)

    def address(self, patient: str, text: str, avoid: Collection[str] = ()) -> str:
        h = self._h(patient, "address", text.lower())
        number = str(10 + int(h[:6], 16) % 9000)
        street = self.pseudo_word(patient, "street", text.lower(), 2, avoid=avoid)
        words = text.split()
        suffix = "St"
        for w in reversed(words):
            if w.lower().strip(".,") in _STREET_SUFFIX_WORDS:
                suffix = w.strip(",")
                break
        return f"{number} {street} {suffix}"

    # -- numbers ------------------------------------------------------------------------------
    def digits(self, patient: str, kind: str, text: str) -> str:
        """Format-preserving: every digit and letter replaced from the HMAC stream."""
        norm = re.sub(r"[^0-9A-Za-z]", "", text).upper()
        stream = ""
        i = 0
        while len(stream) < 2 * len(text) + 2:
            stream += self._h(patient, kind, f"{norm}:{i}")
            i += 1
        out = []
        for j, ch in enumerate(text):
            v = int(stream[2 * j : 2 * j + 2], 16)
            if ch.isdigit():
                out.append(str(v % 10))
            elif ch.isalpha():
                letter = chr(ord("A") + v % 26)
                out.append(letter if ch.isupper() else letter.lower())
            else:
                out.append(ch)
        return "".join(out)

    def ssn(self, patient: str, text: str) -> str:
        out = self.digits(patient, "ssn", text)
        # 9xx area numbers are never issued: the surrogate cannot be a real SSN.
        i = next((k for k, c in enumerate(out) if c.isdigit()), None)
        return out if i is None else out[:i] + "9" + out[i + 1 :]

    def phone(self, patient: str, text: str) -> str:
        out = self.digits(patient, "phone", text)
        # exchange 555: reserved for fiction
        digits = [i for i, c in enumerate(out) if c.isdigit()]
        if len(digits) >= 10:
            chars = list(out)
            for k, d in zip(digits[-7:-4], "555", strict=True):
                chars[k] = d
            out = "".join(chars)
        return out

    def email(self, patient: str, text: str) -> str:
        h = self._h(patient, "email", text.lower())
        return f"{self.pseudo_word(patient, 'email-user', text.lower(), 2).lower()}.{h[:6]}@example.org"

    def url(self, patient: str, text: str) -> str:
        return f"https://example.org/r/{self._h(patient, 'url', text)[:12]}"

    def ip(self, patient: str, text: str) -> str:
        h = self._h(patient, "ip", text)
        if ":" in text:
            return f"2001:db8::{h[:4]}:{h[4:8]}"
        return f"192.0.2.{1 + int(h[:4], 16) % 254}"  # TEST-NET-1

    def zip(self, text: str, restricted: frozenset[str]) -> str:
        z3 = text[:3]
        return ("000" if z3 in restricted else z3) + "XX"

    def age(self, text: str) -> str:
        return re.sub(r"\d+", "90+", text, count=1)

    # -- dates ----------------------------------------------------------------------------------
    def date(self, text: str, offset_days: int) -> str:
        shifted = shift_date_text(text, offset_days)
        return shifted if shifted is not None else "[DATE]"


def _case_like(src: str, fake: str) -> str:
    letters = [c for c in src if c.isalpha()]
    if letters and all(c.isupper() for c in letters) and len(letters) > 1:
        return fake.upper()
    if letters and all(c.islower() for c in letters):
        return fake.lower()
    return fake


# ---------------------------------------------------------------------------------------------
# Date shifting in the note's own format
# ---------------------------------------------------------------------------------------------
_MON_INDEX = {m.lower(): i + 1 for i, m in enumerate(MONTHS)}
_MON_INDEX.update({m[:3].lower(): i + 1 for i, m in enumerate(MONTHS)})
_MON_INDEX["sept"] = 9


def _year4(y: str) -> int:
    n = int(y)
    if len(y) == 2:
        return 2000 + n if n < 50 else 1900 + n
    return n


def _mon_out(src: str, month: int) -> str:
    full = MONTHS[month - 1]
    name = full if len(src.rstrip(".")) > 3 or src.lower() == "may" else full[:3]
    if src.lower().rstrip(".") == "sept":
        name = "Sep"
    if src.endswith(".") and len(name) == 3:
        name += "."
    return _case_like(src, name) if src.isupper() and len(src) > 1 else name


def _safe_date(y: int, m: int, d: int) -> date | None:
    try:
        return date(y, m, d)
    except ValueError:
        return None


_DATE_FORMS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$"), "ymd-"),
    (re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})$"), "mdy/"),
    (re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{4})$"), "mdy-"),
    (re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{4})$"), "dmy."),
    (re.compile(r"^(\d{4})(\d{2})(\d{2})$"), "ymd"),
    (re.compile(r"^(\d{1,2})([ \-])([A-Za-z]+\.?)([ \-,]*)(\d{4})$"), "d mon y"),
    (re.compile(r"^([A-Za-z]+\.?)([ \t]+)(\d{1,2})(st|nd|rd|th)?(,?[ \t]+)(\d{4})$"), "mon d, y"),
    (re.compile(r"^([A-Za-z]+\.?)([ \t]+)(\d{4})$"), "mon y"),
    (re.compile(r"^([A-Za-z]+\.?)([ \t]+)(\d{1,2})(st|nd|rd|th)?$"), "mon d"),
    (re.compile(r"^(\d{1,2})/(\d{4})$"), "m/y"),
    (re.compile(r"^([A-Za-z]+)$"), "mon"),
]


def shift_date_text(text: str, offset_days: int) -> str | None:
    """Shift a date written in one of the recognised formats; None if it cannot be parsed."""
    t = text.strip()
    delta = timedelta(days=offset_days)
    for rx, form in _DATE_FORMS:
        m = rx.match(t)
        if not m:
            continue
        g = m.groups()
        if form == "ymd-":
            d = _safe_date(int(g[0]), int(g[1]), int(g[2]))
            if d:
                d += delta
                w1, w2 = len(g[1]), len(g[2])
                return f"{d.year:04d}-{d.month:0{w1}d}-{d.day:0{w2}d}"
        elif form in ("mdy/", "mdy-"):
            sep = "/" if form == "mdy/" else "-"
            d = _safe_date(_year4(g[2]), int(g[0]), int(g[1]))
            if d:
                d += delta
                y = f"{d.year % 100:02d}" if len(g[2]) == 2 else f"{d.year:04d}"
                return f"{d.month:0{len(g[0])}d}{sep}{d.day:0{len(g[1])}d}{sep}{y}"
        elif form == "dmy.":
            d = _safe_date(int(g[2]), int(g[1]), int(g[0]))
            if d:
                d += delta
                return f"{d.day:0{len(g[0])}d}.{d.month:0{len(g[1])}d}.{d.year:04d}"
        elif form == "ymd":
            d = _safe_date(int(g[0]), int(g[1]), int(g[2]))
            if d:
                d += delta
                return f"{d.year:04d}{d.month:02d}{d.day:02d}"
        elif form == "d mon y":
            mon = _MON_INDEX.get(g[2].lower().rstrip("."))
            d = _safe_date(int(g[4]), mon, int(g[0])) if mon else None
            if d:
                d += delta
                return f"{d.day:0{len(g[0])}d}{g[1]}{_mon_out(g[2], d.month)}{g[3]}{d.year}"
        elif form == "mon d, y":
            mon = _MON_INDEX.get(g[0].lower().rstrip("."))
            d = _safe_date(int(g[5]), mon, int(g[2])) if mon else None
            if d:
                d += delta
                return f"{_mon_out(g[0], d.month)}{g[1]}{d.day}{_ordinal(d.day) if g[3] else ''}{g[4]}{d.year}"
        elif form == "mon y":
            mon = _MON_INDEX.get(g[0].lower().rstrip("."))
            d = _safe_date(int(g[2]), mon, 15) if mon else None
            if d:
                d += delta
                return f"{_mon_out(g[0], d.month)}{g[1]}{d.year}"
        elif form == "mon d":
            mon = _MON_INDEX.get(g[0].lower().rstrip("."))
            d = _safe_date(2001, mon, int(g[2])) if mon else None
            if d:
                d += delta
                return f"{_mon_out(g[0], d.month)}{g[1]}{d.day}{_ordinal(d.day) if g[3] else ''}"
        elif form == "m/y":
            d = _safe_date(int(g[1]), int(g[0]), 15)
            if d:
                d += delta
                return f"{d.month:0{len(g[0])}d}/{d.year}"
        elif form == "mon":
            mon = _MON_INDEX.get(g[0].lower())
            d = _safe_date(2001, mon, 15) if mon else None
            if d:
                return _mon_out(g[0], (d + delta).month)
    return None


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
