"""DICOM headers (kind ``dicom``): Part 10 files and DICOMweb QIDO-RS JSON results.

Claims every file under ``pacs/`` and any ``*.dcm`` file. Part 10 files are read with pydicom
with values above 1 KiB deferred (pixel data and other bulk values are never read, but their
extent is known, which is how truncation is found); one row per file in ``raw.dicom_header``
with the header fields as columns, the whole header as DICOM JSON (``header_json``, decoded
from the raw bytes for plain VRs; bulk values left out) and the private tags apart
(``private_json``) for de-identification. A file is quarantined when it is not DICOM, is
truncated (it ends inside an element, a sequence lacks its delimiter, or uncompressed pixel data
is shorter than the image), or lacks a Study, Series or SOP Instance UID. ``pacs/**/*.json`` files are QIDO-RS results (a JSON
array of DICOM JSON objects, ``entry:N``), study, series or instance level.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Generator, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import _dictionary_vr_fast
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import ENCODED_VR, read_sequence
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

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
COLUMN_OF_TAG: dict[int, str] = {int(TAG_OF[kw] or 0): col for col, kw in FIELDS}
_FIELD_COLUMNS = [c for c, _ in FIELDS]
BULK_LIMIT = 1024


class BadDicom(Exception):
    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (results come back from workers)
        return (BadDicom, (self.rule, str(self)))


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


def _json_int(header: dict[str, Any], tag: str) -> int | None:
    item = header.get(tag) or {}
    vals = item.get("Value") if isinstance(item, dict) else None
    try:
        return int(vals[0]) if vals else None
    except (TypeError, ValueError):
        return None


def _check_native_pixels(ds: Dataset, ts: Any, header: dict[str, Any]) -> None:
    """Uncompressed pixel data shorter than rows x columns x samples x bits x frames."""
    _check_pixel_length(_raw_length(ds, 0x7FE00010), ts, header)


def _check_pixel_length(actual: int | None, ts: Any, header: dict[str, Any]) -> None:
    """:func:`_check_native_pixels` given the length of the pixel data value."""
    try:
        if ts is None or ts.is_compressed:
            return
    except ValueError:  # a UID that is not a transfer syntax: the extent cannot be computed
        return
    rows, cols = _json_int(header, "00280010"), _json_int(header, "00280011")
    bits = _json_int(header, "00280100")
    if actual is None or not rows or not cols or not bits:
        return
    frames = _json_int(header, "00280008") or 1
    samples = _json_int(header, "00280002") or 1
    expected = (rows * cols * samples * frames * bits + 7) // 8
    pi = (header.get("00280004") or {}).get("Value") or [""]
    if pi[0] == "YBR_FULL_422":
        expected = expected // 3 * 2  # chroma subsampled: 2 samples per pixel on average
    if actual < expected:
        raise BadDicom(
            "truncated_dicom",
            f"pixel data has {actual} bytes, the image needs {expected}",
        )


def read_part10(path: Path) -> tuple[Dataset, Any]:
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
    if not has_preamble and ts is None and "SOPClassUID" not in ds:
        raise BadDicom("not_dicom", "no DICM preamble and no DICOM identifying elements")
    return ds, ts


_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})


def _raw_length(ds: Dataset, tag: int) -> int | None:
    """Value length of ``tag`` without reading a deferred value from disk."""
    raw = ds._dict.get(BaseTag(tag))
    length = getattr(raw, "length", None)
    if isinstance(length, int) and length != 0xFFFFFFFF:
        return length
    value = getattr(raw, "value", None)
    return len(value) if isinstance(value, bytes | bytearray) else None


def _element_json(elem: Any) -> dict[str, Any]:
    """One element in the DICOM JSON model (PS3.18 F.2), values converted by VR."""
    vr = str(elem.VR)
    value = elem.value
    if vr == "SQ":
        items = [_dataset_json(item, nested=True)[0] for item in value or []]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    if vr in _BINARY_VRS:
        if value is None or len(value) > BULK_LIMIT:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(bytes(value)).decode()}
    if value is None or value == "" or value == b"":
        return {"vr": vr}
    vals = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
    if vr == "PN":
        out: list[Any] = [{"Alphabetic": str(v)} for v in vals]
    elif vr in _INT_VRS or vr == "IS":
        out = [int(v) if str(v).strip() not in ("", "None") else None for v in vals]
    elif vr in _FLOAT_VRS or vr == "DS":
        out = [float(v) if str(v).strip() not in ("", "None") else None for v in vals]
    elif vr == "AT":
        out = [f"{int(v):08X}" for v in vals]
    else:
        out = [str(v) for v in vals]
    return {"vr": vr, "Value": out}


_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_MULTI_TEXT_VRS = _TEXT_VRS - {"LT", "ST", "UT", "UR"}
_STRUCT = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_FAST_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})


def _fast_raw_json(raw: Any, vr: str, little: bool, encoding: str) -> dict[str, Any] | None:
    """DICOM JSON straight from a raw element's bytes for plain VRs (None: use pydicom)."""
    data = raw.value
    if not isinstance(data, bytes):
        return None
    return _fast_value_json(data, vr, little, encoding)


