"""Static vocabularies for the sample-hospital generator (names, places, clinical codes)."""

from __future__ import annotations

from typing import Final, NamedTuple

GENERATOR_VERSION: Final = "1.0.0"

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM: Final = "http://unitsofmeasure.org"
MRN_SYSTEM: Final = "urn:oid:2.16.840.1.113883.19.5"
SSN_SYSTEM: Final = "http://hl7.org/fhir/sid/us-ssn"
ACCESSION_SYSTEM: Final = "urn:oid:2.16.840.1.113883.19.5.2"
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
OBS_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
CONSENT_EXT_URL: Final = "http://twin-pipeline.org/fhir/StructureDefinition/research-consent"
DICOM_DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
LOCATION_PHYSICAL_TYPE: Final = "http://terminology.hl7.org/CodeSystem/location-physical-type"
UID_ROOT: Final = "2.25."

HOSPITAL_NAME: Final = "Lakeside Regional Medical Center"
HOSPITAL_PORTAL: Final = "https://portal.lakeside-regional.org"
TZ_OFFSET: Final = "-05:00"

MALE_FIRST: Final = (
    "James",
    "Robert",
    "John",
    "Michael",
    "David",
    "William",
    "Richard",
    "Joseph",
    "Thomas",
    "Charles",
    "Christopher",
    "Daniel",
    "Matthew",
    "Anthony",
    "Donald",
    "Steven",
    "Paul",
    "Andrew",
    "Joshua",
    "Kenneth",
    "Kevin",
    "Brian",
    "George",
    "Timothy",
    "Ronald",
    "Edward",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Nicholas",
    "Eric",
    "Jonathan",
    "Stephen",
    "Larry",
    "Justin",
    "Scott",
    "Brandon",
    "Benjamin",
    "Samuel",
    "Gregory",
    "Alexander",
    "Patrick",
    "Raymond",
    "Dennis",
    "Jerry",
    "Tyler",
    "Aaron",
    "Jose",
    "Adam",
    "Nathan",
    "Henry",
    "Douglas",
    "Zachary",
    "Peter",
    "Kyle",
    "Ethan",
    "Walter",
    "Noah",
    "Jeremy",
    "Harold",
    "Carl",
    "Arthur",
    "Gerald",
    "Roger",
    "Keith",
    "Lawrence",
    "Terry",
    "Sean",
    "Albert",
    "Joe",
    "Jesse",
    "Austin",
    "Bryan",
    "Luis",
    "Carlos",
    "Wei",
    "Rajesh",
    "Hiroshi",
)
FEMALE_FIRST: Final = (
    "Mary",
    "Patricia",
    "Jennifer",
    "Linda",
    "Elizabeth",
    "Barbara",
    "Susan",
    "Jessica",
    "Sarah",
    "Karen",
    "Lisa",
    "Nancy",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Kimberly",
    "Emily",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Dorothy",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Sharon",
    "Laura",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Angela",
    "Shirley",
    "Anna",
    "Brenda",
    "Pamela",
    "Emma",
    "Nicole",
    "Helen",
    "Samantha",
    "Katherine",
    "Christine",
    "Debra",
    "Rachel",
    "Carolyn",
    "Janet",
    "Catherine",
    "Maria",
    "Heather",
    "Diane",
    "Julie",
    "Joyce",
    "Victoria",
    "Kelly",
    "Christina",
    "Lauren",
    "Joan",
    "Evelyn",
    "Olivia",
    "Judith",
    "Megan",
    "Cheryl",
    "Martha",
    "Andrea",
    "Frances",
    "Hannah",
    "Jacqueline",
    "Ann",
    "Gloria",
    "Teresa",
    "Kathryn",
    "Sara",
    "Janice",
    "Priya",
    "Mei",
    "Yuki",
    "Fatima",
    "Lucia",
    "Ingrid",
)
FAMILY: Final = (
    "Smith",
    "Johnson",
    "Williams",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Allen",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Adams",
    "Nelson",
    "Baker",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Gomez",
    "Phillips",
    "Evans",
    "Turner",
    "Diaz",
    "Parker",
    "Cruz",
    "Edwards",
    "Collins",
    "Reyes",
    "Stewart",
    "Morris",
    "Morales",
    "Murphy",
    "Cook",
    "Rogers",
    "Gutierrez",
    "Ortiz",
    "Morgan",
    "Cooper",
    "Peterson",
    "Kim",
    "Ramos",
    "Howard",
    "Ward",
    "Richardson",
    "Watson",
    "Brooks",
    "Chavez",
    "Bennett",
    "Mendoza",
    "Ruiz",
    "Hughes",
    "Alvarez",
    "Castillo",
    "Sanders",
    "Patel",
    "Myers",
    "Ross",
    "Foster",
    "Jimenez",
    "Powell",
    "Jenkins",
    "Perry",
    "Russell",
    "Sullivan",
    "Fisher",
    "Henderson",
    "Coleman",
    "Simmons",
    "Patterson",
    "Jordan",
    "Reynolds",
    "Hamilton",
    "Graham",
    "Wallace",
    "Gonzales",
    "Cole",
    "West",
    "Owens",
    "Kennedy",
    "Wells",
    "Alexander",
    "Tran",
    "Chen",
    "Wang",
    "Nakamura",
    "Kowalski",
    "Novak",
    "Schmidt",
    "Becker",
    "Fitzgerald",
    "O'Brien",
    "McCarthy",
    "Donovan",
    "Gallagher",
    "Rossi",
    "Romano",
    "Haddad",
    "Okafor",
    "Mensah",
    "Singh",
    "Sharma",
    "Yamamoto",
    "Larsen",
    "Lindqvist",
    "Dubois",
    "Moreau",
    "Petrov",
    "Ivanova",
    "Kaur",
    "Abernathy",
    "Whitfield",
)


