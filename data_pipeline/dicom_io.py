"""Reading DICOM image series: slice order, consistency and pixels in physical units."""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pydicom

from data_pipeline import dicom_rules
from data_pipeline.dicom_header import Header, read_header
from data_pipeline.dicom_rules import InputProblem, SliceProblem
from data_pipeline.vocabulary import IMAGE_MODALITIES

__all__ = [
    "Header",
    "InputProblem",
    "Series",
    "SliceProblem",
    "load_series",
    "load_series_from_headers",
    "read_header",
    "slice_normal",
    "split_consistent",
]

# Slices of one series must agree on these (orientation to 3 decimals, about 0.06 degrees).
_SERIES_FIELDS = (
    "modality",
    "patient_id",
    "study_instance_uid",
    "frame_of_reference_uid",
    "sequence",
    "units",
    "size",
    "orientation",
    "pixel_spacing",
)


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
def _physical_values(header: Header) -> np.ndarray:
    """One slice's pixels in physical units, float64 (rows, cols).

    Raises:
      SliceProblem: the pixels cannot be read or decoded.
    """
    path, modality = header.path, header.modality
    try:
        if header.pixel_dtype is not None:
            count = header.rows * header.columns
            stored = np.fromfile(path, header.pixel_dtype, count=count, offset=header.pixel_offset)
            if stored.size < count:
                raise SliceProblem(
                    path, "truncated: pixel data shorter than Rows x Columns", modality
                )
            stored = stored.reshape(header.rows, header.columns)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its reasons are ours to word, once
                stored = pydicom.dcmread(path).pixel_array
    except SliceProblem:
        raise
    except Exception as e:  # pydicom and its decoder plugins raise many types for bad pixel data
        raise SliceProblem(
            path, f"pixel data unreadable ({type(e).__name__}: {e})", modality
        ) from None
    if stored.shape != (header.rows, header.columns):
        raise SliceProblem(
            path, f"expected a single-frame greyscale image, got shape {stored.shape}", modality
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
      InputProblem: no image files, several series, a malformed or unreadable file, a slice unlike
        the rest of its series (SliceProblem, naming that slice), two slices at one position.
    """
    if isinstance(folder_or_files, (str, os.PathLike)):
        folder = str(folder_or_files)
        if not os.path.isdir(folder):
            raise InputProblem(folder, "no such folder")
        walk = dicom_rules.walk_folder(folder)  # links to folders followed, each read once
        if walk.problems:
            raise walk.problems[0]
        files = walk.files
    else:
        files = sorted(str(f) for f in folder_or_files)
        folder = os.path.commonpath(files) if files else None
    headers = []
    for path in files:
        try:
            header = read_header(path)
        except InputProblem as problem:
            if problem.reason.startswith(("not a DICOM", "not a regular file")):
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


def _series_key(header: Header) -> tuple:
    """The values of _SERIES_FIELDS of one slice (plain Python: this runs for every slice)."""
    return (
        header.modality,
        header.patient_id,
        header.study_instance_uid,
        header.frame_of_reference_uid,
        header.sequence,
        header.units,
        (header.rows, header.columns),
        tuple(round(v, 3) + 0.0 for v in header.orientation),  # + 0.0: -0.0 is 0.0
        tuple(round(v, 6) for v in header.pixel_spacing),
    )


def split_consistent(headers: Sequence[Header]) -> tuple[list[Header], list[SliceProblem]]:
    """The slices that agree with most of their series, and a problem naming each one that does
    not (another size, orientation, pixel spacing, patient, study, frame, modality or units).

    Raises:
      InputProblem: no value is shared by more than half of the slices (naming the first file).
    """
    keys = [_series_key(h) for h in headers]
    common, count = collections.Counter(keys).most_common(1)[0]
    if count == len(headers):
        return list(headers), []
    if 2 * count <= len(headers):
        field = next(f for i, f in enumerate(_SERIES_FIELDS) if len({key[i] for key in keys}) > 1)
        index = _SERIES_FIELDS.index(field)
        values = sorted({str(key[index]) for key in keys})
        raise InputProblem(
            headers[0].path,
            f"the slices of its series disagree on {field} ({', '.join(values)[:200]}), "
            "none in a majority",
            headers[0].modality,
        )
    kept, odd = [], []
    for header, key in zip(headers, keys, strict=True):
        if key == common:
            kept.append(header)
            continue
        i = next(i for i, (a, b) in enumerate(zip(key, common, strict=True)) if a != b)
        odd.append(
            SliceProblem(
                header.path,
                f"its {_SERIES_FIELDS[i]} {key[i]} differs from the rest of its series "
                f"({common[i]})",
                header.modality,
            )
        )
    return kept, odd


def load_series_from_headers(
    headers: Sequence[Header], skipped: list[SliceProblem] | None = None
) -> Series:
    """Loads one series from its files' headers (``read_header``), reading only the pixels.

    Args:
      headers: the series' files.
      skipped: if given, a slice whose pixels cannot be read is left out of the series and its
        problem appended here; else it is raised.

    Raises:
      SliceProblem: a slice unlike the rest of its series, or with unreadable pixels (naming it).
      InputProblem: the slices disagree with no majority, two lie at the same position, or no
        slice could be read.
    """
    _, odd = split_consistent(headers)
    if odd:
        raise odd[0]
    first = headers[0]
    orientation = np.array(first.orientation)
    normal = slice_normal(orientation)
    positions = np.array([h.position for h in headers])
    coords = positions @ normal
    order = np.argsort(coords, kind="stable")
    sorted_coords = coords[order]
    if len(coords) > 1 and np.min(np.diff(sorted_coords)) < 1e-3:
        duplicate = headers[order[int(np.argmin(np.diff(sorted_coords))) + 1]].path
        raise InputProblem(
            duplicate, "two slices of one series at the same position", first.modality
        )
    pixels = np.empty((len(headers), first.rows, first.columns), np.float32)
    readable = np.ones(len(headers), bool)
    for out_index, in_index in enumerate(order):
        header = headers[in_index]
        try:
            pixels[out_index] = _physical_values(header)
            if not np.isfinite(pixels[out_index]).all():
                raise SliceProblem(
                    header.path, "pixel values are not finite in physical units", header.modality
                )
        except SliceProblem as problem:
            if skipped is None:
                raise
            skipped.append(problem)
            readable[out_index] = False
    if not readable.any():
        raise InputProblem(first.path, "no slice of its series is readable", first.modality)
    if not readable.all():
        pixels, order = pixels[readable], order[readable]
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