def _fast_value_json(data: bytes, vr: str, little: bool, encoding: str) -> dict[str, Any] | None:
    """:func:`_fast_raw_json` of a value's bytes."""
    if not data:
        return {"vr": vr}
    if vr in _TEXT_VRS or vr in ("IS", "DS"):
        text = data.decode(encoding, errors="replace")
        parts = text.split("\\") if vr in _MULTI_TEXT_VRS or vr in ("IS", "DS") else [text]
        parts = [x.strip(" \x00") if vr != "UI" else x.strip("\x00 ") for x in parts]
        if vr == "PN":
            return {"vr": vr, "Value": [{"Alphabetic": x} for x in parts]}
        if vr == "IS":
            return {"vr": vr, "Value": [int(x) if x else None for x in parts]}
        if vr == "DS":
            return {"vr": vr, "Value": [float(x) if x else None for x in parts]}
        if all(not x for x in parts):
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    code = _STRUCT.get(vr)
    if code is not None:
        size = struct.calcsize("<" + code)  # standard sizes (native "l" is 8 bytes)
        if len(data) % size:
            return None
        fmt = ("<" if little else ">") + code * (len(data) // size)
        return {"vr": vr, "Value": list(struct.unpack(fmt, data))}
    if vr in _BINARY_VRS:
        if len(data) > BULK_LIMIT:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode()}
    return None


def _dataset_json(ds: Dataset, *, nested: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public, private) elements of ``ds`` as DICOM JSON; pixel data and values above
    ``BULK_LIMIT`` are left out without being read from disk. Plain values are decoded from
    the raw bytes directly (pydicom's element conversion is the slow part of header reading);
    sequences, other character sets and odd values go through pydicom."""
    public: dict[str, Any] = {}
    private: dict[str, Any] = {}
    little = bool(getattr(ds, "is_little_endian", True) in (True, None))
    charset = ds._dict.get(BaseTag(0x00080005))
    cs = ""
    if charset is not None:
        cs_val = getattr(charset, "value", b"")
        cs = cs_val.decode("ascii", "replace") if isinstance(cs_val, bytes) else str(cs_val)
        cs = cs.strip(" \x00")
    # Sequence items inherit encoding from their parent: decoded by pydicom, not here.
    fast = cs in _FAST_CHARSETS and not nested
    encoding = "utf-8" if cs == "ISO_IR 192" else "latin-1"
    for tag, raw in list(ds._dict.items()):
        itag = int(tag)
        if itag >> 16 == 0x7FE0:
            continue
        item: dict[str, Any] | None = None
        raw_vr = raw.VR
        try:
            if type(raw) is RawDataElement:
                value = raw.value
                length = raw.length
                vr = str(raw_vr) if raw_vr else "UN"
                big = value is None or (length != 0xFFFFFFFF and length > BULK_LIMIT)
                if big and vr in _BINARY_VRS:
                    item = {"vr": vr}  # bulk data: left out, never read
                elif fast and value is not None and raw_vr and vr != "UN":
                    # (explicit UN goes to pydicom, which resolves the dictionary VR)
                    item = _fast_raw_json(raw, vr, little, encoding)
            if item is None:
                item = _element_json(ds[tag])
        except Exception as exc:  # a badly encoded value must not lose the header
            item = {"vr": str(raw_vr or "UN"), "error": type(exc).__name__}
        (private if (itag >> 16) & 1 else public)[f"{itag:08X}"] = item
    return public, private


def _json_dicts(ds: Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public header, private tags) as DICOM JSON, without pixel or bulk data."""
    return _dataset_json(ds)


# --- Fast Part 10 header reader ------------------------------------------------------------
# pydicom's element generator and per-element conversion cost ~1 ms a file; most files are
# plain (DICM preamble, known transfer syntax, every element inside the file, tags ascending).
# For those the header is walked here straight from the bytes (read once, or mapped when large)
# and the DICOM JSON is built in the same pass; the elements the fast decoder does not handle
# (sequences, UN, AT, other character sets, implicit VR values) are converted by pydicom from
# the same raw elements it would have read itself, so the JSON is identical. Anything unusual
# (no preamble, deflated or private transfer syntax, an element running past the end, an
# implicit/explicit VR switch, a command set, tags out of order) declines: the pydicom path
# (:func:`read_part10`) then reads the file and decides, quarantine reasons included.

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_VR_OF = {b: b.decode("ascii") for b in ENCODED_VR}
_VR32 = frozenset(str(v) for v in EXPLICIT_VR_LENGTH_32)
_META_HDR = struct.Struct("<HH2sH")
_META_NUM_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "UV": 8, "SV": 8, "AT": 4}
_HDR = {
    (False, True): struct.Struct("<HH2sH"),
    (False, False): struct.Struct(">HH2sH"),
    (True, True): struct.Struct("<HHL"),
}
_ULONG = {True: struct.Struct("<L"), False: struct.Struct(">L")}
_TAG = {True: struct.Struct("<HH"), False: struct.Struct(">HH")}
_CHARSET_TAG = 0x00080005
_READ_WHOLE = 4 << 20  # files up to this size are read whole, larger ones mapped
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD


class _Decline(Exception):
    """The fast reader leaves this file to pydicom."""


class FastHeader:
    """What :func:`fast_part10` found: the DICOM JSON (dicts and their ``json.dumps(...,
    sort_keys=True)`` text), the header columns, the transfer syntax and the pixel data
    length."""

    __slots__ = ("pixel_length", "private", "private_text", "public", "public_text", "row", "ts")

    def __init__(
        self,
        public: dict[str, Any],
        private: dict[str, Any],
        public_text: str,
        private_text: str | None,
        ts: Any,
        pixel_length: int | None,
        row: dict[str, Any],
    ) -> None:
        self.row = row  # the header columns, as qido_row(public) makes them
        self.public = public
        self.private = private
        self.public_text = public_text
        self.private_text = private_text
        self.ts = ts
        self.pixel_length = pixel_length


