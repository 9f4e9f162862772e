"""DICOM Part 10 files for planned imaging studies."""

from __future__ import annotations

import io
from pathlib import Path
from random import Random

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from twin_pipeline.generate import vocab as V
from twin_pipeline.generate.common import Person
from twin_pipeline.generate.ehr import SeriesPlan, StudyPlan

IMPLEMENTATION_UID = "2.25.302571092215315425371392381227296917213"
IMPLEMENTATION_NAME = "TWINGEN_100"
PRIVATE_CREATOR = "TWINPIPE SIM 1.0"
_SEX = {"male": "M", "female": "F", "other": "O"}


def _pn(family: str, given: str) -> str:
    return f"{family}^{given}"


def study_files(root: Path, s: StudyPlan) -> list[tuple[Path, SeriesPlan, int]]:
    """Paths (and their series/instance index) that :func:`render_study` produces."""
    out = []
    for se in s.series:
        for i, uid in enumerate(se.instances):
            out.append((root / s.uid / se.uid / f"{uid}.dcm", se, i))
    return out


def render_instance(rng: Random, s: StudyPlan, se: SeriesPlan, i: int, p: Person) -> bytes:
    """Encode one instance as DICOM Part 10 bytes (Explicit VR Little Endian)."""
    uid = se.instances[i]
    sop_class = V.SOP_CLASS[s.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] + (["AXIAL"] if s.modality in ("CT", "MR") else [])
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    acq = se.started.replace(microsecond=0)
    acq_dt = acq.strftime("%Y%m%d%H%M%S") + f".{i * 250000 % 1000000:06d}-0500"
    ds.StudyDate = s.started.strftime("%Y%m%d")
    ds.SeriesDate = se.started.strftime("%Y%m%d")
    ds.AcquisitionDate = ds.SeriesDate
    ds.ContentDate = ds.SeriesDate
    ds.AcquisitionDateTime = acq_dt
    ds.StudyTime = s.started.strftime("%H%M%S")
    ds.SeriesTime = se.started.strftime("%H%M%S")
    ds.AcquisitionTime = ds.SeriesTime
    ds.ContentTime = ds.SeriesTime
    ds.TimezoneOffsetFromUTC = "-0500"
    ds.AccessionNumber = s.accession
    ds.Modality = s.modality
    ds.Manufacturer = s.scanner.spec.manufacturer
    ds.InstitutionName = V.HOSPITAL_NAME
    ds.InstitutionAddress = "100 Lakeside Dr, Worcester, MA"
    ds.ReferringPhysicianName = _pn(s.referring.family, s.referring.given)
    ds.StationName = s.scanner.spec.station
    ds.StudyDescription = s.description
    ds.SeriesDescription = se.description
    ds.ManufacturerModelName = s.scanner.spec.model
    ds.PatientName = _pn(p.family.upper(), p.given.upper())
    ds.PatientID = p.mrn
    ds.IssuerOfPatientID = "LRMC"
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = _SEX.get(p.gender, "O")
    ds.PatientAge = f"{min(p.age, 999):03d}Y"
    ds.BodyPartExamined = s.body_part
    ds.DeviceSerialNumber = s.scanner.serial
    ds.SoftwareVersions = "VA50A"
    ds.StudyInstanceUID = s.uid
    ds.SeriesInstanceUID = se.uid
    ds.StudyID = s.accession[-6:]
    ds.SeriesNumber = se.number
    ds.InstanceNumber = i + 1
    if s.modality in ("CT", "MR"):
        ds.SliceThickness = "1.0" if s.modality == "CT" else "3.0"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = s.frame_of_reference
        ds.ImagePositionPatient = ["-120.0", "-120.0", f"{-50.0 + 5.0 * i:.1f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = f"{-50.0 + 5.0 * i:.1f}"
    if s.modality == "CT":
        ds.KVP = "120"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
    if s.modality == "MR":
        ds.MagneticFieldStrength = "3"
        ds.RepetitionTime = "4500"
        ds.EchoTime = "90"
    comment = f"{s.description}; {se.description}"
    if s.comment_has_name:
        comment += f"; pt {p.given} {p.family} tolerated exam well"
    ds.ImageComments = comment
    ds.RequestAttributesSequence = DicomSequence([_request_item(s)])
    # Image pixel module: tiny images.
    frames = 3 if s.modality == "US" else 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.PixelSpacing = ["0.5", "0.5"] if s.modality in ("CT", "MR") else ["0.15", "0.15"]
    if s.modality == "US":
        ds.NumberOfFrames = frames
        ds.FrameTime = "33.3"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        pixels = rng.randbytes(64 * frames)
    else:
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        pixels = bytes(b & 0x0F if k % 2 else b for k, b in enumerate(rng.randbytes(128)))
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", f"profile={s.modality.lower()}-{s.body_part.lower()}")
    block.add_new(0x02, "DS", f"{rng.uniform(0.5, 2.5):.3f}")
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW" if ds.BitsAllocated == 16 else "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _request_item(s: StudyPlan) -> Dataset:
    item = Dataset()
    item.RequestedProcedureID = s.accession
    item.ScheduledProcedureStepID = s.accession[-6:]
    return item


def expected_pixel_bytes(modality: str) -> int:
    """Size of the pixel data written for ``modality``."""
    return 64 * 3 if modality == "US" else 128