class City(NamedTuple):
    """A city with state, 3-digit ZIP prefix and telephone area code."""

    name: str
    state: str
    zip3: str
    area: str


CITIES: Final = (
    City("Worcester", "MA", "016", "508"),
    City("Springfield", "MA", "011", "413"),
    City("Lowell", "MA", "018", "978"),
    City("Cambridge", "MA", "021", "617"),
    City("Quincy", "MA", "021", "617"),
    City("Newton", "MA", "024", "617"),
    City("Framingham", "MA", "017", "508"),
    City("Providence", "RI", "029", "401"),
    City("Nashua", "NH", "030", "603"),
    City("Hartford", "CT", "061", "860"),
    City("Brockton", "MA", "023", "508"),
    City("Lynn", "MA", "019", "781"),
    City("Waltham", "MA", "024", "781"),
    City("Fitchburg", "MA", "014", "978"),
    City("Pawtucket", "RI", "028", "401"),
    City("Manchester", "NH", "031", "603"),
)
STREETS: Final = (
    "Maple",
    "Oak",
    "Elm",
    "Cedar",
    "Pine",
    "Walnut",
    "Chestnut",
    "Highland",
    "Washington",
    "Lincoln",
    "Franklin",
    "Prospect",
    "Pleasant",
    "Union",
    "Central",
    "Hillside",
    "Orchard",
    "Beacon",
    "Harvard",
    "Linden",
    "Sycamore",
    "Riverside",
    "Forest",
    "Spruce",
    "Magnolia",
)
STREET_SUFFIX: Final = ("St", "Ave", "Rd", "Ln", "Dr", "Ct", "Way", "Blvd", "Terrace")
EMAIL_DOMAINS: Final = ("gmail.com", "yahoo.com", "outlook.com", "icloud.com", "comcast.net")
RELATIONS: Final = ("daughter", "son", "wife", "husband", "sister", "brother", "niece")
CHILD_RELATIONS: Final = ("mother", "father", "grandmother", "aunt")
FEMALE_RELATIONS: Final = frozenset(
    ("daughter", "wife", "sister", "niece", "mother", "grandmother", "aunt")
)


class VitalSpec(NamedTuple):
    """A LOINC observation with its canonical UCUM unit and category."""

    code: str
    display: str
    unit: str
    unit_display: str
    category: str


WEIGHT = VitalSpec("29463-7", "Body weight", "kg", "kg", "vital-signs")
HEIGHT = VitalSpec("8302-2", "Body height", "cm", "cm", "vital-signs")
TEMP = VitalSpec("8310-5", "Body temperature", "Cel", "C", "vital-signs")
HR = VitalSpec("8867-4", "Heart rate", "/min", "beats/minute", "vital-signs")
RR = VitalSpec("9279-1", "Respiratory rate", "/min", "breaths/minute", "vital-signs")
SPO2 = VitalSpec(
    "59408-5",
    "Oxygen saturation in Arterial blood by Pulse oximetry",
    "%",
    "%",
    "vital-signs",
)
SPO2_ALT = VitalSpec("2708-6", "Oxygen saturation in Arterial blood", "%", "%", "vital-signs")
BP = VitalSpec("85354-9", "Blood pressure panel with all children optional", "", "", "vital-signs")
SYS = VitalSpec("8480-6", "Systolic blood pressure", "mm[Hg]", "mmHg", "vital-signs")
DIA = VitalSpec("8462-4", "Diastolic blood pressure", "mm[Hg]", "mmHg", "vital-signs")
GLUCOSE = VitalSpec("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", "mg/dL", "laboratory")
CREAT = VitalSpec(
    "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "mg/dL", "laboratory"
)