# Each element's result (tag, "GGGGEEEE", DICOM JSON, '"GGGGEEEE": ' + JSON text, header
# column, column value), by the element's bytes (tag, VR, length, value) per byte order and
# character set, and for sequences by their bytes and what their conversion reads from the
# parent: the files of a series repeat most of their header, so most elements are decoded and
# encoded once per process. Bounded.
Hit = tuple[int, str, dict[str, Any], str, str | None, Any]
_ITEM_CACHE: dict[Any, dict[Any, Hit]] = {}
_ITEM_CACHE_MAX = 100_000  # entries over all caches; cleared when full
_ITEM_CACHE_BYTES = 32 << 20  # bytes of keys and JSON text over all caches; cleared when full
_cache_size = 0
_cache_bytes = 0
_CACHE_VALUE_MAX = 128  # bytes; longer values (rare, seldom repeated) are not kept
_SQ_CACHE_VALUE_MAX = BULK_LIMIT
_c_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_encode_item: Any = (
    _c_make_encoder(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", True, False, True
    )
    if _c_make_encoder is not None
    else None
)


def _item_text(item: dict[str, Any]) -> str:
    """``json.dumps(item, sort_keys=True)``, without building an encoder per call."""
    if _encode_item is None:
        return json.dumps(item, sort_keys=True)
    return "".join(_encode_item(item, 0))


def _hit(tag: int, item: dict[str, Any]) -> Hit:
    name = f"{tag:08X}"
    col = COLUMN_OF_TAG.get(tag)
    return (
        tag,
        name,
        item,
        f'"{name}": {_item_text(item)}',
        col,
        _column_value(col, item) if col is not None else None,
    )


def _cache_for(key: Any) -> dict[Any, Hit]:
    """The cache of one context (byte order and character set, or a sequence context)."""
    global _cache_size, _cache_bytes
    if _cache_size >= _ITEM_CACHE_MAX or _cache_bytes >= _ITEM_CACHE_BYTES:
        _ITEM_CACHE.clear()
        _cache_size = _cache_bytes = 0
    cache = _ITEM_CACHE.get(key)
    if cache is None:
        cache = _ITEM_CACHE[key] = {}
    return cache


def _remember(cache: dict[Any, Hit], key: Any, hit: Hit) -> Hit:
    global _cache_size, _cache_bytes
    cache[key] = hit
    _cache_size += 1
    _cache_bytes += len(hit[3]) + (len(key) if isinstance(key, bytes) else 64)
    return hit


def clear_cache() -> None:
    """Forget every remembered element (tests; a long-lived process may call it)."""
    global _cache_size, _cache_bytes
    _ITEM_CACHE.clear()
    _cache_size = _cache_bytes = 0


