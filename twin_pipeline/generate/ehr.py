"""FHIR R4 resources for the hospital infrastructure and for each patient."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from random import Random

from twin_pipeline.generate import vocab as V
from twin_pipeline.generate.common import (
    Clinician,
    Identifiers,
    JsonDict,
    Person,
    fhir_dt,
    new_id,
    new_uid,
)
from twin_pipeline.generate.notes import NoteContext, build_note

RefFn = Callable[[str, str], str]


@dataclass(slots=True)
class Bed:
    """A bed (or bay/room) Location inside a care unit."""

    id: str
    name: str
    unit_key: str
    unit_name: str


@dataclass(slots=True)
class ScannerDevice:
    """An imaging device with its Device id and serial."""

    spec: V.Scanner
    id: str
    serial: str
    room: Bed


class Hospital:
    """Shared infrastructure: Locations, scanners, clinicians, global counters."""

    def __init__(self, seed: int, ids: Identifiers) -> None:
        rng = Random(f"{seed}:hospital")
        self.seed = seed
        self.locations: list[JsonDict] = []
        self.beds: dict[str, list[Bed]] = {}
        for key, name, n_beds, label in V.CARE_UNITS:
            unit_id = f"loc-{key}"
            self.locations.append(
                {
                    "resourceType": "Location",
                    "id": unit_id,
                    "status": "active",
                    "name": name,
                    "mode": "instance",
                    "physicalType": _cc(V.LOCATION_PHYSICAL_TYPE, "wa", "Ward"),
                }
            )
            beds: list[Bed] = []
            for i in range(1, n_beds + 1):
                bed = Bed(f"{unit_id}-{i:02d}", f"{name} {label} {i:02d}", key, name)
                is_room = label in ("Room", "Exam Room")
                self.locations.append(
                    {
                        "resourceType": "Location",
                        "id": bed.id,
                        "status": "active",
                        "name": bed.name,
                        "mode": "instance",
                        "physicalType": _cc(
                            V.LOCATION_PHYSICAL_TYPE,
                            "ro" if is_room else "bd",
                            "Room" if is_room else "Bed",
                        ),
                        "partOf": {"reference": f"Location/{unit_id}", "display": name},
                    }
                )
                beds.append(bed)
            self.beds[key] = beds
        self.scanners: list[ScannerDevice] = []
        self.scanner_devices: list[JsonDict] = []
        for i, spec in enumerate(V.SCANNERS):
            serial = f"{spec.serial_prefix}{rng.randint(100000, 999999)}"
            dev = ScannerDevice(spec, f"dev-{spec.key}", serial, self.beds["radiology"][i])
            self.scanners.append(dev)
            self.scanner_devices.append(
                {
                    "resourceType": "Device",
                    "id": dev.id,
                    "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.7", "value": serial}],
                    "status": "active",
                    "manufacturer": spec.manufacturer,
                    "serialNumber": serial,
                    "deviceName": [{"name": spec.model, "type": "model-name"}],
                    "modelNumber": spec.model,
                    "type": {
                        "coding": [
                            {"system": V.DICOM_DCM, "code": m, "display": V.MODALITY_DISPLAY[m]}
                            for m in spec.modalities
                        ],
                        "text": f"{spec.station} imaging scanner",
                    },
                    "location": {"reference": f"Location/{dev.room.id}", "display": dev.room.name},
                }
            )
        self.clinicians: list[Clinician] = []
        seen: set[str] = set()
        while len(self.clinicians) < 40:
            first = rng.choice(V.MALE_FIRST + V.FEMALE_FIRST)
            last = rng.choice(V.FAMILY)
            if f"{first} {last}" in seen:
                continue
            seen.add(f"{first} {last}")
            cred = rng.choices(("MD", "DO", "NP", "PA-C"), weights=(60, 15, 15, 10))[0]
            self.clinicians.append(Clinician(first, last, cred))
            ids.names[f"{first} {last}"] = None
        self.accession_base = (seed % 1000) * 100000
        self.n_studies = 0

    def scanner_for(self, modality: str) -> ScannerDevice:
        """The device that acquires ``modality``."""
        for s in self.scanners:
            if modality in s.spec.modalities:
                return s
        raise KeyError(modality)

    def next_accession(self) -> str:
        """A hospital-unique accession number (DICOM SH, <= 16 chars)."""
        self.n_studies += 1
        return f"RA{self.accession_base + self.n_studies:09d}"


def _cc(system: str, code: str, display: str) -> JsonDict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


@dataclass(slots=True)
class Encounter:
    """A planned encounter."""

    id: str
    cls: str
    cls_display: str
    start: datetime
    end: datetime
    bed: Bed


@dataclass(slots=True)
class SeriesPlan:
    """One DICOM series."""

    uid: str
    number: int
    description: str
    started: datetime
    instances: list[str]


@dataclass(slots=True)
class StudyPlan:
    """One imaging study to be written as DICOM files and an ImagingStudy."""

    id: str
    uid: str
    accession: str
    modality: str
    body_part: str
    body_code: str
    description: str
    started: datetime
    encounter_id: str
    scanner: ScannerDevice
    referring: Clinician
    series: list[SeriesPlan]
    frame_of_reference: str
    comment_has_name: bool


@dataclass(slots=True)
class MonitorPlan:
    """A bedside-monitor session during an inpatient stay."""

    device_id: str
    serial: str
    start: datetime
    minutes: int
    gap: tuple[int, int] | None
    baseline: dict[str, float]


@dataclass(slots=True)
class NoteOut:
    """A generated note and its PHI spans."""

    id: str
    patient_id: str
    text: str
    spans: list[dict[str, int | str]]


@dataclass(slots=True)
class PatientOutput:
    """All generated content for one patient."""

    person: Person
    resources: list[JsonDict] = field(default_factory=list)
    studies: list[StudyPlan] = field(default_factory=list)
    monitor: MonitorPlan | None = None
    notes: list[NoteOut] = field(default_factory=list)


def _mrn(seed: int, idx: int) -> str:
    return str(10_000_000 + ((seed % 100_000) * 104_729 + idx * 7919) % 90_000_000)


def make_person(seed: int, idx: int, rng: Random, ref_dt: datetime) -> Person:
    """Draw demographics for patient ``idx``."""
    g = rng.random()
    gender = "male" if g < 0.49 else "female" if g < 0.98 else "other" if g < 0.99 else "unknown"
    pool = (
        V.MALE_FIRST
        if gender == "male"
        else V.FEMALE_FIRST
        if gender == "female"
        else (V.MALE_FIRST + V.FEMALE_FIRST)
    )
    given = rng.choice(pool)
    middle = rng.choice(pool)
    family = rng.choice(V.FAMILY)
    band = rng.choices(
        ((0, 17), (18, 44), (45, 64), (65, 89), (90, 101)), weights=(8, 25, 30, 30, 7)
    )[0]
    age = rng.randint(*band)
    birth = (ref_dt - timedelta(days=age * 365 + rng.randint(30, 330))).date()
    age = _age(birth, ref_dt.date())
    city = rng.choice(V.CITIES)
    street = f"{rng.randint(2, 9899)} {rng.choice(V.STREETS)} {rng.choice(V.STREET_SUFFIX)}"
    if rng.random() < 0.25:
        street += f" Apt {rng.randint(1, 30)}{rng.choice('ABCD')}"
    zip_code = f"{city.zip3}{rng.randint(1, 99):02d}"
    phone = _phone(rng, city.area)
    ssn_area = rng.randint(1, 899)
    if ssn_area == 666:
        ssn_area = 667
    ssn = f"{ssn_area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    email = f"{given}.{family}{rng.randint(1, 99)}@{rng.choice(V.EMAIL_DOMAINS)}".lower().replace(
        "'", ""
    )
    ip = f"{rng.randint(24, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    token = "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(10))
    url = (
        f"{V.HOSPITAL_PORTAL}/share/{token}"
        if rng.random() < 0.5
        else f"https://www.{(given + family).lower().replace(chr(39), '')}.net/blog"
    )
    relation = rng.choice(V.RELATIONS if age >= 18 else V.CHILD_RELATIONS)
    return Person(
        idx=idx,
        id=new_id(rng),
        mrn=_mrn(seed, idx),
        ssn=ssn,
        given=given,
        middle=middle,
        family=family,
        gender=gender,
        birth_date=birth,
        age=age,
        city=city,
        street=street,
        zip=zip_code,
        phone=phone,
        email=email,
        consent=rng.random() < 0.7,
        relative_given=rng.choice(
            V.FEMALE_FIRST if relation in V.FEMALE_RELATIONS else V.MALE_FIRST
        ),
        relative_relation=relation,
        relative_phone=_phone(rng, city.area),
        ip=ip,
        url=url,
    )


def _age(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _phone(rng: Random, area: str) -> str:
    return f"{area}-{rng.randint(201, 989)}-{rng.randint(0, 9999):04d}"


def patient_resource(p: Person) -> JsonDict:
    """The FHIR Patient."""
    given = [p.given, p.middle] if p.middle != p.given else [p.given]
    return {
        "resourceType": "Patient",
        "id": p.id,
        "extension": [{"url": V.CONSENT_EXT_URL, "valueBoolean": p.consent}],
        "identifier": [
            {
                "use": "usual",
                "type": _cc(V.V2_0203, "MR", "Medical record number"),
                "system": V.MRN_SYSTEM,
                "value": p.mrn,
            },
            {
                "type": _cc(V.V2_0203, "SS", "Social Security number"),
                "system": V.SSN_SYSTEM,
                "value": p.ssn,
            },
        ],
        "active": True,
        "name": [{"use": "official", "family": p.family, "given": given}],
        "telecom": [
            {"system": "phone", "value": p.phone, "use": "mobile"},
            {"system": "email", "value": p.email, "use": "home"},
        ],
        "gender": p.gender,
        "birthDate": p.birth_date.isoformat(),
        "address": [
            {
                "use": "home",
                "line": [p.street],
                "city": p.city.name,
                "state": p.city.state,
                "postalCode": p.zip,
                "country": "US",
            }
        ],
    }


def _baseline(rng: Random, p: Person) -> dict[str, float]:
    if p.age < 1:
        weight, height = rng.uniform(3.2, 10.0), rng.uniform(50, 75)
    elif p.age < 18:
        weight = 9 + p.age * rng.uniform(2.8, 4.2)
        height = min(80 + p.age * 6.0 + rng.uniform(-6, 6), 185)
    else:
        male = p.gender == "male"
        height = rng.gauss(176 if male else 162, 7)
        weight = max(42.0, rng.gauss(86 if male else 74, 16))
    return {
        "hr": rng.uniform(62, 92) + (20 if p.age < 10 else 0),
        "rr": rng.uniform(13, 19) + (8 if p.age < 6 else 0),
        "sys": rng.uniform(108, 150) if p.age >= 18 else rng.uniform(90, 115),
        "dia": rng.uniform(64, 90) if p.age >= 18 else rng.uniform(52, 72),
        "spo2": rng.uniform(94, 99),
        "temp": rng.uniform(36.4, 37.1),
        "weight": weight,
        "height": height,
        "glucose": rng.uniform(80, 170),
        "creat": rng.uniform(0.6, 1.6) if p.age >= 18 else rng.uniform(0.2, 0.7),
    }


class PatientBuilder:
    """Builds one patient's resources given a reference style."""

    def __init__(self, seed: int, hosp: Hospital, ref_dt: datetime, ids: Identifiers) -> None:
        self.seed = seed
        self.hosp = hosp
        self.ref_dt = ref_dt
        self.ids = ids

    def build(self, idx: int, ref: RefFn) -> PatientOutput:
        """Generate patient ``idx``; internal references rendered by ``ref``."""
        rng = Random(f"{self.seed}:patient:{idx}")
        p = make_person(self.seed, idx, rng, self.ref_dt)
        ids = self.ids
        ids.names[p.full_name] = None
        ids.mrns[p.mrn] = None
        ids.phones[p.phone] = None
        ids.ssns[p.ssn] = None
        ids.emails[p.email] = None
        ids.addresses[p.street] = None
        ids.birth_dates[p.birth_date.isoformat()] = None
        out = PatientOutput(person=p)
        res = out.resources
        res.append(patient_resource(p))
        subj = {"reference": ref("Patient", p.id), "display": p.full_name}
        base = _baseline(rng, p)

        encs = self._encounters(rng, p, idx)
        for e in encs:
            res.append(self._encounter_resource(e, subj))

        # Monitoring (about 30% of patients, always needs an inpatient stay).
        inpatient = [e for e in encs if e.cls == "IMP"]
        monitored: Encounter | None = None
        if inpatient and (idx == 2 or rng.random() < 0.52):
            monitored = inpatient[rng.randrange(len(inpatient))]
            out.monitor, dev = self._monitor(rng, p, monitored, subj, ref, base)
            res.append(dev)

        # Observations per encounter.
        first_vitals: dict[str, dict[str, float]] = {}
        for e in encs:
            first_vitals[e.id] = self._observations(rng, p, e, subj, ref, base, res)

        # Conditions, procedures, medications, allergies.
        n_cond = rng.randint(1, 4)
        conds = rng.sample(V.CONDITIONS, n_cond)
        for code, display in conds:
            e = rng.choice(encs)
            res.append(
                {
                    "resourceType": "Condition",
                    "id": new_id(rng),
                    "clinicalStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        *(("active", "Active") if rng.random() < 0.8 else ("resolved", "Resolved")),
                    ),
                    "verificationStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "confirmed",
                        "Confirmed",
                    ),
                    "category": [
                        _cc(
                            "http://terminology.hl7.org/CodeSystem/condition-category",
                            "encounter-diagnosis",
                            "Encounter Diagnosis",
                        )
                    ],
                    "code": _cc(V.SNOMED, code, display),
                    "subject": subj,
                    "encounter": {"reference": ref("Encounter", e.id)},
                    "onsetDateTime": fhir_dt(e.start - timedelta(days=rng.randint(0, 900))),
                    "recordedDate": fhir_dt(e.start + timedelta(minutes=rng.randint(5, 25))),
                }
            )
        for _ in range(rng.choices((0, 1, 2, 3), weights=(30, 40, 20, 10))[0]):
            e = rng.choice(encs)
            code, display = rng.choice(V.PROCEDURES)
            when = e.start + (e.end - e.start) * rng.uniform(0.1, 0.9)
            res.append(
                {
                    "resourceType": "Procedure",
                    "id": new_id(rng),
                    "status": "completed",
                    "code": _cc(V.SNOMED, code, display),
                    "subject": subj,
                    "encounter": {"reference": ref("Encounter", e.id)},
                    "performedDateTime": fhir_dt(when),
                    "location": {"reference": f"Location/{e.bed.id}", "display": e.bed.name},
                }
            )
        for _ in range(rng.randint(1, 5)):
            e = rng.choice(encs)
            code, display, short, dose, unit, freq = rng.choice(V.MEDICATIONS)
            doc = rng.choice(self.hosp.clinicians)
            res.append(
                {
                    "resourceType": "MedicationRequest",
                    "id": new_id(rng),
                    "status": "active" if e is encs[-1] else "completed",
                    "intent": "order",
                    "medicationCodeableConcept": _cc(V.RXNORM, code, display),
                    "subject": subj,
                    "encounter": {"reference": ref("Encounter", e.id)},
                    "authoredOn": fhir_dt(e.start + timedelta(minutes=rng.randint(10, 50))),
                    "requester": {"display": f"{doc.full_name}, {doc.credential}"},
                    "dosageInstruction": [
                        {
                            "text": f"{short} {dose:g} {unit} by mouth {freq}",
                            "doseAndRate": [
                                {
                                    "doseQuantity": {
                                        "value": dose,
                                        "unit": unit,
                                        "system": V.UCUM,
                                        "code": unit,
                                    }
                                }
                            ],
                        }
                    ],
                }
            )
        for code, display, cat in rng.sample(
            V.ALLERGIES, rng.choices((0, 1, 2), weights=(55, 35, 10))[0]
        ):
            rcode, rdisplay = rng.choice(V.REACTIONS)
            res.append(
                {
                    "resourceType": "AllergyIntolerance",
                    "id": new_id(rng),
                    "clinicalStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                        "active",
                        "Active",
                    ),
                    "verificationStatus": _cc(
                        "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                        "confirmed",
                        "Confirmed",
                    ),
                    "type": "allergy",
                    "category": [cat],
                    "criticality": "high" if rcode == "39579001" else "low",
                    "code": _cc(V.SNOMED, code, display),
                    "patient": subj,
                    "recordedDate": fhir_dt(encs[0].start + timedelta(minutes=15)),
                    "reaction": [
                        {
                            "manifestation": [_cc(V.SNOMED, rcode, rdisplay)],
                            "severity": "severe" if rcode == "39579001" else "mild",
                        }
                    ],
                }
            )

        # Imaging studies (~0.5 per patient).
        n_studies = rng.choices((0, 1, 2), weights=(56, 36, 8))[0]
        if idx == 1:
            n_studies = max(n_studies, 1)
        for _ in range(n_studies):
            e = rng.choice(encs)
            study = self._study(rng, e)
            out.studies.append(study)
            res.append(self._imaging_resource(study, p, subj, ref))

        # Notes: one per encounter.
        cond_names = [d for _, d in conds]
        for e in encs:
            out.notes.append(self._note(rng, p, e, first_vitals[e.id], cond_names, out, monitored))
            res.append(self._docref(out.notes[-1], e, subj, ref))
        return out

    # -- pieces -------------------------------------------------------------------------

    def _encounters(self, rng: Random, p: Person, idx: int) -> list[Encounter]:
        n = rng.choices((1, 2, 3, 4, 5), weights=(10, 25, 30, 20, 15))[0]
        classes = [
            rng.choices(V.ENCOUNTER_CLASSES, weights=[w for *_, w in V.ENCOUNTER_CLASSES])[0]
            for _ in range(n)
        ]
        if idx == 2 and not any(c[0] == "IMP" for c in classes):
            classes[-1] = V.ENCOUNTER_CLASSES[2]
        birth_dt = datetime.combine(p.birth_date, datetime.min.time())
        lo = max(self.ref_dt - timedelta(days=730), birth_dt + timedelta(days=1))
        hi = self.ref_dt - timedelta(days=10)
        span_min = max(int((hi - lo).total_seconds() // 60), 60)
        starts = sorted(lo + timedelta(minutes=rng.randrange(span_min)) for _ in range(n))
        encs: list[Encounter] = []
        for (code, display, _), start in zip(classes, starts, strict=True):
            if code == "AMB":
                start = start.replace(hour=rng.randint(8, 16))
                end = start + timedelta(minutes=rng.randint(30, 120))
                bed = rng.choice(self.hosp.beds["clinic"])
            elif code == "EMER":
                end = start + timedelta(minutes=rng.randint(120, 600))
                bed = rng.choice(self.hosp.beds["ed"])
            else:
                end = start + timedelta(minutes=rng.randint(24 * 60, 8 * 24 * 60))
                unit = rng.choices(("icu", "ward-a", "ward-b"), weights=(30, 40, 30))[0]
                bed = rng.choice(self.hosp.beds[unit])
            encs.append(Encounter(new_id(rng), code, display, start, end, bed))
        return encs

    def _encounter_resource(self, e: Encounter, subj: JsonDict) -> JsonDict:
        etype = {
            "AMB": ("185349003", "Encounter for check up"),
            "EMER": ("50849002", "Emergency room admission"),
            "IMP": ("32485007", "Hospital admission"),
        }[e.cls]
        return {
            "resourceType": "Encounter",
            "id": e.id,
            "status": "finished",
            "class": {"system": V.ACT_CODE, "code": e.cls, "display": e.cls_display},
            "type": [_cc(V.SNOMED, *etype)],
            "subject": subj,
            "period": {"start": fhir_dt(e.start), "end": fhir_dt(e.end)},
            "location": [
                {
                    "location": {"reference": f"Location/{e.bed.id}", "display": e.bed.name},
                    "status": "completed",
                    "period": {"start": fhir_dt(e.start), "end": fhir_dt(e.end)},
                }
            ],
        }

    def _monitor(
        self,
        rng: Random,
        p: Person,
        e: Encounter,
        subj: JsonDict,
        ref: RefFn,
        base: dict[str, float],
    ) -> tuple[MonitorPlan, JsonDict]:
        maker, model, name, prefix = rng.choice(V.MONITOR_MODELS)
        serial = f"{prefix}{rng.randint(10_000_000, 99_999_999)}"
        dev_id = new_id(rng)
        minutes = rng.randint(120, 300)
        start = e.start + timedelta(minutes=rng.randint(20, 600))
        gap = None
        if rng.random() < 0.5:
            gap = (rng.randint(10, minutes - 30), rng.randint(6, 20))
        plan = MonitorPlan(dev_id, serial, start, minutes, gap, base)
        dev = {
            "resourceType": "Device",
            "id": dev_id,
            "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.8", "value": serial}],
            "status": "active",
            "manufacturer": maker,
            "serialNumber": serial,
            "deviceName": [{"name": name, "type": "model-name"}],
            "modelNumber": model,
            "type": _cc(V.SNOMED, "706172005", "Physiologic monitoring system"),
            "patient": {"reference": ref("Patient", p.id)},
            "location": {"reference": f"Location/{e.bed.id}", "display": e.bed.name},
        }
        return plan, dev

    def _observations(
        self,
        rng: Random,
        p: Person,
        e: Encounter,
        subj: JsonDict,
        ref: RefFn,
        base: dict[str, float],
        res: list[JsonDict],
    ) -> dict[str, float]:
        enc_ref = {"reference": ref("Encounter", e.id)}
        if e.cls == "AMB":
            times = [e.start + timedelta(minutes=rng.randint(5, 25))]
            labs = [e.start + timedelta(minutes=30)] if rng.random() < 0.5 else []
        elif e.cls == "EMER":
            times = [e.start + timedelta(minutes=10), e.start + timedelta(minutes=110)]
            labs = [e.start + timedelta(minutes=40)]
        else:
            los_h = int((e.end - e.start).total_seconds() // 3600)
            n = min(max(2, los_h // 12), 6)
            times = [
                e.start + timedelta(hours=12 * k, minutes=rng.randint(0, 50)) for k in range(n)
            ]
            labs = [e.start + timedelta(hours=24 * k + 6) for k in range(min(3, n // 2 + 1))]
        sick = 1.0 if e.cls == "AMB" else 1.6
        first: dict[str, float] = {}
        for k, t in enumerate(times):
            v = {
                "hr": base["hr"] + rng.gauss(0, 6) * sick + (8 if e.cls != "AMB" else 0),
                "rr": base["rr"] + rng.gauss(0, 1.5) * sick,
                "sys": base["sys"] + rng.gauss(0, 9) * sick,
                "dia": min(base["dia"] + rng.gauss(0, 6) * sick, base["sys"] - 30),
                "spo2": min(100.0, base["spo2"] - abs(rng.gauss(0, 1.2)) * sick),
                "temp": base["temp"] + abs(rng.gauss(0, 0.3)) * sick,
                "weight": base["weight"] * rng.uniform(0.99, 1.01),
                "height": base["height"],
                "glucose": base["glucose"] * rng.uniform(0.85, 1.25),
                "creat": base["creat"] * rng.uniform(0.9, 1.3),
            }
            if k == 0:
                first = v
            eff = fhir_dt(t)
            if k == 0:
                res.append(self._weight(rng, v["weight"], subj, enc_ref, eff))
                if rng.random() < 0.5:
                    res.append(self._height(rng, v["height"], subj, enc_ref, eff))
            res.append(self._temp(rng, v["temp"], subj, enc_ref, eff))
            res.append(
                _qty_obs(rng, V.HR, round(v["hr"]), "/min", "beats/minute", subj, enc_ref, eff)
            )
            res.append(
                _qty_obs(rng, V.RR, round(v["rr"]), "/min", "breaths/minute", subj, enc_ref, eff)
            )
            spo2 = _qty_obs(rng, V.SPO2, round(v["spo2"]), "%", "%", subj, enc_ref, eff)
            if rng.random() < 0.3:
                spo2["code"]["coding"].insert(
                    0, {"system": V.LOINC, "code": V.SPO2_ALT.code, "display": V.SPO2_ALT.display}
                )
            res.append(spo2)
            res.append(_bp_obs(rng, round(v["sys"]), round(v["dia"]), subj, enc_ref, eff))
        for t in labs:
            eff = fhir_dt(t)
            g = base["glucose"] * rng.uniform(0.8, 1.3)
            if rng.random() < 0.15:
                res.append(
                    _qty_obs(
                        rng, V.GLUCOSE, round(g / 18.016, 1), "mmol/L", "mmol/L", subj, enc_ref, eff
                    )
                )
            else:
                res.append(_qty_obs(rng, V.GLUCOSE, round(g), "mg/dL", "mg/dL", subj, enc_ref, eff))
            res.append(
                _qty_obs(
                    rng,
                    V.CREAT,
                    round(base["creat"] * rng.uniform(0.9, 1.4), 2),
                    "mg/dL",
                    "mg/dL",
                    subj,
                    enc_ref,
                    eff,
                )
            )
        return first

    def _weight(self, rng: Random, kg: float, subj: JsonDict, enc: JsonDict, eff: str) -> JsonDict:
        r = rng.random()
        if r < 0.15:
            return _qty_obs(rng, V.WEIGHT, round(kg * 2.20462, 1), "[lb_av]", "lb", subj, enc, eff)
        if r < 0.2:
            return _qty_obs(rng, V.WEIGHT, round(kg * 1000), "g", "g", subj, enc, eff)
        return _qty_obs(rng, V.WEIGHT, round(kg, 1), "kg", "kg", subj, enc, eff)

    def _height(self, rng: Random, cm: float, subj: JsonDict, enc: JsonDict, eff: str) -> JsonDict:
        if rng.random() < 0.15:
            return _qty_obs(rng, V.HEIGHT, round(cm / 2.54, 1), "[in_i]", "in", subj, enc, eff)
        return _qty_obs(rng, V.HEIGHT, round(cm, 1), "cm", "cm", subj, enc, eff)

    def _temp(self, rng: Random, c: float, subj: JsonDict, enc: JsonDict, eff: str) -> JsonDict:
        if rng.random() < 0.15:
            return _qty_obs(rng, V.TEMP, round(c * 9 / 5 + 32, 1), "[degF]", "degF", subj, enc, eff)
        return _qty_obs(rng, V.TEMP, round(c, 1), "Cel", "C", subj, enc, eff)

    def _study(self, rng: Random, e: Encounter) -> StudyPlan:
        modality = rng.choices(
            [m for m, _ in V.MODALITY_WEIGHTS], weights=[w for _, w in V.MODALITY_WEIGHTS]
        )[0]
        part, part_code, desc, series_desc = rng.choice(V.BODY_PARTS[modality])
        span = max(int((e.end - e.start).total_seconds() // 60) - 45, 5)
        started = e.start + timedelta(minutes=rng.randrange(5, span + 5))
        started = started.replace(second=rng.randint(0, 59))
        n_series = rng.randint(1, 3)
        max_inst = 4 if modality in ("CT", "MR") else 2
        series: list[SeriesPlan] = []
        t = started
        for s in range(n_series):
            n_inst = rng.randint(1, max_inst)
            series.append(
                SeriesPlan(
                    new_uid(rng), s + 1, series_desc[s], t, [new_uid(rng) for _ in range(n_inst)]
                )
            )
            t += timedelta(minutes=rng.randint(2, 8), seconds=rng.randint(0, 59))
        return StudyPlan(
            id=new_id(rng),
            uid=new_uid(rng),
            accession=self.hosp.next_accession(),
            modality=modality,
            body_part=part,
            body_code=part_code,
            description=desc,
            started=started,
            encounter_id=e.id,
            scanner=self.hosp.scanner_for(modality),
            referring=rng.choice(self.hosp.clinicians),
            series=series,
            frame_of_reference=new_uid(rng),
            comment_has_name=rng.random() < 0.25,
        )

    def _imaging_resource(self, s: StudyPlan, p: Person, subj: JsonDict, ref: RefFn) -> JsonDict:
        mod = {"system": V.DICOM_DCM, "code": s.modality, "display": V.MODALITY_DISPLAY[s.modality]}
        return {
            "resourceType": "ImagingStudy",
            "id": s.id,
            "identifier": [
                {"system": "urn:dicom:uid", "value": f"urn:oid:{s.uid}"},
                {
                    "type": _cc(V.V2_0203, "ACSN", "Accession ID"),
                    "system": V.ACCESSION_SYSTEM,
                    "value": s.accession,
                },
            ],
            "status": "available",
            "modality": [mod],
            "subject": subj,
            "encounter": {"reference": ref("Encounter", s.encounter_id)},
            "started": fhir_dt(s.started),
            "referrer": {"display": s.referring.full_name},
            "numberOfSeries": len(s.series),
            "numberOfInstances": sum(len(se.instances) for se in s.series),
            "procedureCode": [{"text": s.description}],
            "location": {
                "reference": f"Location/{s.scanner.room.id}",
                "display": s.scanner.room.name,
            },
            "description": s.description,
            "series": [
                {
                    "uid": se.uid,
                    "number": se.number,
                    "modality": mod,
                    "description": se.description,
                    "numberOfInstances": len(se.instances),
                    "bodySite": {
                        "system": V.SNOMED,
                        "code": s.body_code,
                        "display": s.body_part.title(),
                    },
                    "started": fhir_dt(se.started),
                    "performer": [{"actor": {"reference": f"Device/{s.scanner.id}"}}],
                    "instance": [
                        {
                            "uid": uid,
                            "sopClass": {
                                "system": "urn:ietf:rfc:3986",
                                "code": f"urn:oid:{V.SOP_CLASS[s.modality]}",
                            },
                            "number": i + 1,
                        }
                        for i, uid in enumerate(se.instances)
                    ],
                }
                for se in s.series
            ],
        }

    def _note(
        self,
        rng: Random,
        p: Person,
        e: Encounter,
        vitals: dict[str, float],
        conds: list[str],
        out: PatientOutput,
        monitored: Encounter | None,
    ) -> NoteOut:
        title = V.NOTE_TYPES[e.cls][1]
        study = next((s for s in out.studies if s.encounter_id == e.id), None)
        attending, consultant = rng.sample(self.hosp.clinicians, 2)
        ctx = NoteContext(
            person=p,
            title=title,
            enc_class=e.cls,
            start=e.start,
            end=e.end,
            unit_name=e.bed.name,
            attending=attending,
            consultant=consultant,
            conditions=conds,
            vitals=vitals,
            accession=study.accession if study else None,
            study_desc=study.description if study else None,
            study_date=study.started.date() if study else None,
            scanner_serial=study.scanner.serial if study else None,
            monitor_serial=out.monitor.serial if out.monitor and monitored is e else None,
        )
        text, spans = build_note(rng, ctx, self.ids)
        return NoteOut(new_id(rng), p.id, text, spans)

    def _docref(self, n: NoteOut, e: Encounter, subj: JsonDict, ref: RefFn) -> JsonDict:
        code, display = V.NOTE_TYPES[e.cls]
        return {
            "resourceType": "DocumentReference",
            "id": n.id,
            "status": "current",
            "docStatus": "final",
            "type": _cc(V.LOINC, code, display),
            "category": [
                _cc(
                    "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                    "clinical-note",
                    "Clinical Note",
                )
            ],
            "subject": subj,
            "date": fhir_dt(e.end),
            "author": [{"display": _author_of(n.text)}],
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "language": "en-US",
                        "data": base64.b64encode(n.text.encode("utf-8")).decode("ascii"),
                        "title": display,
                        "creation": fhir_dt(e.end),
                    }
                }
            ],
            "context": {
                "encounter": [{"reference": ref("Encounter", e.id)}],
                "period": {"start": fhir_dt(e.start), "end": fhir_dt(e.end)},
            },
        }


def _author_of(text: str) -> str:
    line = text.split("\nAttending: Dr. ", 1)[1].split("\n", 1)[0]
    return line


def _qty_obs(
    rng: Random,
    spec: V.VitalSpec,
    value: float,
    unit_code: str,
    unit_display: str,
    subj: JsonDict,
    enc: JsonDict,
    eff: str,
) -> JsonDict:
    return {
        "resourceType": "Observation",
        "id": new_id(rng),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": V.OBS_CATEGORY,
                        "code": spec.category,
                        "display": "Vital Signs"
                        if spec.category == "vital-signs"
                        else "Laboratory",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": V.LOINC, "code": spec.code, "display": spec.display}],
            "text": spec.display,
        },
        "subject": subj,
        "encounter": enc,
        "effectiveDateTime": eff,
        "valueQuantity": {
            "value": value,
            "unit": unit_display,
            "system": V.UCUM,
            "code": unit_code,
        },
    }


def _bp_obs(rng: Random, sys: int, dia: int, subj: JsonDict, enc: JsonDict, eff: str) -> JsonDict:
    def comp(spec: V.VitalSpec, value: int) -> JsonDict:
        return {
            "code": {"coding": [{"system": V.LOINC, "code": spec.code, "display": spec.display}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": V.UCUM, "code": "mm[Hg]"},
        }

    return {
        "resourceType": "Observation",
        "id": new_id(rng),
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": V.OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": V.LOINC, "code": V.BP.code, "display": V.BP.display}],
            "text": "Blood pressure",
        },
        "subject": subj,
        "encounter": enc,
        "effectiveDateTime": eff,
        "component": [comp(V.SYS, sys), comp(V.DIA, dia)],
    }
