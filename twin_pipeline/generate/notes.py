"""Clinical notes with planted PHI and exact character-span labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from random import Random

from twin_pipeline.generate.common import Clinician, Identifiers, Person

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


@dataclass(slots=True)
class NoteBuilder:
    """Accumulates text segments and records the span of each PHI segment."""

    parts: list[str] = field(default_factory=list)
    spans: list[dict[str, int | str]] = field(default_factory=list)
    pos: int = 0

    def t(self, text: str) -> NoteBuilder:
        """Append non-PHI text."""
        self.parts.append(text)
        self.pos += len(text)
        return self

    def p(self, text: str, label: str) -> NoteBuilder:
        """Append a PHI mention with its label."""
        self.spans.append({"start": self.pos, "end": self.pos + len(text), "label": label})
        return self.t(text)

    def text(self) -> str:
        """The note text."""
        return "".join(self.parts)


def fmt_date(d: date, style: int) -> str:
    """One of several clinical date formats."""
    if style == 0:
        return d.strftime("%Y-%m-%d")
    if style == 1:
        return d.strftime("%m/%d/%Y")
    if style == 2:
        return f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}"
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def phone_variant(phone: str, style: int) -> str:
    """'(617) 482-1937' -> a few common renderings."""
    digits = "".join(c for c in phone if c.isdigit())
    a, b, c = digits[:3], digits[3:6], digits[6:]
    if style == 0:
        return f"({a}) {b}-{c}"
    if style == 1:
        return f"{a}-{b}-{c}"
    return f"{a}.{b}.{c}"


COMPLAINTS = (
    "shortness of breath", "chest pain", "fever and productive cough", "dizziness",
    "lower extremity swelling", "abdominal pain", "fatigue and poor oral intake",
    "palpitations", "dysuria and flank pain", "a fall at home",
)  # fmt: skip
FINDINGS = (
    "no acute cardiopulmonary process", "small right pleural effusion",
    "4 mm nodule in the right lower lobe, follow-up in 12 months per Fleischner",
    "mild degenerative change, no fracture", "no intracranial hemorrhage",
    "trace pericardial effusion, EF 55-60%", "cholelithiasis without cholecystitis",
)  # fmt: skip
PLANS = (
    "Continue metoprolol tartrate 25 mg PO BID; hold for SBP < 100 or HR < 55.",
    "Start ceftriaxone 1 g IV q24h, day 1 of 5; blood cultures 0/2 so far.",
    "Heparin 5,000 units SC q8h for DVT prophylaxis.",
    "Furosemide 40 mg IV x1 then 20 mg PO BID; strict I/O, daily weights, goal net -1 L/day.",
    "Insulin glargine 18 units qHS plus sliding scale; A1c 8.4%.",
    "Acetaminophen 650 mg PO q6h PRN pain (pain 6/10 on arrival, now 3/10).",
    "Albuterol 2.5 mg neb q4h PRN; titrate O2 to SpO2 92-96%.",
    "Lisinopril 10 mg daily restarted, recheck BMP in 3-5 days.",
    "PT/OT evaluation; ambulated 150 ft with rolling walker x2 assist.",
    "Potassium chloride 40 mEq PO x2 for K 3.2; Mg 1.8, replete to > 2.0.",
)  # fmt: skip


@dataclass(slots=True)
class NoteContext:
    """Everything a note may mention."""

    person: Person
    title: str
    enc_class: str
    start: datetime
    end: datetime
    unit_name: str
    attending: Clinician
    consultant: Clinician
    conditions: list[str]
    vitals: dict[str, float]
    accession: str | None
    study_desc: str | None
    study_date: date | None
    scanner_serial: str | None
    monitor_serial: str | None


def _person_variant(b: NoteBuilder, rng: Random, p: Person) -> None:
    style = rng.randrange(4)
    if style == 0:
        b.p(p.full_name, "PERSON")
    elif style == 1:
        b.p(p.full_name.upper(), "PERSON")
    elif style == 2:
        b.p(f"{p.family}, {p.given}", "PERSON")
    else:
        b.p(f"{p.family.upper()}, {p.given.upper()}", "PERSON")


def build_note(
    rng: Random, ctx: NoteContext, ids: Identifiers
) -> tuple[str, list[dict[str, int | str]]]:
    """Compose a ~1 kB note; return its text and PHI spans."""
    p = ctx.person
    b = NoteBuilder()
    ds = rng.randrange(4)
    b.t(f"{ctx.title.upper()}\nPatient: ")
    _person_variant(b, rng, p)
    b.t("   MRN: ").p(p.mrn, "MRN")
    b.t("   DOB: ").p(fmt_date(p.birth_date, rng.randrange(4)), "DATE")
    b.t("\nDate of service: ").p(fmt_date(ctx.start.date(), ds), "DATE")
    b.t(f" {ctx.start:%H%M}   Unit: {ctx.unit_name}\nAttending: Dr. ")
    b.p(ctx.attending.full_name, "PERSON")
    b.t(f", {ctx.attending.credential}\n\n")

    # HPI
    honor = {"male": "Mr.", "female": "Ms."}.get(p.gender, "Mx.")
    noun = {"male": "man", "female": "woman"}.get(p.gender, "patient")
    age = p.age_on(ctx.start.date())
    article = "an" if str(age).startswith("8") or age in (11, 18) else "a"
    b.t(f"HPI: {honor} ").p(p.family, "PERSON").t(f" is {article} ")
    if age > 89:
        b.p(f"{age}-year-old", "AGE")
    else:
        b.t(f"{age}-year-old")
    conds = " and ".join(c.lower() for c in ctx.conditions[:2]) or "no significant history"
    days = rng.randint(1, 6)
    b.t(
        f" {noun} with {conds} who presents with {rng.choice(COMPLAINTS)} x {days} days. "
        f"Symptoms rated {rng.randint(3, 8)}/10, worse with exertion; "
        f"{rng.randint(1, 3)} similar episodes over the past {rng.randint(2, 11)} months.\n"
    )
    v = ctx.vitals
    b.t(
        f"Vitals: T {v['temp']:.1f} C ({v['temp'] * 9 / 5 + 32:.1f} F), HR {v['hr']:.0f}, "
        f"BP {v['sys']:.0f}/{v['dia']:.0f}, RR {v['rr']:.0f}, SpO2 {v['spo2']:.0f}% on "
        f"{rng.choice(('RA', '2 L NC', '4 L NC'))}. Wt {v['weight']:.1f} kg.\n"
        f"Labs: Na {rng.randint(131, 145)}, K {rng.uniform(3.2, 5.1):.1f}, "
        f"Cl {rng.randint(96, 108)}, HCO3 {rng.randint(19, 28)}, BUN {rng.randint(8, 42)}, "
        f"Cr {v['creat']:.2f}, glucose {v['glucose']:.0f} mg/dL, WBC {rng.uniform(4, 16):.1f}, "
        f"Hgb {rng.uniform(8.5, 15.5):.1f}, Plt {rng.randint(120, 420)}.\n"
    )
    if ctx.accession is not None and ctx.study_date is not None:
        b.t(f"Imaging: {ctx.study_desc} (Acc# ").p(ctx.accession, "ACCESSION").t(") on ")
        b.p(fmt_date(ctx.study_date, rng.randrange(4)), "DATE")
        if ctx.scanner_serial and rng.random() < 0.6:
            b.t(", scanner SN ").p(ctx.scanner_serial, "DEVICE_SERIAL")
        b.t(f": {rng.choice(FINDINGS)}.\n")
    if ctx.monitor_serial is not None:
        b.t("Monitoring: continuous telemetry via bedside monitor SN ")
        b.p(ctx.monitor_serial, "DEVICE_SERIAL")
        b.t(
            f"; {rng.randint(1, 4)} brief desaturations to {rng.randint(84, 89)}%, "
            f"HR range {rng.randint(55, 70)}-{rng.randint(95, 130)}.\n"
        )

    # Social / contact
    b.t("Social: lives at ")
    address = p.street
    ids.addresses[address] = None
    b.p(address, "ADDRESS").t(", ").p(p.city.name, "LOCATION").t(f", {p.city.state} ")
    b.p(p.zip, "ZIP").t(f" with {p.relative_relation} ")
    rel_name = f"{p.relative_given} {p.family}"
    ids.names[rel_name] = None
    b.p(rel_name, "PERSON").t(" (")
    rel_phone = phone_variant(p.relative_phone, rng.randrange(3))
    ids.phones[rel_phone] = None
    b.p(rel_phone, "PHONE").t("). ")
    r = rng.random()
    if r < 0.5:
        phone = phone_variant(p.phone, rng.randrange(3))
        ids.phones[phone] = None
        b.t("Patient cell ").p(phone, "PHONE").t(". ")
    if rng.random() < 0.35:
        b.t("Prefers email: ").p(p.email, "EMAIL").t(". ")
    if rng.random() < 0.2:
        b.t("Home BP cuff syncs via hub at IP ").p(p.ip, "IP_ADDRESS").t(". ")
    if rng.random() < 0.2:
        b.t("Shared results link ").p(p.url, "URL").t(". ")
    if rng.random() < 0.1:
        b.t("SSN ").p(p.ssn, "SSN").t(" verified for insurance. ")
    if age >= 18:
        b.t(f"Tobacco {rng.randint(0, 40)} pack-years; EtOH {rng.randint(0, 3)} drinks/wk.")
    else:
        b.t(f"Immunizations up to date; grade {max(age - 5, 0)} at school.")
    b.t("\n\n")

    # Assessment and plan
    b.t("Assessment/Plan:\n")
    for i, plan in enumerate(rng.sample(PLANS, 3), start=1):
        b.t(f"{i}. {plan}\n")
    prior = (ctx.start - timedelta(days=rng.randint(20, 400))).date()
    b.t("Previously seen by Dr. ").p(ctx.consultant.full_name, "PERSON").t(" on ")
    b.p(fmt_date(prior, rng.randrange(4)), "DATE")
    b.t(f"; follow up in {rng.randint(1, 4)} weeks.\n")
    b.t("Electronically signed: ")
    a = ctx.attending
    if rng.random() < 0.5:
        b.p(f"{a.family.upper()}, {a.given.upper()}", "PERSON")
    else:
        b.p(a.full_name, "PERSON")
    b.t(f" {a.credential} ").p(fmt_date(ctx.end.date(), ds), "DATE").t(f" {ctx.end:%H:%M}\n")
    return b.text(), b.spans