def fast_part10(path: Path) -> FastHeader | None:
    """The header of a plain Part 10 file as DICOM JSON, or None when the file needs pydicom
    (see the section comment). Same output as ``_json_dicts(read_part10(path)[0])``."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 144:
            return None
        data: Any
        if size <= _READ_WHOLE:
            data = fh.read()
            if len(data) != size:
                return None
        else:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _fast_parse(fh, data, size)
        except Exception:  # _Decline, or anything odd: pydicom reads it and decides
            return None
        finally:
            if isinstance(data, mmap.mmap):
                data.close()


def _file_meta_ts(data: Any, size: int) -> tuple[str, int]:
    """(transfer syntax UID, offset of the data set) from the file meta group."""
    if data[128:132] != b"DICM":
        raise _Decline
    pos = 132
    ts: str | None = None
    unpack = _META_HDR.unpack_from
    ulong = _ULONG[True].unpack_from
    while True:
        if pos + 8 > size:
            raise _Decline  # nothing after the file meta group
        group, elem, vrb, length = unpack(data, pos)
        if group != 2:
            break
        vr = _VR_OF.get(vrb)
        if vr is None:
            raise _Decline
        vpos = pos + 8
        if vr in _VR32:
            length = ulong(data, vpos)[0]
            vpos += 4
        end = vpos + length
        if length == 0xFFFFFFFF or end > size:
            raise _Decline
        if length % _META_NUM_SIZE.get(vr, 1):
            raise _Decline  # pydicom's reader converts meta elements: it would raise
        if elem == 0x0010:
            ts = bytes(data[vpos:end]).decode("ascii").rstrip("\0 ")
        pos = end
    if group == 0 or not ts or "\\" in ts or ts == _DEFLATED:
        raise _Decline
    if ts in pydicom.uid.PrivateTransferSyntaxes:
        raise _Decline
    return ts, pos


def _fast_parse(fh: Any, data: Any, size: int) -> FastHeader:
    ts_str, pos = _file_meta_ts(data, size)
    implicit = ts_str == _IMPLICIT_LE
    little = ts_str != _EXPLICIT_BE
    # pydicom trusts the first element over the transfer syntax (with a warning): decline.
    if pos + 6 > size:
        raise _Decline
    b0, b1 = data[pos + 4], data[pos + 5]
    if (not (0x40 < b0 < 0x5B and 0x40 < b1 < 0x5B)) != implicit:
        raise _Decline
    hdr = _HDR.get((implicit, little))
    if hdr is None:
        raise _Decline
    unpack = hdr.unpack_from
    ulong = _ULONG[little].unpack_from
    vr_of = _VR_OF.get
    vr32 = _VR32
    ts = pydicom.uid.UID(ts_str)
    out: list[Hit] = []  # in tag order, then the ones decided after the loop
    add = out.append
    # (tag, vr, length, value, value_tell) of the elements pydicom may need: those it
    # converts and those their conversion reads (see _context_tag)
    raws: list[tuple[int, str | None, int, Any, int]] = []
    pending: list[int] = []  # tags whose JSON pydicom makes
    early: list[int] = []  # tags before the character set (decided once it is known)
    fast = not implicit  # explicit VR in a plain character set: values decoded here
    # a plain character set and pydicom's default value options: implicit VR values are
    # decoded here as pydicom does
    options_ok = not _converter_options_changed()
    plain = options_ok
    encoding = "latin-1"
    seq_encoding: Any = default_encoding  # what pydicom reads nested sequences with
    charset_seen = False
    cache = _cache_for((implicit, little, encoding))
    cache_get = cache.get
    pixel_length: int | None = None
    prev = -1
    item: dict[str, Any] | None
    while pos < size:
        if pos + 8 > size:
            raise _Decline
        vpos = pos + 8
        if implicit:
            group, elem, length = unpack(data, pos)
            vr: str | None = None
        else:
            group, elem, vrb, length = unpack(data, pos)
            vr = vr_of(vrb)
            if vr is None:
                raise _Decline
            if vr in vr32:
                if vpos + 4 > size:
                    raise _Decline
                length = ulong(data, vpos)[0]
                vpos += 4
        tag = group << 16 | elem
        if tag <= prev or group == 0xFFFE:
            raise _Decline
        prev = tag
        if length == 0xFFFFFFFF:
            if fast and charset_seen and vr == "SQ" and not group & 1:
                try:
                    item, pos = _native_sequence(data, vpos, length, size, little, encoding)
                except (_Decline, ValueError, struct.error):  # pydicom converts it
                    pass
                else:
                    add(_hit(tag, item))
                    continue
            pos = _undefined_length(
                fh, data, size, tag, vr, vpos, implicit, little, ts, raws, seq_encoding
            )
            if group != 0x7FE0:
                pending.append(tag)
            elif tag == 0x7FE00010 and raws[-1][3] is not None:
                pixel_length = len(raws[-1][3])
            continue
        end = vpos + length
        if end > size:
            raise _Decline
        if group == 0x7FE0:
            if tag == 0x7FE00010:
                pixel_length = length
            raws.append((tag, vr, length, None if length > BULK_LIMIT else data[vpos:end], vpos))
            pos = end
            continue
        if not charset_seen and tag > _CHARSET_TAG:
            charset_seen = True  # none in this file: the default character set applies
        if implicit and plain and charset_seen and not group & 1 and 0 < length <= BULK_LIMIT:
            key = data[pos:end]  # tag, length and value
            hit = cache_get(key)
            if hit is None:
                item = _implicit_item(tag, data[vpos:end], little, encoding)
                if item is not None:
                    hit = _hit(tag, item)
                    if length <= _CACHE_VALUE_MAX:
                        _remember(cache, key, hit)
            if hit is not None:
                add(hit)
                if group == 0x0028 or group == 0x5400:
                    raws.append((tag, vr, length, data[vpos:end], vpos))  # context
                pos = end
                continue
        if (
            fast
            and charset_seen
            and (length <= _CACHE_VALUE_MAX or (vr == "SQ" and length <= _SQ_CACHE_VALUE_MAX))
        ):
            key = data[pos:end]  # tag, VR, length and value
            hit = cache_get(key)
            if hit is None:
                value = data[vpos:end]
                item = _fast_item(vr, length, value, True, little, encoding)
                if item is None and vr == "SQ" and not group & 1:
                    item = _try_native_sequence(data, vpos, length, end, little, encoding)
                if item is not None:
                    hit = _remember(cache, key, _hit(tag, item))
            if hit is not None:
                add(hit)
                if group == 0x0028 or (group & 1 and elem < 0x100) or group == 0x5400:
                    raws.append((tag, vr, length, data[vpos:end], vpos))  # context
                pos = end
                continue
        pos = end
        value = data[vpos:end]
        raws.append((tag, vr, length, value, vpos))
        if tag == _CHARSET_TAG:
            charset_seen = True
            cs = bytes(value).decode("ascii", "replace").strip(" \x00")
            plain = options_ok and cs in _FAST_CHARSETS
            fast = fast and cs in _FAST_CHARSETS
            encoding = "utf-8" if cs == "ISO_IR 192" else "latin-1"
            cache = _cache_for((implicit, little, encoding))
            cache_get = cache.get
            seq_encoding = convert_encodings(convert_string(bytes(value), little))
            # pydicom's reader converts this element when it opens the file: same here
            raw = RawDataElement(
                BaseTag(tag),
                vr,
                length,
                value if length else cast(bytes | None, empty_value_for_VR(vr, raw=True)),
                vpos,
                implicit,
                little,
            )
            try:
                add(
                    _hit(
                        tag, _element_json(convert_raw_data_element(raw, encoding=default_encoding))
                    )
                )
            except Exception as exc:
                raise _Decline from exc
            continue
        if tag < _CHARSET_TAG:
            early.append(tag)
            continue
        item = _fast_item(vr, length, value, fast, little, encoding)
        if item is None and fast and vr == "SQ" and not group & 1:
            item = _try_native_sequence(data, vpos, length, end, little, encoding)
        if item is None:
            pending.append(tag)
        else:
            add(_hit(tag, item))
    resort = bool(early or pending)
    if early:
        by_tag = {r[0]: r for r in raws}
        for tag in early:
            _, vr, length, value, _ = by_tag[tag]
            item = _fast_item(vr, length, value, fast, little, encoding)
            if item is None:
                pending.append(tag)
            else:
                add(_hit(tag, item))
    if pending:
        _pydicom_items(raws, pending, implicit, little, seq_encoding, out)
    if resort:
        out.sort(key=itemgetter(0))
    public: dict[str, Any] = {}
    private: dict[str, Any] = {}
    row: dict[str, Any] = dict.fromkeys(_FIELD_COLUMNS)
    pub_parts: list[str] = []
    priv_parts: list[str] = []
    for tag, name, elem_json, text, col, col_value in out:
        if tag & 0x10000:
            private[name] = elem_json
            priv_parts.append(text)
        else:
            public[name] = elem_json
            pub_parts.append(text)
        if col is not None:
            row[col] = col_value
    row["transfer_syntax_uid"] = ts_str
    return FastHeader(
        public,
        private,
        "{" + ", ".join(pub_parts) + "}",
        "{" + ", ".join(priv_parts) + "}" if priv_parts else None,
        ts,
        pixel_length,
        row,
    )


def _pydicom_items(
    raws: list[tuple[int, str | None, int, Any, int]],
    pending: list[int],
    implicit: bool,
    little: bool,
    seq_encoding: Any,
    out: list[Hit],
) -> None:
    """The JSON of the ``pending`` elements, converted by pydicom as ``_dataset_json`` does.
    A public sequence of defined length is remembered by its bytes and everything its
    conversion reads from the parent (byte order, VR mode, character set, pixel
    representation)."""
    by_tag = {r[0]: r for r in raws}
    pixrep = by_tag.get(0x00280103)
    cache = _cache_for(("SQ", implicit, little, repr(seq_encoding), pixrep[3] if pixrep else None))
    todo: list[tuple[int, Any]] = []
    for tag in pending:
        _, vr, length, value, _ = by_tag[tag]
        key = None
        if vr == "SQ" and not (tag >> 16) & 1 and 0 < length <= _SQ_CACHE_VALUE_MAX:
            key = (tag, value)
            hit = cache.get(key)
            if hit is not None:
                out.append(hit)
                continue
        todo.append((tag, key))
    if not todo:
        return
    ds = _raw_dataset(raws, [t for t, _ in todo], implicit, little, seq_encoding)
    for tag, key in todo:
        elem_vr = ds._dict[BaseTag(tag)].VR
        try:
            item = _element_json(ds[BaseTag(tag)])
        except Exception as exc:  # a badly encoded value must not lose the header
            item = {"vr": str(elem_vr or "UN"), "error": type(exc).__name__}
            key = None
        out.append(_remember(cache, key, _hit(tag, item)) if key is not None else _hit(tag, item))


def _fast_item(
    vr: str | None, length: int, value: Any, fast: bool, little: bool, encoding: str
) -> dict[str, Any] | None:
    """The DICOM JSON of one element as ``_dataset_json`` makes it, or None: pydicom's."""
    if vr is None:  # implicit VR: empty and bulk values are UN, the rest is pydicom's
        return {"vr": "UN"} if length == 0 or length > BULK_LIMIT else None
    if length == 0:
        return {"vr": vr}
    if length > BULK_LIMIT:
        return {"vr": vr} if vr in _BINARY_VRS else None
    if not fast or vr == "UN":
        return None
    try:
        return _fast_value_json(value, vr, little, encoding)
    except Exception as exc:  # a badly encoded value must not lose the header
        return {"vr": vr, "error": type(exc).__name__}


