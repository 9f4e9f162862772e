"""DICOM headers (kind ``dicom``): Part 10 files and DICOMweb QIDO-RS JSON results.

Claims every file under ``pacs/`` and any ``*.dcm`` file. Part 10 files are read with pydicom
without pixel data (``stop_before_pixels``); one row per file in ``raw.dicom_header`` with the
header fields as columns, the whole header as DICOM JSON (``header_json``; bulk values above
1 KiB left out) and the private tags apart (``private_json``) for de-identification. A file is
quarantined when it is not DICOM, is truncated (the file ends before its last element does), or
lacks a Study, Series or SOP Instance UID. ``pacs/**/*.json`` files are QIDO-RS results (a JSON
array of DICOM JSON objects, ``entry:N``), study, series or instance level.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from twin_pipeline.sources import LoadStats, SourceFile, SourceReader, register
from twin_pipeline.store import QuarantineRow, Store, lineage_key

TABLE = "raw.dicom_header"
# (column, DICOM keyword)
FIELDS: tuple[tuple[str, str], ...] = (
    ("sop_instance_uid", "SOPInstanceUID"),
    ("sop_class_uid", "SOPClassUID"),
    ("study_instance_uid", "StudyInstanceUID"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("patient_id", "PatientID"),
    ("issuer_of_patient_id", "IssuerOfPatientID"),
    ("accession_number", "AccessionNumber"),
    ("modality", "Modality"),
    ("body_part", "BodyPartExamined"),
    ("study_date", "StudyDate"),
    ("study_time", "StudyTime"),
    ("series_date", "SeriesDate"),
    ("series_time", "SeriesTime"),
    ("acquisition_datetime", "AcquisitionDateTime"),
    ("acquisition_date", "AcquisitionDate"),
    ("acquisition_time", "AcquisitionTime"),
    ("timezone_offset", "TimezoneOffsetFromUTC"),
    ("station_name", "StationName"),
    ("manufacturer", "Manufacturer"),
    ("model", "ManufacturerModelName"),
    ("device_serial", "DeviceSerialNumber"),
    ("institution", "InstitutionName"),
    ("study_description", "StudyDescription"),
    ("series_description", "SeriesDescription"),
    ("series_number", "SeriesNumber"),
    ("instance_number", "InstanceNumber"),
    ("rows", "Rows"),
    ("columns", "Columns"),
    ("number_of_frames", "NumberOfFrames"),
    ("pixel_spacing", "PixelSpacing"),
    ("slice_thickness", "SliceThickness"),
    ("image_comments", "ImageComments"),
    ("burned_in_annotation", "BurnedInAnnotation"),
)
INT_COLS = {"series_number", "instance_number", "rows", "columns", "number_of_frames"}
DDL = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (lineage_key VARCHAR, source_file VARCHAR, "
    "position VARCHAR, record_hash VARCHAR, source_format VARCHAR, level VARCHAR, "
    + ", ".join(f"{c} {'INTEGER' if c in INT_COLS else 'VARCHAR'}" for c, _ in FIELDS)
    + ", transfer_syntax_uid VARCHAR, header_json VARCHAR, private_json VARCHAR)"
)
COLUMNS = [
    "lineage_key",
    "source_file",
    "position",
    "record_hash",
    "source_format",
    "level",
    *(c for c, _ in FIELDS),
    "transfer_syntax_uid",
    "header_json",
    "private_json",
]
TAG_OF = {kw: pydicom.datadict.tag_for_keyword(kw) for _, kw in FIELDS}
BULK_LIMIT = 1024


class BadDicom(Exception):
    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value) if len(value) else None
    return str(value).strip() or None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip()) if value not in (None, "") else None
    except ValueError:
        return None


def _check_truncated(path: Path, ds: Dataset) -> None:
    """Raise when the file ends inside an element (pydicom stops quietly at EOF)."""
    size = path.stat().st_size
    # Top level: large values are deferred, their extent is known without reading them.
    for tag, raw in ds._dict.items():
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is not None and length not in (None, 0xFFFFFFFF) and tell + length > size:
            raise BadDicom(
                "truncated_dicom",
                f"file ends at byte {size} inside element {tag} (needs {tell + length})",
            )


def _check_native_pixels(ds: Dataset, ts: Any) -> None:
    """Uncompressed pixel data shorter than rows x columns x samples x bits x frames."""
    if ts is None or "PixelData" not in ds or getattr(ts, "is_compressed", True):
        return
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        bits = int(ds.BitsAllocated)
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * frames
        expected = (expected * bits + 7) // 8
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            expected = expected // 3 * 2  # chroma subsampled: 2 samples per pixel on average
        actual = len(ds.PixelData)
    except Exception:
        return
    if actual < expected:
        raise BadDicom(
            "truncated_dicom",
            f"pixel data has {actual} bytes, the image needs {expected}",
        )


def read_part10(path: Path) -> tuple[Dataset, str | None]:
    """The header of a Part 10 file (no pixels); raises :class:`BadDicom` with a rule."""
    with path.open("rb") as fh:
        head = fh.read(132)
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble, defer_size=BULK_LIMIT)
        for w in caught:
            if "End of file reached" in str(w.message):
                raise BadDicom("truncated_dicom", f"file ends early: {w.message}")
    except BadDicom:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise BadDicom("not_dicom", f"not a readable DICOM file ({type(exc).__name__})") from exc
    except Exception as exc:
        raise BadDicom("not_dicom", f"not a readable DICOM file ({type(exc).__name__})") from exc
    if not has_preamble and len(ds) == 0:
        raise BadDicom("not_dicom", "no DICM preamble and no data elements")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if str(ts) != "1.2.840.10008.1.2.1.99":  # deflated: offsets are in the inflated stream
        try:
            _check_truncated(path, ds)
        except BadDicom as exc:
            if has_preamble:
                raise
            # Without the DICM preamble, elements running past the end mean it is not DICOM.
            raise BadDicom("not_dicom", f"no DICM preamble and no valid data set ({exc})") from exc
    _check_native_pixels(ds, ts)
    if not has_preamble and ts is None and "SOPClassUID" not in ds:
        raise BadDicom("not_dicom", "no DICM preamble and no DICOM identifying elements")
    return ds, str(ts) if ts else None


def _json_dicts(ds: Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public header, private tags) as DICOM JSON, without pixel or bulk data."""
    public: dict[str, Any] = {}
    private: dict[str, Any] = {}
    for elem in ds:
        if elem.tag == 0x7FE00010 or elem.tag.group in (0x7FE0,):
            continue
        try:
            raw = ds.get_item(elem.tag)
            length = getattr(raw, "length", 0) or 0
            if length > BULK_LIMIT and elem.VR in ("OB", "OW", "OF", "OD", "OL", "UN", "OV"):
                continue
            item = elem.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=BULK_LIMIT)
        except Exception as exc:  # a badly encoded value must not lose the header
            item = {"vr": str(elem.VR), "error": f"{type(exc).__name__}"}
        key = f"{elem.tag:08X}"
        (private if elem.tag.is_private else public)[key] = item
    return public, private