#: LOINC codes the pipeline's vocabulary knows (for dirty-record checks).
KNOWN_LOINC: Final = frozenset(
    v.code for v in (WEIGHT, HEIGHT, TEMP, HR, RR, SPO2, SPO2_ALT, BP, SYS, DIA, GLUCOSE, CREAT)
)
#: Unknown LOINC-looking codes used for ``unknown_code`` defects.
UNKNOWN_LOINC: Final = ("99999-9", "12345-0", "00000-0")

CONDITIONS: Final = (
    ("38341003", "Hypertensive disorder, systemic arterial"),
    ("44054006", "Diabetes mellitus type 2"),
    ("42343007", "Congestive heart failure"),
    ("13645005", "Chronic obstructive lung disease"),
    ("233604007", "Pneumonia"),
    ("14669001", "Acute renal failure syndrome"),
    ("91302008", "Sepsis"),
    ("49436004", "Atrial fibrillation"),
    ("195967001", "Asthma"),
    ("709044004", "Chronic kidney disease"),
    ("55822004", "Hyperlipidemia"),
    ("68566005", "Urinary tract infectious disease"),
    ("22298006", "Myocardial infarction"),
    ("230690007", "Cerebrovascular accident"),
)
PROCEDURES: Final = (
    ("40701008", "Echocardiography"),
    ("73761001", "Colonoscopy"),
    ("80146002", "Appendectomy"),
    ("232717009", "Coronary artery bypass grafting"),
    ("112798008", "Insertion of endotracheal tube"),
    ("29303009", "Electrocardiographic procedure"),
    ("415070008", "Percutaneous coronary intervention"),
    ("18629005", "Administration of drug or medicament"),
    ("302497006", "Hemodialysis"),
    ("40617009", "Artificial respiration"),
)
MEDICATIONS: Final = (
    ("314076", "lisinopril 10 MG Oral Tablet", "lisinopril", 10.0, "mg", "once daily"),
    (
        "860975",
        "metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "metformin",
        500.0,
        "mg",
        "twice daily",
    ),
    ("197361", "amlodipine 5 MG Oral Tablet", "amlodipine", 5.0, "mg", "once daily"),
    ("866924", "metoprolol tartrate 25 MG Oral Tablet", "metoprolol", 25.0, "mg", "twice daily"),
    ("617314", "atorvastatin 10 MG Oral Tablet", "atorvastatin", 10.0, "mg", "at bedtime"),
    ("310965", "ibuprofen 200 MG Oral Tablet", "ibuprofen", 200.0, "mg", "every 6 hours"),
    (
        "313782",
        "acetaminophen 325 MG Oral Tablet",
        "acetaminophen",
        650.0,
        "mg",
        "every 6 hours as needed",
    ),
    ("308182", "amoxicillin 250 MG Oral Capsule", "amoxicillin", 500.0, "mg", "every 8 hours"),
    ("855332", "warfarin sodium 5 MG Oral Tablet", "warfarin", 5.0, "mg", "once daily"),
    ("312961", "simvastatin 20 MG Oral Tablet", "simvastatin", 20.0, "mg", "at bedtime"),
    (
        "310798",
        "hydrochlorothiazide 25 MG Oral Tablet",
        "hydrochlorothiazide",
        25.0,
        "mg",
        "once daily",
    ),
    ("310429", "furosemide 20 MG Oral Tablet", "furosemide", 20.0, "mg", "twice daily"),
)
ALLERGIES: Final = (
    ("91936005", "Allergy to penicillin", "medication"),
    ("91935009", "Allergy to peanut", "food"),
    ("300916003", "Latex allergy", "environment"),
    ("294505008", "Allergy to sulfonamide", "medication"),
    ("418689008", "Allergy to grass pollen", "environment"),
    ("91930004", "Allergy to eggs", "food"),
)
REACTIONS: Final = (
    ("247472004", "Hives"),
    ("271807003", "Eruption of skin"),
    ("39579001", "Anaphylaxis"),
    ("267036007", "Dyspnea"),
)

# (class code, display, weight)
ENCOUNTER_CLASSES: Final = (
    ("AMB", "ambulatory", 50),
    ("EMER", "emergency", 25),
    ("IMP", "inpatient encounter", 25),
)

# care unit key -> (name, physical type of beds, bed count, bed label)
CARE_UNITS: Final = (
    ("icu", "Intensive Care Unit", 12, "Bed"),
    ("ward-a", "Ward A (Medical)", 20, "Bed"),
    ("ward-b", "Ward B (Surgical)", 20, "Bed"),
    ("ed", "Emergency Department", 10, "Bay"),
    ("radiology", "Radiology", 4, "Room"),
    ("clinic", "Outpatient Clinic", 8, "Exam Room"),
)