# --- Sequences without pydicom ---------------------------------------------------------------
# A sequence's DICOM JSON is what ``_element_json`` makes of pydicom's conversion of each item
# element (items keep their public elements only; pixel data groups are left out). For explicit
# VR items in a plain character set the same values are decoded here from the bytes, following
# pydicom's converters (pydicom.values) value by value; anything else (implicit VR items, UN,
# a character set or escape sequence inside, odd lengths, values pydicom would warn about)
# declines and pydicom converts the sequence.

_NUM_FMT = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_NUM_SIZE = {vr: struct.calcsize("=" + code) for vr, code in _NUM_FMT.items()}
_STRING_VRS = frozenset({"AS", "CS", "DA", "DT", "TM"})  # pydicom's convert_string
_TEXT_MULTI_VRS = frozenset({"LO", "SH", "UC"})  # convert_text
_TEXT_SINGLE_VRS = frozenset({"LT", "ST", "UT"})  # convert_single_string
_ITEM_DELIM = 0xFFFEE00D


def _nested_value(vr: str, b: bytes, little: bool, encoding: str) -> dict[str, Any]:
    """``_element_json`` of pydicom's conversion of a non-empty explicit VR item value."""
    if vr in _STRING_VRS or vr == "UI":
        text = b.decode("latin-1")
        if vr == "UI":
            text = text.rstrip("\0 ")
        parts = text.rstrip(" \x00").split("\\")
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    if vr in _TEXT_MULTI_VRS or vr in _TEXT_SINGLE_VRS or vr == "PN":
        if b"\x1b" in b:
            raise _Decline  # ISO 2022 escape sequences: pydicom's decoder
        raw = b.rstrip(b"\x00 ") if vr == "PN" else b
        text = raw.decode(encoding)  # strict: a bad byte is pydicom's to replace and warn
        if vr in _TEXT_SINGLE_VRS:
            text = text.rstrip("\0 ")
            return {"vr": vr, "Value": [text]} if text else {"vr": vr}
        parts = text.split("\\")
        if vr == "PN":
            if len(parts) == 1 and not parts[0]:
                return {"vr": vr}
            return {"vr": vr, "Value": [{"Alphabetic": p} for p in parts]}
        parts = [p.rstrip("\0 ") for p in parts]
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    if vr == "AE":
        parts = [p.strip() for p in b.decode("latin-1").split("\\")]
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    if vr in ("IS", "DS"):
        text = b.decode("latin-1")
        if vr == "DS":
            text = text.strip()
        parts = text.rstrip(" \x00").split("\\")
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        if vr == "IS":
            return {"vr": vr, "Value": [int(p) for p in parts]}  # "1.0", "": pydicom's
        values = [float(p) for p in parts]
        if any(v != v or v in (float("inf"), float("-inf")) for v in values):
            raise _Decline
        return {"vr": vr, "Value": values}
    code = _NUM_FMT.get(vr)
    if code is not None:
        size = _NUM_SIZE[vr]
        if len(b) % size:
            raise _Decline
        fmt = ("<" if little else ">") + f"{len(b) // size}{code}"
        return {"vr": vr, "Value": list(struct.unpack(fmt, b))}
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW"):
        if len(b) > BULK_LIMIT:
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(b).decode()}
    if vr == "AT":
        if len(b) % 4:
            raise _Decline
        tags = struct.unpack(("<" if little else ">") + f"{len(b) // 2}H", b)
        return {
            "vr": vr,
            "Value": [f"{tags[i] << 16 | tags[i + 1]:08X}" for i in range(0, len(tags), 2)],
        }
    raise _Decline  # UN, UR, ambiguous or unknown VRs