def header_row(ds: Dataset, ts_uid: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for col, kw in FIELDS:
        try:
            value = ds.get(kw)
            value = value.value if hasattr(value, "value") else value
        except Exception:
            value = None
        row[col] = _int(value) if col in INT_COLS else _text(value)
    row["transfer_syntax_uid"] = ts_uid
    return row


def _qido_value(obj: dict[str, Any], keyword: str) -> Any:
    tag = TAG_OF[keyword]
    item = obj.get(f"{tag:08X}") or obj.get(f"{tag:08x}")
    if not isinstance(item, dict):
        return None
    vals = item.get("Value")
    if not vals:
        return None
    if item.get("vr") == "PN":
        return vals[0].get("Alphabetic") if isinstance(vals[0], dict) else vals[0]
    return vals if len(vals) > 1 else vals[0]


def qido_row(obj: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for col, kw in FIELDS:
        value = _qido_value(obj, kw)
        row[col] = _int(value) if col in INT_COLS else _text(value)
    row["transfer_syntax_uid"] = None
    return row


def _level(row: dict[str, Any]) -> str:
    if row.get("sop_instance_uid"):
        return "instance"
    if row.get("series_instance_uid"):
        return "series"
    return "study"


@register
class DicomReader(SourceReader):
    kind = "dicom"
    raw_tables = (TABLE,)

    def matches(self, rel: str) -> bool:
        low = rel.lower()
        return low.startswith("pacs/") or "/pacs/" in low or low.endswith(".dcm")

    def ensure_tables(self, store: Store) -> None:
        store.con.execute(DDL)

    def load(self, files: Sequence[SourceFile], store: Store) -> LoadStats:
        stats = LoadStats(self.kind)
        self.ensure_tables(store)
        out: list[tuple[Any, ...]] = []
        bad: list[QuarantineRow] = []
        for f in files:
            fs = stats.file(f.rel)
            records = self._qido(f) if f.rel.lower().endswith(".json") else [self._part10(f)]
            for position, result in records:
                fs.records_in += 1
                if isinstance(result, BadDicom):
                    fs.quarantined += 1
                    bad.append(
                        QuarantineRow(
                            "read",
                            TABLE,
                            self.kind,
                            f.rel,
                            position,
                            result.rule,
                            f"{f.rel} [{position}]: {result}",
                            json.dumps({"size": f.size}) if position == "file" else None,
                            lineage_key(f.sha256, position, f.sha256),
                        )
                    )
                    continue
                row, header, private, fmt = result
                rh = hashlib.sha256(header.encode()).hexdigest()
                out.append(
                    (
                        lineage_key(f.sha256, position, rh),
                        f.rel,
                        position,
                        rh,
                        fmt,
                        _level(row),
                        *(row[c] for c, _ in FIELDS),
                        row["transfer_syntax_uid"],
                        header,
                        private,
                    )
                )
                fs.loaded += 1
        if out:
            store.con.executemany(
                f"INSERT INTO {TABLE} VALUES ({', '.join('?' * len(COLUMNS))})", out
            )
        store.quarantine(bad)
        return stats

    def _part10(self, f: SourceFile) -> tuple[str, Any]:
        with warnings.catch_warnings():
            # pydicom warns on every non-conformant value; the header is kept as found.
            warnings.simplefilter("ignore")
            return self._part10_quiet(f)

    def _part10_quiet(self, f: SourceFile) -> tuple[str, Any]:
        try:
            ds, ts_uid = read_part10(f.path)
            row = header_row(ds, ts_uid)
            missing = [kw for col, kw in FIELDS[:4] if col != "sop_class_uid" and not row.get(col)]
            if missing:
                raise BadDicom("missing_uid", f"header lacks {', '.join(missing)}")
            public, private = _json_dicts(ds)
        except BadDicom as exc:
            return "file", exc
        return "file", (
            row,
            json.dumps(public, sort_keys=True),
            json.dumps(private, sort_keys=True) if private else None,
            "part10",
        )

    def _qido(self, f: SourceFile) -> list[tuple[str, Any]]:
        try:
            doc = json.loads(f.path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [("file", BadDicom("broken_json", f"not a QIDO-RS JSON document ({exc})"))]
        if isinstance(doc, dict):
            doc = [doc]
        if not isinstance(doc, list):
            return [("file", BadDicom("broken_json", "QIDO-RS result must be a JSON array"))]
        out: list[tuple[str, Any]] = []
        for k, obj in enumerate(doc, start=1):
            pos = f"entry:{k}"
            if not isinstance(obj, dict):
                out.append((pos, BadDicom("broken_json", "entry is not a DICOM JSON object")))
                continue
            row = qido_row(obj)
            if not row.get("study_instance_uid"):
                out.append((pos, BadDicom("missing_uid", "entry lacks StudyInstanceUID")))
                continue
            private = {k2: v for k2, v in obj.items() if _is_private_key(k2)}
            public = {k2: v for k2, v in obj.items() if k2 not in private}
            out.append(
                (
                    pos,
                    (
                        row,
                        json.dumps(public, sort_keys=True),
                        json.dumps(private, sort_keys=True) if private else None,
                        "qido-rs",
                    ),
                )
            )
        return out


def _is_private_key(key: str) -> bool:
    try:
        return bool(int(key[:4], 16) % 2)
    except ValueError:
        return False
