"""Reading DICOM image series: headers, classification, slice order and physical units."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pydicom
import pydicom.errors

from data_pipeline import dicom_scan
from data_pipeline import fast_paths as fast_paths_lib
from data_pipeline.vocabulary import IMAGE_MODALITIES

# Cosines closer than this are treated as the same orientation (about 0.06 degrees).
_ORIENTATION_TOLERANCE = 1e-3


class InputProblem(Exception):
    """A problem with the input data; ``str(e)`` is one line naming the file and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):  # pickled between ingest's worker processes
        return type(self), (self.path, self.reason)


@dataclasses.dataclass(frozen=True)
class Header:
    """What ingest needs to know about one DICOM file, read without its pixels."""

    path: str
    modality: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_id: str
    description: str
    has_pixels: bool
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    sequence: str | None
    # Stored value -> physical units: value * rescale_slope + rescale_intercept, times
    # units_factor (the SUV factor for PET in Bq/ml, else 1).
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    units: str = ""
    units_factor: float = 1.0
    # Where plain little-endian integer pixels lie in the file, so they are read without parsing
    # the file again; None when pydicom must decode them (compressed, packed, several frames).
    pixel_offset: int | None = None
    pixel_dtype: str | None = None


@dataclasses.dataclass
class Series:
    """One image series in physical units, slices sorted along the slice normal (ascending).

    Attributes:
      pixels: float32 (slices, rows, cols): CT in HU, PET in SUV (body weight), MR as stored.
      positions: float64 (slices, 3) ImagePositionPatient of each slice, in the sorted order.
      orientation: float64 (6,) ImageOrientationPatient: row direction cosines, then column ones.
      pixel_spacing: float64 (2,) DICOM PixelSpacing: (spacing between rows, between columns) in mm.
      sop_instance_uids: SOPInstanceUID of each slice, in the sorted order.
      units: 'HU', 'SUV', 'SUV_GML' (stored as SUV already), 'BQML' (SUV not computable) or 'MR'.
    """

    pixels: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    sop_instance_uids: tuple[str, ...]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sequence: str | None
    patient_id: str
    description: str
    units: str
    files: tuple[str, ...]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (3,), row cosines x column cosines."""
        return slice_normal(self.orientation)

    @property
    def slice_coords(self) -> np.ndarray:
        """Position of each slice along the normal, mm, ascending (slices,)."""
        return self.positions @ self.normal

    @property
    def slice_spacing(self) -> float:
        """Median distance between neighbouring slices along the normal (mm); 0 for one slice."""
        coords = self.slice_coords
        return float(np.median(np.diff(coords))) if len(coords) > 1 else 0.0

    @property
    def domain(self) -> str:
        """The modality name used for domains: CT, PT, or the MR sequence (T1, T2, STIR)."""
        return self.sequence if self.modality == "MR" and self.sequence else self.modality


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from ImageOrientationPatient (6,)."""
    cosines = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(cosines[:3], cosines[3:])
    return normal / np.linalg.norm(normal)


# Value representations whose bytes are plain ASCII, whatever the character set.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
# Text whose bytes, when all ASCII, read the same in every DICOM character set (ISO 2022 escapes
# are not ASCII-only text, UTF-8 and the GB encodings extend ASCII).
_RAW_TEXT_VRS = _ASCII_VRS | {"LO", "SH"}


def _raw_ascii(ds: pydicom.Dataset, keyword: str) -> str | None:
    """An ASCII-valued element of a scanned header read from its undecoded bytes; None where that
    does not apply (a pydicom Dataset, another VR, text in the file's character set).

    pydicom validates and converts every value it is asked for (a DS triplet becomes three DSfloat
    objects), which costs more per file than parsing the header; UIDs, codes and decimal strings
    need none of that.
    """
    if not isinstance(ds, dicom_scan.ScannedHeader):
        return None
    tag, vr = _keyword_tag_vr(keyword)
    if tag is None or tag not in ds or vr not in _RAW_TEXT_VRS:
        return None
    element = ds.get_item(tag)
    if not isinstance(element, pydicom.dataelem.RawDataElement) or element.value is None:
        return None
    if vr not in _ASCII_VRS and not element.value.isascii():
        return None  # text in the file's character set: pydicom decodes it
    return element.value.decode("ascii", "replace").strip(" \x00")


@functools.cache
def _keyword_tag_vr(keyword: str) -> tuple[int | None, str | None]:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return tag, None if tag is None else pydicom.datadict.dictionary_VR(tag)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    raw = _raw_ascii(ds, keyword)
    if raw is not None:
        return raw
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).strip(" \x00")
    return str(value).strip(" \x00") if value is not None else ""