def _native_sequence(
    data: Any, start: int, length: int, size: int, little: bool, encoding: str, depth: int = 0
) -> tuple[dict[str, Any], int]:
    """(DICOM JSON of the explicit VR sequence whose value starts at ``start``, offset after
    it); ``length`` 0xFFFFFFFF: up to the sequence delimiter."""
    if depth > 16 or _converter_options_changed():
        raise _Decline
    undefined = length == 0xFFFFFFFF
    end = size if undefined else start + length
    if end > size:
        raise _Decline
    tag_of = _TAG[little].unpack_from
    ulong = _ULONG[little].unpack_from
    hdr = _HDR[(False, little)].unpack_from
    items: list[dict[str, Any]] = []
    pos = start
    while True:
        if not undefined and pos >= end:
            if pos != end:
                raise _Decline
            break
        if pos + 8 > end:
            raise _Decline
        group, elem = tag_of(data, pos)
        ilen = ulong(data, pos + 4)[0]
        pos += 8
        tag = group << 16 | elem
        if tag == _SEQ_DELIM and undefined:
            if ilen != 0:
                raise _Decline
            break
        if tag != _ITEM:
            raise _Decline
        item_undefined = ilen == 0xFFFFFFFF
        item_end = end if item_undefined else pos + ilen
        if item_end > end:
            raise _Decline
        if pos + 6 <= item_end:  # pydicom reads an item with an implicit-looking start as such
            b0, b1 = data[pos + 4], data[pos + 5]
            if not (0x40 < b0 < 0x5B and 0x40 < b1 < 0x5B) and tag_of(data, pos) != (
                0xFFFE,
                0xE00D,
            ):
                raise _Decline
        out: dict[str, Any] = {}
        prev = -1
        while True:
            if not item_undefined and pos >= item_end:
                if pos != item_end:
                    raise _Decline
                break
            if pos + 8 > item_end:
                raise _Decline
            group, elem, vrb, vlen = hdr(data, pos)
            etag = group << 16 | elem
            if etag == _ITEM_DELIM and item_undefined:
                if vlen != 0 or vrb != b"\x00\x00":
                    raise _Decline
                pos += 8
                break
            vr = _VR_OF.get(vrb)
            if vr is None or etag <= prev or group == 0xFFFE or etag == _CHARSET_TAG:
                raise _Decline
            prev = etag
            vpos = pos + 8
            if vr in _VR32:
                if vpos + 4 > item_end:
                    raise _Decline
                vlen = ulong(data, vpos)[0]
                vpos += 4
            if vlen == 0xFFFFFFFF:
                if vr != "SQ":
                    raise _Decline
                value_json, pos = _native_sequence(
                    data, vpos, vlen, item_end, little, encoding, depth + 1
                )
                if group & 1 or group == 0x7FE0:
                    continue
            else:
                pos = vpos + vlen
                if pos > item_end:
                    raise _Decline
                if group & 1 or group == 0x7FE0:
                    continue  # private and pixel data: not in nested JSON
                if vr == "SQ":
                    value_json, seq_end = _native_sequence(
                        data, vpos, vlen, pos, little, encoding, depth + 1
                    )
                    if seq_end != pos:
                        raise _Decline
                elif vlen:
                    value_json = _nested_value(vr, bytes(data[vpos:pos]), little, encoding)
                else:
                    value_json = {"vr": vr}
            out[f"{etag:08X}"] = value_json
        items.append(out)
    return ({"vr": "SQ", "Value": items} if items else {"vr": "SQ"}), pos


def _converter_options_changed() -> bool:
    """pydicom options that change the values decoded here from their defaults."""
    cfg = pydicom.config
    return bool(
        cfg.datetime_conversion
        or cfg.use_DS_numpy
        or cfg.use_IS_numpy
        or cfg.use_DS_decimal
        or cfg.settings.reading_validation_mode == cfg.RAISE
    )


