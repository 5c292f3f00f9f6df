"""Reading one DICOM file's header: classification, physical units, every value checked.

read_header reads a header with data_pipeline.dicom_scan (the fast path) or pydicom, without the
pixels, and keeps what ingest needs once each value has passed data_pipeline.dicom_rules.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import re
import warnings

import pydicom
import pydicom.errors

from data_pipeline import dicom_rules, dicom_scan
from data_pipeline import fast_paths as fast_paths_lib
from data_pipeline.dicom_rules import InputProblem
from data_pipeline.vocabulary import IMAGE_MODALITIES


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
    """A number to classify by (timings): None when absent or not a finite number."""
    try:
        value = _raw_ascii(ds, keyword)
        if value is None:
            value = ds.get(keyword)
        number = None if value is None or value == "" else float(value)
    except Exception:  # pydicom raises several types for a malformed value; none is needed here
        return None
    return number if number is not None and math.isfinite(number) else None


def _value(ds: pydicom.Dataset, keyword: str):
    """An attribute's value as pydicom converts it (None when absent); Malformed when pydicom
    cannot convert it."""
    try:
        return ds.get(keyword)
    except Exception as e:  # pydicom's converters raise several types for malformed values
        raise dicom_rules.Malformed(
            f"{keyword} unreadable ({type(e).__name__}: {dicom_rules.one_line(e)})"
        ) from None


def _decimal(ds: pydicom.Dataset, keyword: str) -> float | None:
    """A single DS/FD value: None when absent or empty, Malformed when not one finite number."""
    raw = _raw_ascii(ds, keyword)
    if raw is None:
        try:
            raw = _text(ds, keyword)
        except Exception as e:  # pydicom's DS converter raises for a malformed string
            raise dicom_rules.Malformed(
                f"{keyword} unreadable ({type(e).__name__}: {dicom_rules.one_line(e)})"
            ) from None
    return dicom_rules.decimals(raw, keyword, 1)[0] if raw else None


def _decimals(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...]:
    """A required multi-valued DS: exactly ``count`` finite numbers, else Malformed."""
    try:
        text = _text(ds, keyword)
    except Exception as e:  # pydicom's DS converter raises for a malformed string
        raise dicom_rules.Malformed(
            f"{keyword} unreadable ({type(e).__name__}: {dicom_rules.one_line(e)})"
        ) from None
    if not text:
        raise dicom_rules.Malformed(f"{keyword} is missing")
    return dicom_rules.decimals(text, keyword, count)


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
    """Reads one file's header (no pixels), each value it keeps checked by dicom_rules.

    Args:
      path: the file.
      fast_paths: scan the header with data_pipeline.dicom_scan and locate plain pixels for numpy
        (True), or read it with pydicom only, its pixels later with ``pixel_array`` (False); None:
        as ``$SARCOMA_JAX_FAST_PATHS`` says (data_pipeline.fast_paths).

    Raises:
      InputProblem: the file is not a regular file, not DICOM, truncated or malformed, or lacks
        the attributes ingest needs; the reason is one line.
    """
    path = str(path)
    fast = fast_paths_lib.enabled(fast_paths)
    size = dicom_rules.regular_file(path).st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about a bad file: ours are one line
        return _read_header(path, fast, size)


def _read_header(path: str, fast: bool, size: int) -> Header:
    try:
        ds = dicom_scan.scan_header(path, _SCAN_TAGS) if fast else None
        if ds is None:
            # Only the attributes read below are converted; values over 4 KiB (the pixels) are
            # left unread, their length and offset still known.
            ds = pydicom.dcmread(path, defer_size=4096, specific_tags=_HEADER_TAG_NUMBERS)
    except pydicom.errors.InvalidDicomError:
        raise InputProblem(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as e:  # pydicom's reader raises many types for a malformed file
        raise InputProblem(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if "SOPInstanceUID" not in ds or "Modality" not in ds:
        raise InputProblem(path, "not a DICOM composite object (no SOPInstanceUID or Modality)")
    try:
        modality = _text(ds, "Modality").upper()
    except Exception as e:  # pydicom's text converters raise for undecodable bytes
        raise InputProblem(path, f"unreadable Modality ({type(e).__name__}: {e})") from None
    try:
        _check_element_lengths(ds, size)
        return _checked_header(path, ds, modality, fast, size)
    except dicom_rules.Malformed as e:
        raise InputProblem(path, str(e), modality) from None
    except InputProblem:
        raise
    except Exception as e:  # a value pydicom could not convert, whichever attribute it was
        raise InputProblem(path, f"unreadable DICOM ({type(e).__name__}: {e})", modality) from None


def _check_element_lengths(ds, size: int) -> None:
    """No element of a pydicom read may claim more bytes than the file holds (pydicom reads such
    a value to the end of the file, swallowing the elements after it; the scanner refuses them)."""
    if isinstance(ds, dicom_scan.ScannedHeader):
        return
    deflated = _transfer_syntax(ds) == _DEFLATED  # offsets count inflated bytes
    for tag in list(ds.keys()):
        if tag in _PIXEL_DATA_TAGS:  # _check_pixel_data says "truncated" for those
            continue
        element = ds.get_item(tag, keep_deferred=True)  # as read: neither converted nor loaded
        length = getattr(element, "length", None)
        if length is None or length == 0xFFFFFFFF:
            continue
        value = getattr(element, "value", None)
        if value is None and not deflated:
            short = element.value_tell + length > size
        else:
            short = isinstance(value, bytes) and len(value) < length
        if short:
            name = pydicom.datadict.keyword_for_tag(element.tag) or str(
                pydicom.tag.Tag(element.tag)
            )
            raise dicom_rules.Malformed(
                f"{name} claims {length} bytes, past the end of the file ({size} bytes)"
            )


def _checked_header(path: str, ds, modality: str, fast: bool, size: int) -> Header:
    """The Header of a read dataset; Malformed names the first value that breaks a rule."""
    has_pixels = "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
    image = modality in IMAGE_MODALITIES and has_pixels
    common = dict(
        path=path,
        modality=modality,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        patient_id=_text(ds, "PatientID"),
        description=_text(ds, "SeriesDescription"),
        has_pixels=has_pixels,
    )
    if modality in IMAGE_MODALITIES and not has_pixels:
        # An image without pixel data is reported as such; unless an element before it claimed
        # them (a Rows of length 0xFFFFFFF0 read to the end of the file): then that is why.
        for keyword in ("Rows", "Columns"):
            if _value(ds, keyword) is not None:
                dicom_rules.integer(_value(ds, keyword), keyword, 1, 0xFFFF)
    if not image:
        return Header(
            **common,
            position=None,
            orientation=None,
            rows=None,
            columns=None,
            pixel_spacing=None,
            sequence=None,
        )
    rows = dicom_rules.integer(_value(ds, "Rows"), "Rows", 1, 0xFFFF)
    columns = dicom_rules.integer(_value(ds, "Columns"), "Columns", 1, 0xFFFF)
    samples = _optional_integer(ds, "SamplesPerPixel", 1, 1, 4)
    if samples != 1:
        raise dicom_rules.Malformed(f"not a greyscale image (SamplesPerPixel {samples})")
    frames = _optional_integer(ds, "NumberOfFrames", 1, 1, 2**31 - 1)
    if frames != 1:
        raise dicom_rules.Malformed(
            f"{frames} frames in one file: only single-frame images are read"
        )
    default_bits = 32 if "FloatPixelData" in ds else 64 if "DoubleFloatPixelData" in ds else None
    if default_bits is None:
        bits = dicom_rules.integer(_value(ds, "BitsAllocated"), "BitsAllocated", 1, 64)
    else:
        bits = _optional_integer(ds, "BitsAllocated", default_bits, 1, 64)
    if bits not in dicom_rules.BITS_ALLOCATED:
        raise dicom_rules.Malformed(
            f"BitsAllocated {bits} is not one of {dicom_rules.BITS_ALLOCATED}"
        )
    bits_stored = _optional_integer(ds, "BitsStored", bits, 1, bits)
    signed = _optional_integer(ds, "PixelRepresentation", 0, 0, 1) == 1
    syntax = _transfer_syntax(ds)
    if syntax is not None and not _native_syntax(syntax):
        dicom_rules.decodable(syntax)
    _check_pixel_data(ds, size, syntax, rows, columns, bits)
    slope, intercept = dicom_rules.rescale(
        _decimal(ds, "RescaleSlope"), _decimal(ds, "RescaleIntercept")
    )
    units, units_factor = {"CT": ("HU", 1.0), "MR": ("MR", 1.0)}.get(modality, ("", 1.0))
    if modality == "PT":
        factor, units = suv_factor(ds)
        units_factor = 1.0 if factor is None else factor
    pixel_offset = pixel_dtype = None
    if fast and bits_stored == bits:  # else pydicom decodes the pixels (pixel_array)
        pixel_offset, pixel_dtype = _plain_pixel_location(ds, syntax, bits, signed)
    return Header(
        **common,
        position=dicom_rules.position(_decimals(ds, "ImagePositionPatient", 3)),
        orientation=dicom_rules.orientation(_decimals(ds, "ImageOrientationPatient", 6)),
        rows=rows,
        columns=columns,
        pixel_spacing=dicom_rules.pixel_spacing(_decimals(ds, "PixelSpacing", 2)),
        sequence=classify_mr_sequence(ds) if modality == "MR" else None,
        rescale_slope=slope,
        rescale_intercept=intercept,
        units=units,
        units_factor=units_factor,
        pixel_offset=pixel_offset,
        pixel_dtype=pixel_dtype,
    )


def _optional_integer(ds, keyword: str, default: int, low: int, high: int) -> int:
    value = _value(ds, keyword)
    return (
        default if value is None or value == "" else dicom_rules.integer(value, keyword, low, high)
    )


@functools.lru_cache(maxsize=64)
def _native_syntax(syntax: str) -> bool:
    """A known transfer syntax of uncompressed pixels (pydicom works its properties out again on
    every access; a header reads them several times)."""
    uid = pydicom.uid.UID(syntax)
    return uid.is_transfer_syntax and not uid.is_compressed


@functools.lru_cache(maxsize=64)
def _plain_syntax(syntax: str) -> bool:
    """Pixels numpy reads as they lie: native, little endian, not deflated."""
    uid = pydicom.uid.UID(syntax)
    return _native_syntax(syntax) and uid.is_little_endian and uid != _DEFLATED


def _transfer_syntax(ds) -> pydicom.uid.UID | None:
    """The file's TransferSyntaxUID; None when the file has no file meta (pydicom guessed)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or isinstance(syntax, pydicom.uid.UID):
        return syntax
    return pydicom.uid.UID(str(syntax))