class Scanner(NamedTuple):
    """An imaging device."""

    key: str
    modalities: tuple[str, ...]
    manufacturer: str
    model: str
    station: str
    serial_prefix: str


SCANNERS: Final = (
    Scanner("ct1", ("CT",), "SIEMENS", "SOMATOM Force", "LRMC-CT01", "CT"),
    Scanner("mr1", ("MR",), "GE MEDICAL SYSTEMS", "SIGNA Premier", "LRMC-MR01", "MR"),
    Scanner("xr1", ("CR", "DX"), "Carestream Health", "DRX-Evolution Plus", "LRMC-XR01", "XR"),
    Scanner("us1", ("US",), "GE Healthcare", "LOGIQ E10", "LRMC-US01", "US"),
)

SOP_CLASS: Final = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.3.1",
}
MODALITY_WEIGHTS: Final = (("CR", 25), ("DX", 20), ("CT", 30), ("MR", 15), ("US", 10))
MODALITY_DISPLAY: Final = {
    "CT": "Computed Tomography",
    "MR": "Magnetic Resonance",
    "CR": "Computed Radiography",
    "DX": "Digital Radiography",
    "US": "Ultrasound",
}
# modality -> ((body part, SNOMED code, study description, series descriptions), ...)
BODY_PARTS: Final = {
    "CT": (
        ("CHEST", "51185008", "CT CHEST W CONTRAST", ("Axial 1.0", "Lung 1.0", "Cor MPR")),
        (
            "ABDOMEN",
            "818983003",
            "CT ABD/PELVIS W CONTRAST",
            ("Portal venous", "Cor MPR", "Sag MPR"),
        ),
        ("HEAD", "69536005", "CT HEAD WO CONTRAST", ("Axial brain 5mm", "Bone 1mm", "Cor")),
    ),
    "MR": (
        ("BRAIN", "12738006", "MRI BRAIN WO/W CONTRAST", ("Ax T2 FLAIR", "Ax DWI", "Sag T1")),
        ("KNEE", "72696002", "MRI KNEE WO CONTRAST", ("Sag PD FS", "Cor T1", "Ax PD FS")),
        ("LSPINE", "122496007", "MRI L-SPINE WO CONTRAST", ("Sag T2", "Sag T1", "Ax T2")),
    ),
    "CR": (
        ("CHEST", "51185008", "XR CHEST 2 VIEWS", ("PA", "LAT", "AP portable")),
        ("HAND", "85562004", "XR HAND 3 VIEWS", ("PA", "Oblique", "Lateral")),
    ),
    "DX": (
        ("CHEST", "51185008", "XR CHEST PORTABLE", ("AP", "AP repeat", "LAT")),
        ("KNEE", "72696002", "XR KNEE 3 VIEWS", ("AP", "Lateral", "Sunrise")),
    ),
    "US": (
        ("ABDOMEN", "818983003", "US ABDOMEN COMPLETE", ("Liver", "Kidneys", "Gallbladder")),
        ("HEART", "80891009", "ECHO TTE COMPLETE", ("PLAX", "A4C", "Doppler")),
    ),
}

# IEEE 11073 telemetry metrics: (MDC code, UCUM unit, interval minutes)
TELEMETRY_METRICS: Final = (
    ("MDC_PULS_OXIM_SAT_O2", "%", 1),
    ("MDC_ECG_HEART_RATE", "/min", 1),
    ("MDC_RESP_RATE", "/min", 1),
    ("MDC_PRESS_BLD_NONINV_SYS", "mm[Hg]", 15),
    ("MDC_PRESS_BLD_NONINV_DIA", "mm[Hg]", 15),
    ("MDC_TEMP_BODY", "Cel", 30),
)
KNOWN_METRICS: Final = frozenset(m[0] for m in TELEMETRY_METRICS)
UNKNOWN_METRICS: Final = ("MDC_VENDOR_XYZ_INDEX", "MDC_UNKNOWN_METRIC")
MONITOR_MODELS: Final = (
    ("Philips", "MX800", "IntelliVue MX800", "DE"),
    ("GE Healthcare", "B450", "CARESCAPE B450", "SM"),
    ("Mindray", "N17", "BeneVision N17", "MR"),
)

DIRTY_KINDS: Final = (
    "broken_json",
    "missing_required",
    "unknown_code",
    "bad_unit",
    "impossible_value",
    "duplicate",
    "truncated_dicom",
    "bad_timestamp",
    "unknown_resource_type",
)

NOTE_TYPES: Final = {
    "AMB": ("11506-3", "Progress note"),
    "EMER": ("34111-5", "Emergency department Note"),
    "IMP": ("18842-5", "Discharge summary"),
}