def _implicit_item(tag: int, value: bytes, little: bool, encoding: str) -> dict[str, Any] | None:
    """An implicit VR public element's JSON: pydicom converts it with the dictionary VR and
    ``_element_json`` writes it; the same done here for unambiguous plain VRs (else None)."""
    try:
        vr = str(_dictionary_vr_fast(tag))
    except KeyError:
        return None
    if vr in ("SQ", "UN") or " " in vr:  # sequences, unknown, ambiguous ("US or SS")
        return None
    try:
        return _nested_value(vr, bytes(value), little, encoding)
    except (_Decline, ValueError, struct.error):
        return None


def _try_native_sequence(
    data: Any, vpos: int, length: int, end: int, little: bool, encoding: str
) -> dict[str, Any] | None:
    """:func:`_native_sequence` of a defined-length sequence, or None: pydicom converts it."""
    try:
        item, stop = _native_sequence(data, vpos, length, end, little, encoding)
    except (_Decline, ValueError, struct.error):  # (UnicodeDecodeError is a ValueError)
        return None
    return item if stop == end else None


def _undefined_length(
    fh: Any,
    data: Any,
    size: int,
    tag: int,
    vr: str | None,
    vpos: int,
    implicit: bool,
    little: bool,
    ts: Any,
    raws: list[tuple[int, str | None, int, Any, int]],
    encoding: Any,
) -> int:
    """An undefined-length element (a sequence, or encapsulated pixel data): recorded in
    ``raws`` as pydicom's generator yields it; returns the offset after it."""
    if vr == "UN" and pydicom.config.settings.infer_sq_for_un_vr:
        vr = "SQ"
    if vr is None:
        try:
            vr = str(_dictionary_vr_fast(tag))
        except KeyError:
            if vpos + 4 <= size and _TAG[little].unpack_from(data, vpos) == (0xFFFE, 0xE000):
                vr = "SQ"
    if vr == "SQ":
        fh.seek(vpos)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seq = read_sequence(fh, implicit, little, 0xFFFFFFFF, encoding)
        end = fh.tell()
        if caught or end > size:
            raise _Decline
        raws.append(
            (tag, vr, -1, DataElement(BaseTag(tag), vr, seq, vpos, is_undefined_length=True), vpos)
        )
        return end
    if tag >> 16 != 0x7FE0 or not ts.is_compressed:
        raise _Decline
    # Encapsulated pixel data: walk the fragments to the sequence delimiter.
    tag_of = _TAG[little].unpack_from
    ulong = _ULONG[little].unpack_from
    pos = vpos
    while True:
        if pos + 8 > size:
            raise _Decline
        group, elem = tag_of(data, pos)
        item = group << 16 | elem
        if item == _SEQ_DELIM:
            break
        if item != _ITEM:
            raise _Decline
        pos += 8 + ulong(data, pos + 4)[0]
    # pydicom keeps the value when it is shorter than the deferral size
    value = data[vpos:pos] if pos - vpos + 4 < BULK_LIMIT else None
    raws.append((tag, vr, 0xFFFFFFFF, value, vpos))
    return pos + 8


def _context_tag(tag: int) -> bool:
    """Elements pydicom may consult when it converts another one: the character set, private
    creators (private VRs), and what ambiguous VRs are resolved with (pixel representation,
    bits allocated, LUT descriptor, pixel data, waveform bits)."""
    group = tag >> 16
    return (
        tag == _CHARSET_TAG
        or group in (0x0028, 0x5400)
        or tag == 0x7FE00010
        or (group & 1 == 1 and 0x0010 <= tag & 0xFFFF <= 0x00FF)
    )


def _raw_dataset(
    raws: list[tuple[int, str | None, int, Any, int]],
    pending: list[int],
    implicit: bool,
    little: bool,
    encoding: Any,
) -> Dataset:
    """The data set pydicom's reader would have made of these raw elements, limited to the
    ``pending`` ones and those their conversion may consult (:func:`_context_tag`)."""
    wanted = set(pending)
    elems: dict[BaseTag, Any] = {}
    for tag, vr, length, value, tell in raws:
        if tag not in wanted and not _context_tag(tag):
            continue
        btag = BaseTag(tag)
        if length == -1:
            elems[btag] = value  # an undefined-length sequence, already read
        else:
            if length == 0:
                value = empty_value_for_VR(vr, raw=True)  # as pydicom's reader stores it
            elif value is not None and not isinstance(value, bytes):
                value = bytes(value)
            elems[btag] = RawDataElement(btag, vr, length, value, tell, implicit, little)
    ds = Dataset(elems, parent_encoding=default_encoding)
    ds.set_original_encoding(implicit, little, encoding)
    ds.set_original_encoding(implicit, little, ds._character_set)
    return ds


def _item_value(item: Any) -> Any:
    """The first value of a DICOM JSON element (all values when several; PN: Alphabetic)."""
    if not isinstance(item, dict):
        return None
    vals = item.get("Value")
    if not vals:
        return None
    if item.get("vr") == "PN":
        return vals[0].get("Alphabetic") if isinstance(vals[0], dict) else vals[0]
    return vals if len(vals) > 1 else vals[0]


def _column_value(col: str, item: Any) -> Any:
    value = _item_value(item)
    return _int(value) if col in INT_COLS else _text(value)


def _qido_value(obj: dict[str, Any], keyword: str) -> Any:
    tag = TAG_OF[keyword]
    return _item_value(obj.get(f"{tag:08X}") or obj.get(f"{tag:08x}"))


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


def _insert(store: Store, rows: list[tuple[Any, ...]]) -> None:
    """Append raw header rows (tuples in ``COLUMNS`` order) as one Arrow batch."""
    import pyarrow as pa

    cols = list(zip(*rows, strict=True))
    batch = pa.table(
        {
            name: pa.array(col, type=pa.int32() if name in INT_COLS else pa.string())
            for name, col in zip(COLUMNS, cols, strict=True)
        }
    )
    store.insert_arrow(TABLE, batch)