_DEFLATED = pydicom.uid.DeflatedExplicitVRLittleEndian


def _check_pixel_data(ds, size: int, syntax, rows: int, columns: int, bits: int) -> None:
    """Native pixel data must be as long as the image attributes say and lie inside the file."""
    tag = next(t for t in _PIXEL_DATA_TAGS if t in ds)
    raw = ds.get_item(tag, keep_deferred=True)
    length, offset = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if length is None:
        return
    native = syntax is None or _native_syntax(syntax)
    if length == 0xFFFFFFFF:  # encapsulated (compressed): its frames are checked by decoding
        if native:
            raise dicom_rules.Malformed("native pixel data of undefined length")
        return
    if not native:
        raise dicom_rules.Malformed(
            f"{syntax.name} pixel data of defined length (not encapsulated)"
        )
    dicom_rules.pixel_data_length(length, rows, columns, bits, 1, 1)
    # A deflated dataset's offsets count inflated bytes: the file is shorter than they say.
    if offset is not None and syntax != _DEFLATED:
        if size < offset + length:
            raise dicom_rules.Malformed(
                f"truncated: the file ends at byte {size}, its pixel data at {offset + length}"
            )


_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, Float-, DoubleFloatPixelData


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
      computed for want of a weight, dose or half-life (units then says what the values are).

    Raises:
      dicom_rules.Malformed: a weight, dose or half-life that is there but not a positive number,
        or a decay factor that is not finite.
    """
    units = _text(ds, "Units").upper()
    if units == "GML":
        return None, "SUV_GML"
    if units != "BQML":
        return None, units or "UNKNOWN"
    weight_kg = _positive(ds, "PatientWeight")
    info = _value(ds, "RadiopharmaceuticalInformationSequence")
    if weight_kg is None or not info:
        return None, "BQML"
    drug = info[0]
    dose_bq = _positive(drug, "RadionuclideTotalDose")
    half_life_s = _positive(drug, "RadionuclideHalfLife")
    if dose_bq is None or half_life_s is None:
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
        exponent = -math.log(2.0) * elapsed_s / half_life_s
        decay = math.exp(exponent) if exponent < 700 else math.inf
    factor = weight_kg * 1000.0 / (dose_bq * decay)
    if not (math.isfinite(factor) and factor > 0):
        raise dicom_rules.Malformed(
            f"SUV factor {factor} (weight {weight_kg} kg, dose {dose_bq} Bq, half-life "
            f"{half_life_s} s, decay {decay})"
        )
    return factor, "SUV"


def _positive(ds, keyword: str) -> float | None:
    """A positive number, None when absent; Malformed when present but not positive."""
    value = _decimal(ds, keyword)
    if value is not None and value <= 0:
        raise dicom_rules.Malformed(f"{keyword} {value} is not positive")
    return value


def _plain_pixel_location(
    ds, syntax: pydicom.uid.UID | None, bits: int, signed: bool
) -> tuple[int | None, str | None]:
    """(file offset, numpy dtype) of a header's pixels when they are plain little-endian integers
    (their length already checked), else (None, None): pydicom then decodes them.

    Reading such pixels straight from the file with numpy costs a fraction of parsing the file a
    second time with pydicom, which is what makes ingest run near the speed of a bare read loop.
    ``ds`` must be a deferred read, so that the pixel data element is still raw.
    """
    raw = ds.get_item(0x7FE00010, keep_deferred=True)  # (7FE0,0010) Pixel Data
    if not isinstance(raw, pydicom.dataelem.RawDataElement) or raw.value is not None:
        return None, None
    if syntax is None or not _plain_syntax(syntax) or bits not in (8, 16, 32):
        return None, None
    return int(raw.value_tell), f"<{'i' if signed else 'u'}{bits // 8}"