def _float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = _raw_ascii(ds, keyword)
    if value is None:
        value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def classify_mr_sequence(ds: pydicom.Dataset) -> str | None:
    """T1, T2 (T2FS included) or STIR for an MR dataset, None when nothing says which.

    The series description is read first (TCIA's are inconsistent but name the weighting), then the
    timing parameters: an inversion time of 80-250 ms is STIR (fat nulled at 1.5-3 T), short TE and
    TR is T1 weighted, long TE and TR is T2 weighted.
    """
    description = " ".join(
        _text(ds, k) for k in ("SeriesDescription", "ProtocolName", "SequenceName")
    )
    description = description.upper()
    if "STIR" in description or re.search(r"\bTIRM\b", description):
        return "STIR"
    if re.search(r"T2", description):
        return "T2"
    if re.search(r"T1", description):
        return "T1"
    inversion_ms = _float(ds, "InversionTime")
    echo_ms = _float(ds, "EchoTime")
    repetition_ms = _float(ds, "RepetitionTime")
    scanning = _text(ds, "ScanningSequence").upper()
    if inversion_ms is not None and 80 <= inversion_ms <= 250 and "IR" in scanning:
        return "STIR"
    if echo_ms is not None and repetition_ms is not None:
        if echo_ms <= 30 and repetition_ms <= 1000:
            return "T1"
        if echo_ms >= 60 and repetition_ms >= 1500:
            return "T2"
    return None


_HEADER_TAGS = (
    "SOPInstanceUID",
    "Modality",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "PatientID",
    "SeriesDescription",
    "ProtocolName",
    "SequenceName",
    "ScanningSequence",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    # What turning the stored pixels into physical units needs, so that ingest reads each file's
    # header once and its pixels straight from the file (see _stored_pixels).
    "SamplesPerPixel",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "Units",
    "DecayCorrection",
    "PatientWeight",
    "SeriesDate",
    "SeriesTime",
    "RadiopharmaceuticalInformationSequence",
)


# As tags: pydicom would look every keyword up again for every file.
_HEADER_TAG_NUMBERS = [pydicom.tag.Tag(keyword) for keyword in _HEADER_TAGS]
# What data_pipeline.dicom_scan keeps of each header (the fast path).
_SCAN_TAGS = frozenset(int(tag) for tag in _HEADER_TAG_NUMBERS)