# One process reads ~5,000 plain headers/s; a pool of forked workers costs ~30 ms of CPU to
# start and stop, so it pays from a few hundred files on.
POOL_MIN_FILES = 512
INSERT_BATCH = 1024  # raw rows per Arrow insert (inserts overlap the workers' parsing)


def _workers() -> int:
    try:
        return max(0, int(os.environ.get("TWIN_DICOM_WORKERS", "2")))
    except ValueError:
        return 2


def _read_one(path: Path, rel: str) -> list[tuple[str, Any]]:
    """The records of one landed file (picklable: runs in worker processes): (position,
    BadDicom or (row, header JSON, private JSON, source format, record hash))."""
    reader = DicomReader()
    if rel.lower().endswith(".json"):
        records = reader._qido_path(path)
    else:
        records = [reader._part10_path(path)]
    return [
        (pos, r if isinstance(r, BadDicom) else (*r, hashlib.sha256(r[1].encode()).hexdigest()))
        for pos, r in records
    ]


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
        reads = self._iter_read(files)
        try:
            for f, records in zip(files, reads, strict=True):
                fs = stats.file(f.rel)
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
                    row, header, private, fmt, rh = result
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
                if len(out) >= INSERT_BATCH:
                    _insert(store, out)
                    out = []
        finally:
            reads.close()  # a failed insert stops the worker pool now, not at garbage collection
        if out:
            _insert(store, out)
        store.quarantine(bad)
        return stats

    def _read_all(self, files: Sequence[SourceFile]) -> list[list[tuple[str, Any]]]:
        """The records of every file, in order (see :meth:`_iter_read`)."""
        return list(self._iter_read(files))

    def _iter_read(self, files: Sequence[SourceFile]) -> Generator[list[tuple[str, Any]]]:
        """Parse every file, yielding each file's records in order: in this process for small
        batches, in a pool of worker processes (``TWIN_DICOM_WORKERS``, default 2; 0 or 1: one
        process) from ``POOL_MIN_FILES`` files on, so the caller's store inserts overlap the
        parsing. The pool starts once per load and ends with it (forked workers must not
        outlive the run: they hold the parent's file locks). Workers are forked (a fork server
        or spawn would re-import the caller's ``__main__``, which breaks scripts without a main
        guard and ``python -`` input); they only parse files (no store access). A pool that
        cannot start or breaks falls back to one process for the files not read yet."""
        workers = _workers()
        if workers < 2 or len(files) < POOL_MIN_FILES:
            for f in files:
                yield _read_one(f.path, f.rel)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        done = 0
        try:
            ctx = multiprocessing.get_context("fork")
            from twin_pipeline.procs import freeze_for_fork, unfreeze_after_pool, worker_init

            freeze_for_fork()  # the workers share the parent's pages instead of copying them
            try:
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_init) as pool:
                    chunk = max(16, min(256, len(files) // (workers * 8)))
                    for records in pool.map(
                        _read_one,
                        [f.path for f in files],
                        [f.rel for f in files],
                        chunksize=chunk,
                    ):
                        yield records
                        done += 1
            finally:
                unfreeze_after_pool()
        except (OSError, RuntimeError, ValueError) as exc:  # no pool here: one process
            warnings.warn(
                f"DICOM worker pool unavailable ({exc}); reading in one process", stacklevel=2
            )
            for f in files[done:]:
                yield _read_one(f.path, f.rel)

    def _part10_path(self, path: Path) -> tuple[str, Any]:
        with warnings.catch_warnings():
            # pydicom warns on every non-conformant value; the header is kept as found.
            warnings.simplefilter("ignore")
            return self._part10_quiet(path)

    def _part10_quiet(self, path: Path) -> tuple[str, Any]:
        try:
            fast = fast_part10(path)
            if fast is not None:
                _check_pixel_length(fast.pixel_length, fast.ts, fast.public)
                header, private_text, row = fast.public_text, fast.private_text, fast.row
            else:
                ds, ts = read_part10(path)
                public, private = _json_dicts(ds)
                _check_native_pixels(ds, ts, public)
                header = json.dumps(public, sort_keys=True)
                private_text = json.dumps(private, sort_keys=True) if private else None
                # The columns come from the DICOM JSON just made (no second conversion).
                row = qido_row(public)
                row["transfer_syntax_uid"] = str(ts) if ts else None
            missing = [kw for col, kw in FIELDS[:4] if col != "sop_class_uid" and not row.get(col)]
            if missing:
                raise BadDicom("missing_uid", f"header lacks {', '.join(missing)}")
            return "file", (row, header, private_text, "part10")
        except BadDicom as exc:
            return "file", exc
        except Exception as exc:  # malformed headers raise many types deep inside pydicom
            return "file", BadDicom(
                "unreadable_dicom", f"header cannot be decoded ({type(exc).__name__}: {exc})"[:500]
            )

    def _qido_path(self, path: Path) -> list[tuple[str, Any]]:
        try:
            doc = json.loads(path.read_bytes().decode("utf-8-sig"))
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
            try:
                row = qido_row(obj)
                # text values must be encodable (JSON escapes can hold lone surrogates)
                for value in row.values():
                    if isinstance(value, str):
                        value.encode()
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
                out.append(
                    (pos, BadDicom("broken_json", f"entry is not valid DICOM JSON ({exc})"[:500]))
                )
                continue
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