def read_header(path: str | os.PathLike, fast_paths: bool | None = None) -> Header:
    """Reads one file's header (no pixels).

    Args:
      path: the file.
      fast_paths: scan the header with data_pipeline.dicom_scan and locate plain pixels for numpy
        (True), or read it with pydicom only, its pixels later with ``pixel_array`` (False); None:
        as ``$SARCOMA_JAX_FAST_PATHS`` says (data_pipeline.fast_paths).

    Raises:
      InputProblem: the file is not DICOM, is truncated, or lacks the attributes ingest needs.
    """
    path = str(path)
    fast = fast_paths_lib.enabled(fast_paths)
    try:
        ds = dicom_scan.scan_header(path, _SCAN_TAGS) if fast else None
        if ds is None:
            # Only the attributes read below are converted; values over 4 KiB (the pixels) are
            # left unread, their length and offset still known.
            ds = pydicom.dcmread(path, defer_size=4096, specific_tags=_HEADER_TAG_NUMBERS)
    except pydicom.errors.InvalidDicomError:
        raise InputProblem(path, "not a DICOM file (no DICM preamble)") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputProblem(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if "SOPInstanceUID" not in ds or "Modality" not in ds:
        raise InputProblem(path, "not a DICOM composite object (no SOPInstanceUID or Modality)")
    modality = _text(ds, "Modality").upper()
    has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
    _check_not_truncated(path, ds)
    position = orientation = spacing = None
    units, units_factor = {"CT": ("HU", 1.0), "MR": ("MR", 1.0)}.get(modality, ("", 1.0))
    if modality == "PT":
        factor, units = suv_factor(ds)
        units_factor = 1.0 if factor is None else factor
    try:
        pixel_offset, pixel_dtype = _plain_pixel_location(ds)
    except (TypeError, ValueError) as e:
        raise InputProblem(path, f"malformed image attributes ({e})") from None
    if not fast:  # pydicom decodes the pixels (pixel_array)
        pixel_offset = pixel_dtype = None
    if modality in IMAGE_MODALITIES and has_pixels:
        try:
            position, orientation, spacing = (
                tuple(float(v) for v in _text(ds, keyword).split("\\"))
                for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            )
        except (AttributeError, TypeError, ValueError):
            raise InputProblem(
                path, "image without ImagePositionPatient/ImageOrientationPatient/PixelSpacing"
            ) from None
        if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
            raise InputProblem(path, "malformed image geometry attributes")
    return Header(
        path=path,
        modality=modality,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        patient_id=_text(ds, "PatientID"),
        description=_text(ds, "SeriesDescription"),
        has_pixels=has_pixels,
        position=position,
        orientation=orientation,
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        pixel_spacing=spacing,
        sequence=classify_mr_sequence(ds) if modality == "MR" else None,
        rescale_slope=_float(ds, "RescaleSlope") or 1.0,
        rescale_intercept=_float(ds, "RescaleIntercept") or 0.0,
        units=units,
        units_factor=units_factor,
        pixel_offset=pixel_offset,
        pixel_dtype=pixel_dtype,
    )


def _check_not_truncated(path: str, ds: pydicom.Dataset) -> None:
    """Raises when the file ends before its pixel data does (an interrupted copy or download).

    ``ds`` must come from a deferred read (``defer_size``), so that the pixel data element is
    still raw: its length and file offset are known without reading the pixels.
    """
    if "PixelData" not in ds:
        return
    raw = ds.get_item(0x7FE00010, keep_deferred=True)  # (7FE0,0010) Pixel Data, still raw
    length = getattr(raw, "length", None)
    offset = getattr(raw, "value_tell", None)
    if length is None or offset is None or length == 0xFFFFFFFF:  # encapsulated: undefined length
        return
    size = os.path.getsize(path)
    if size < offset + length:
        raise InputProblem(
            path, f"truncated: the file ends at byte {size}, its pixel data at {offset + length}"
        )


def _parse_dicom_datetime(date: str, time: str) -> datetime.datetime | None:
    """DICOM DA + TM (or a DT when ``date`` holds one) -> datetime, None when absent/malformed."""
    text = (date or "") + (time or "")
    text = text.split("+")[0].split("-")[0] if len(text) > 8 else text
    for fmt in ("%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S", "%Y%m%d%H%M"):
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def suv_factor(ds: pydicom.Dataset) -> tuple[float | None, str]:
    """Multiplier from Bq/ml to body-weight SUV (g/ml), with decay correction to the scan start.

    Returns:
      (factor, units): factor None when the values are already SUV (Units GML) or SUV cannot be
      computed (units then says what the values are).
    """
    units = _text(ds, "Units").upper()
    if units == "GML":
        return None, "SUV_GML"
    if units != "BQML":
        return None, units or "UNKNOWN"
    weight_kg = _float(ds, "PatientWeight")
    info = ds.get("RadiopharmaceuticalInformationSequence")
    if not weight_kg or not info:
        return None, "BQML"
    drug = info[0]
    dose_bq = _float(drug, "RadionuclideTotalDose")
    half_life_s = _float(drug, "RadionuclideHalfLife")
    if not dose_bq or not half_life_s:
        return None, "BQML"
    injection = _parse_dicom_datetime(_text(drug, "RadiopharmaceuticalStartDateTime"), "")
    if injection is None:
        injection = _parse_dicom_datetime(
            _text(ds, "SeriesDate"), _text(drug, "RadiopharmaceuticalStartTime")
        )
    # DecayCorrection START: the image values are decay corrected to the series start.
    scan = _parse_dicom_datetime(_text(ds, "SeriesDate"), _text(ds, "SeriesTime"))
    decay = 1.0
    if (
        injection is not None
        and scan is not None
        and _text(ds, "DecayCorrection").upper() != "ADMIN"
    ):
        elapsed_s = (scan - injection).total_seconds()
        decay = math.exp(-math.log(2.0) * elapsed_s / half_life_s)
    return weight_kg * 1000.0 / (dose_bq * decay), "SUV"


def _plain_pixel_location(ds: pydicom.Dataset) -> tuple[int | None, str | None]:
    """(file offset, numpy dtype) of a header's pixels when they are plain little-endian integers.

    Reading such pixels straight from the file with numpy costs a fraction of parsing the file a
    second time with pydicom, which is what makes ingest run near the speed of a bare read loop.
    ``ds`` must be a deferred read, so that the pixel data element is still raw.
    """
    raw = ds.get_item(0x7FE00010, keep_deferred=True)  # (7FE0,0010) Pixel Data
    if not isinstance(raw, pydicom.dataelem.RawDataElement) or raw.value is not None:
        return None, None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    plain = (
        syntax is not None
        and not syntax.is_compressed
        and syntax.is_little_endian
        and bits in (8, 16, 32)
        and int(ds.get("BitsStored", bits) or bits) == bits
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and raw.length >= int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * bits // 8
    )
    if not plain:
        return None, None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return int(raw.value_tell), f"<{'i' if signed else 'u'}{bits // 8}"


def _physical_values(header: Header) -> np.ndarray:
    """One slice's pixels in physical units, float64 (rows, cols)."""
    path = header.path
    try:
        if header.pixel_dtype is not None:
            count = header.rows * header.columns
            stored = np.fromfile(path, header.pixel_dtype, count=count, offset=header.pixel_offset)
            if stored.size < count:
                raise InputProblem(path, "truncated: pixel data shorter than Rows x Columns")
            stored = stored.reshape(header.rows, header.columns)
        else:
            stored = pydicom.dcmread(path).pixel_array
    except InputProblem:
        raise
    except Exception as e:  # pydicom raises many types for broken or missing pixel data.
        raise InputProblem(path, f"pixel data unreadable ({type(e).__name__}: {e})") from None
    if stored.shape != (header.rows, header.columns):
        raise InputProblem(
            path, f"expected a single-frame greyscale image, got shape {stored.shape}"
        )
    values = stored * header.rescale_slope + header.rescale_intercept
    return values * header.units_factor if header.units_factor != 1.0 else values


def load_series(folder_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> Series:
    """Loads one image series in physical units, sorted along the slice normal.

    Args:
      folder_or_files: a folder holding the series' files (files that are not images, such as
        RTSTRUCTs or notes beside them, are ignored), or the list of its files.

    Returns:
      The Series.

    Raises:
      InputProblem: no image files, several series, inconsistent geometry, unreadable pixels.
    """
    if isinstance(folder_or_files, (str, os.PathLike)):
        folder = str(folder_or_files)
        if not os.path.isdir(folder):
            raise InputProblem(folder, "no such folder")
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
        )
    else:
        files = sorted(str(f) for f in folder_or_files)
        folder = os.path.commonpath(files) if files else None
    headers = []
    for path in files:
        try:
            header = read_header(path)
        except InputProblem as problem:
            if problem.reason.startswith("not a DICOM"):
                continue
            raise
        if header.modality in IMAGE_MODALITIES and header.has_pixels:
            headers.append(header)
    if not headers:
        raise InputProblem(folder, "no DICOM image files (CT, PT or MR with pixels)")
    series_uids = {h.series_instance_uid for h in headers}
    if len(series_uids) > 1:
        raise InputProblem(folder, f"holds {len(series_uids)} series; pass one series' files")
    return load_series_from_headers(headers)


def load_series_from_headers(headers: Sequence[Header]) -> Series:
    """Loads one series from its files' headers (``read_header``), reading only the pixels.

    Raises:
      InputProblem: inconsistent geometry or sizes, two slices at one position, unreadable pixels.
    """
    first = headers[0]
    orientation = np.array(first.orientation)
    normal = slice_normal(orientation)
    for header in headers:
        if np.abs(np.array(header.orientation) - orientation).max() > _ORIENTATION_TOLERANCE:
            raise InputProblem(header.path, "slice orientation differs from the rest of its series")
    shapes = {(h.rows, h.columns) for h in headers}
    if len(shapes) > 1:
        raise InputProblem(first.path, f"slices of one series differ in size: {sorted(shapes)}")
    positions = np.array([h.position for h in headers])
    coords = positions @ normal
    order = np.argsort(coords, kind="stable")
    sorted_coords = coords[order]
    if len(coords) > 1 and np.min(np.diff(sorted_coords)) < 1e-3:
        duplicate = headers[order[int(np.argmin(np.diff(sorted_coords))) + 1]].path
        raise InputProblem(duplicate, "two slices of one series at the same position")
    pixels = np.empty((len(headers),) + shapes.pop(), np.float32)
    for out_index, in_index in enumerate(order):
        pixels[out_index] = _physical_values(headers[in_index])
    return Series(
        pixels=pixels,
        positions=positions[order],
        orientation=orientation,
        pixel_spacing=np.array(first.pixel_spacing),
        sop_instance_uids=tuple(headers[i].sop_instance_uid for i in order),
        series_instance_uid=first.series_instance_uid,
        study_instance_uid=first.study_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        modality=first.modality,
        sequence=first.sequence,
        patient_id=first.patient_id,
        description=first.description,
        units=first.units,
        files=tuple(headers[i].path for i in order),
    )
