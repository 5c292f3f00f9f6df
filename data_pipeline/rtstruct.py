"""RTSTRUCT contours: reading, linking to their image series, and even-odd rasterisation."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
from collections.abc import Mapping, Sequence

import numpy as np
import pydicom
import pydicom.errors
import skimage.draw

from data_pipeline import dicom_scan
from data_pipeline import fast_paths as fast_paths_lib
from data_pipeline.dicom_io import InputProblem, Series, slice_normal

DEFAULT_ROI_PATTERNS = ("GTV_Mass", "GTV")
# Contour points further than this from their mean plane make a contour non-planar (mm).
_PLANARITY_TOLERANCE_MM = 0.5


@dataclasses.dataclass(frozen=True)
class Contour:
    """One closed planar contour: points (n, 3) in patient mm (LPS)."""

    points_mm: np.ndarray
    referenced_sop_uids: tuple[str, ...]
    # Unit normal of the contour's plane (None under 3 points), computed where the contour is read
    # (an ingest worker), not where it is linked.
    plane_normal: np.ndarray | None = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "plane_normal", _plane_normal(self.points_mm))


@dataclasses.dataclass(frozen=True)
class StructureSet:
    """The parts of an RTSTRUCT that linking and rasterisation need."""

    path: str
    patient_id: str
    frame_of_reference_uids: tuple[str, ...]
    referenced_series_uids: tuple[str, ...]
    description: str
    rois: Mapping[str, tuple[Contour, ...]]  # ROI name -> its closed planar contours

    @property
    def referenced_sop_uids(self) -> set[str]:
        return {
            uid
            for contours in self.rois.values()
            for c in contours
            for uid in c.referenced_sop_uids
        }

    def contour_planes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(points, plane normal) of every contour, for geometric linking."""
        return [(c.points_mm, c.plane_normal) for cs in self.rois.values() for c in cs]


def _plane_normal(points_mm: np.ndarray) -> np.ndarray | None:
    if len(points_mm) < 3:
        return None
    centred = points_mm - points_mm.mean(axis=0)
    # The scatter matrix's least eigenvector: the SVD's last right singular vector, for a 3x3
    # eigendecomposition instead of an n x 3 SVD.
    normal = np.linalg.eigh(centred.T @ centred)[1][:, 0]
    return normal / np.linalg.norm(normal)


_CONTOUR_DATA = 0x30060050  # (3006,0050) Contour Data


def _contour_points(contour: pydicom.Dataset, fast: bool) -> np.ndarray:
    """ContourData as float64 (3n,), parsed from its bytes when they are still undecoded (fast).

    pydicom turns every decimal string into a validated DSfloat; a structure set holds hundreds of
    thousands of them, which made reading it the slowest part of an ingest.
    """
    if _CONTOUR_DATA not in contour:
        return np.zeros(0)
    element = contour.get_item(_CONTOUR_DATA)
    if fast and isinstance(element, pydicom.dataelem.RawDataElement) and element.value is not None:
        text = element.value.decode("ascii", "replace").strip(" \x00")
        return np.array(text.split("\\") if text else [], np.float64)
    return np.asarray([float(v) for v in contour.ContourData], np.float64)


_ROI_CONTOURS, _REFERENCED_ROI_NUMBER, _CONTOUR_SEQUENCE = 0x30060039, 0x30060084, 0x30060040
_GEOMETRIC_TYPE, _CONTOUR_IMAGES, _REFERENCED_SOP_INSTANCE = 0x30060042, 0x30060016, 0x00081155
_REFERENCED_FRAMES, _FRAME_OF_REFERENCE, _REFERENCED_STUDIES = 0x30060010, 0x00200052, 0x30060012
_REFERENCED_SERIES, _SERIES_INSTANCE = 0x30060014, 0x0020000E


@dataclasses.dataclass
class _Scanned:
    """ROIContourSequence and ReferencedFrameOfReferenceSequence as read; `rest` is the file without
    them (_scan_rtstruct; empty when pydicom read them)."""

    rest: bytes
    contours: list[tuple[int, list[Contour]]]  # (ReferencedROINumber, its contours) per item
    frames: list[str]  # FrameOfReferenceUIDs of ReferencedFrameOfReferenceSequence
    series_uids: list[str]  # the SeriesInstanceUIDs referenced under it


def _text(buffer: bytes, span: tuple[int, int] | None, default: str = "") -> str:
    if span is None:
        return default
    return buffer[span[0] : span[1]].decode("ascii", "replace").strip(" \x00")


def _scan_rtstruct(path: str) -> _Scanned | None:
    """Reads ROIContourSequence and ReferencedFrameOfReferenceSequence with the element scanner
    (data_pipeline.dicom_scan); None where it cannot (pydicom then reads the whole file).

    Why our own: pydicom builds a Dataset for every contour, every ContourImageSequence item and
    every referenced image, and converts every value on access; a structure set has thousands,
    and reading RTSTRUCTs that way was a third of an ingest's CPU time (benchmarks/ingest.py). The
    values read here are ASCII VRs (IS, CS, DS, UI) whatever the character set; the rest of the
    file (ROI names) is left to pydicom. tests/dicom_io_test.py checks that both readers give equal
    structure sets on the phantom, the real data and re-encoded variants (implicit VR, sequences of
    defined length, big endian and truncated files, which go to pydicom).
    """
    scanned = dicom_scan.scan_dataset(path)
    if scanned is None:
        return None
    buffer, elements, explicit = scanned

    def items(span):
        return dicom_scan.scan_items(buffer, *span, explicit) if span else ()

    def item_elements(span):
        return dicom_scan.scan_elements(buffer, *span, explicit)

    def top(tag):
        return elements[tag][1:3] if tag in elements else None

    result = _Scanned(buffer, [], [], [])
    try:
        for frame_item in items(top(_REFERENCED_FRAMES)):
            frame = item_elements(frame_item)
            result.frames.append(_text(buffer, frame.get(_FRAME_OF_REFERENCE)))
            for study_item in items(frame.get(_REFERENCED_STUDIES)):
                for series_item in items(item_elements(study_item).get(_REFERENCED_SERIES)):
                    series = item_elements(series_item)
                    result.series_uids.append(_text(buffer, series.get(_SERIES_INSTANCE)))
        for roi_item in items(top(_ROI_CONTOURS)):
            roi = item_elements(roi_item)
            number = int(_text(buffer, roi.get(_REFERENCED_ROI_NUMBER)))
            contours = []
            for contour_item in items(roi.get(_CONTOUR_SEQUENCE)):
                contour = item_elements(contour_item)
                kind = _text(buffer, contour.get(_GEOMETRIC_TYPE), "CLOSED_PLANAR").upper()
                if kind != "CLOSED_PLANAR":
                    continue
                text = _text(buffer, contour.get(_CONTOUR_DATA))
                data = np.array(text.split("\\") if text else [], np.float64)
                if data.size < 9 or data.size % 3:
                    continue
                uids = tuple(
                    _text(buffer, image[_REFERENCED_SOP_INSTANCE])
                    for image in map(item_elements, items(contour.get(_CONTOUR_IMAGES)))
                    if _REFERENCED_SOP_INSTANCE in image
                )
                contours.append(Contour(data.reshape(-1, 3), uids))
            result.contours.append((number, contours))
    except (dicom_scan.ScanError, struct.error, ValueError):
        return None
    for tag in sorted((_REFERENCED_FRAMES, _ROI_CONTOURS), reverse=True):
        if tag in elements:  # cut from the end first: the earlier offsets stay valid
            start, *_, end = elements[tag]
            result.rest = result.rest[:start] + result.rest[end:]
    return result


def read_rtstruct(path: str | os.PathLike, fast_paths: bool | None = None) -> StructureSet:
    """Reads an RTSTRUCT's ROIs and contours.

    Args:
      path: the file.
      fast_paths: read the contours with data_pipeline.dicom_scan (True) or with pydicom only
        (False); None: as ``$SARCOMA_JAX_FAST_PATHS`` says (data_pipeline.fast_paths).

    Raises:
      InputProblem: not a readable RTSTRUCT.
    """
    path = str(path)
    fast = fast_paths_lib.enabled(fast_paths)
    scanned = _scan_rtstruct(path) if fast else None
    try:
        # With the two long sequences scanned, pydicom reads the rest of the file only.
        ds = pydicom.dcmread(path if scanned is None else io.BytesIO(scanned.rest))
    except pydicom.errors.InvalidDicomError:
        raise InputProblem(path, "not a DICOM file (no DICM preamble)") from None
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise InputProblem(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    if str(ds.get("Modality", "")).upper() != "RTSTRUCT":
        raise InputProblem(path, f"not an RTSTRUCT (Modality {ds.get('Modality')!r})")
    try:
        return _structure_set(path, ds, scanned, fast)
    except (AttributeError, EOFError, KeyError, OSError, TypeError, ValueError) as e:
        # A file cut short or malformed inside its sequences, which pydicom reads lazily.
        raise InputProblem(path, f"unreadable RTSTRUCT ({type(e).__name__}: {e})") from None


def _sequences_by_pydicom(ds: pydicom.Dataset, fast: bool) -> _Scanned:
    """What _scan_rtstruct reads, read through pydicom (where the scanner could not)."""
    read = _Scanned(b"", [], [], [])
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        read.frames.append(str(frame.get("FrameOfReferenceUID", "")))
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                read.series_uids.append(str(series.get("SeriesInstanceUID", "")))
    for roi_contour in ds.get("ROIContourSequence", []):
        contours = []
        for contour in roi_contour.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue
            data = _contour_points(contour, fast)
            if data.size < 9 or data.size % 3:
                continue
            uids = tuple(
                str(item.ReferencedSOPInstanceUID)
                for item in contour.get("ContourImageSequence", [])
                if "ReferencedSOPInstanceUID" in item
            )
            contours.append(Contour(points_mm=data.reshape(-1, 3), referenced_sop_uids=uids))
        read.contours.append((int(roi_contour.ReferencedROINumber), contours))
    return read


def _structure_set(
    path: str, ds: pydicom.Dataset, scanned: _Scanned | None, fast: bool
) -> StructureSet:
    names = {
        int(roi.ROINumber): str(roi.get("ROIName", f"ROI_{roi.ROINumber}"))
        for roi in ds.get("StructureSetROISequence", [])
    }
    sequences = scanned if scanned is not None else _sequences_by_pydicom(ds, fast)
    frames, series_uids = list(sequences.frames), sequences.series_uids
    for roi in ds.get("StructureSetROISequence", []):
        frames.append(str(roi.get("ReferencedFrameOfReferenceUID", "")))
    rois: dict[str, list[Contour]] = {}
    for roi_number, contours in sequences.contours:
        rois.setdefault(names.get(roi_number, f"ROI_{roi_number}"), []).extend(contours)
    return StructureSet(
        path=path,
        patient_id=str(ds.get("PatientID", "")),
        frame_of_reference_uids=tuple(dict.fromkeys(f for f in frames if f)),
        referenced_series_uids=tuple(dict.fromkeys(s for s in series_uids if s)),
        description=str(ds.get("SeriesDescription", "")),
        rois={name: tuple(cs) for name, cs in rois.items()},
    )


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of an image series, enough to link an RTSTRUCT to it without reading pixels."""

    series_instance_uid: str
    frame_of_reference_uid: str
    orientation: np.ndarray  # (6,)
    slice_coords: np.ndarray  # (slices,) ascending, mm along the normal
    sop_instance_uids: frozenset[str]

    @property
    def normal(self) -> np.ndarray:
        return slice_normal(self.orientation)

    @property
    def half_spacing(self) -> float:
        coords = self.slice_coords
        return 0.5 * float(np.median(np.diff(coords))) if len(coords) > 1 else 1.0

    @classmethod
    def of(cls, series: Series) -> SeriesGeometry:
        return cls(
            series_instance_uid=series.series_instance_uid,
            frame_of_reference_uid=series.frame_of_reference_uid,
            orientation=np.asarray(series.orientation),
            slice_coords=series.slice_coords,
            sop_instance_uids=frozenset(series.sop_instance_uids),
        )


def geometric_fit(structure: StructureSet, geometry: SeriesGeometry) -> float | None:
    """Mean distance (mm) of the contour planes to their nearest slice, None when they do not fit.

    They fit when every contour is parallel to the slices and within half a slice spacing of one.
    """
    normal = geometry.normal
    half_spacing = geometry.half_spacing
    distances = []
    for points, plane_normal in structure.contour_planes():
        if plane_normal is not None and abs(float(plane_normal @ normal)) < 1 - 1e-3:
            return None
        coord = float((points @ normal).mean())
        distance = float(np.abs(geometry.slice_coords - coord).min())
        if distance > half_spacing:
            return None
        distances.append(distance)
    return float(np.mean(distances)) if distances else None


def link_rtstruct(
    structure: StructureSet, candidates: Sequence[SeriesGeometry]
) -> tuple[SeriesGeometry, str, list[str]]:
    """Chooses the image series an RTSTRUCT contours, as SPEC §2 orders it.

    1. the SeriesInstanceUID named in RTReferencedSeriesSequence, when that series is present;
    2. the series holding most of the ContourImageSequence SOPInstanceUIDs, when any match;
    3. contour planes on the series' slices (closest fit wins; a warning when several fit).
    Only series in the RTSTRUCT's frame of reference are candidates, whichever rule links.

    Returns:
      (series geometry, how it was linked: 'series_uid'|'contour_images'|'geometry', warnings).

    Raises:
      InputProblem: no series fits.
    """
    frames = set(structure.frame_of_reference_uids)
    if frames:
        candidates = [g for g in candidates if g.frame_of_reference_uid in frames]
        if not candidates:
            raise InputProblem(
                structure.path, "its FrameOfReferenceUID matches no image series of the patient"
            )
    by_uid = {g.series_instance_uid: g for g in candidates}
    for uid in structure.referenced_series_uids:
        if uid in by_uid and geometric_fit(structure, by_uid[uid]) is not None:
            return by_uid[uid], "series_uid", []
    referenced = structure.referenced_sop_uids
    if referenced:
        matches = [(len(referenced & g.sop_instance_uids), g) for g in candidates]
        best_count = max((count for count, _ in matches), default=0)
        if best_count:
            best = [g for count, g in matches if count == best_count]
            if len(best) == 1:
                return best[0], "contour_images", []
    fits = [(fit, g) for g in candidates if (fit := geometric_fit(structure, g)) is not None]
    if not fits:
        raise InputProblem(
            structure.path, "no image series in its frame of reference has slices at its contours"
        )
    fits.sort(key=lambda item: item[0])
    warnings = []
    if len(fits) > 1:
        warnings.append(
            f"{structure.path}: {len(fits)} series fit its contours by geometry; chose the closest "
            f"(mean plane distance {fits[0][0]:.3f} mm vs {fits[1][0]:.3f} mm)"
        )
    return fits[0][1], "geometry", warnings


def select_rois(names: Sequence[str], patterns: Sequence[str] = DEFAULT_ROI_PATTERNS) -> str | None:
    """The first ROI name matching the first pattern that matches any (case-insensitive prefix)."""
    for pattern in patterns:
        regex = re.compile(re.escape(pattern), re.IGNORECASE)
        matching = sorted(name for name in names if regex.match(name.strip()))
        if matching:
            return matching[0]
    return None


def rasterise(
    contours: Sequence[Contour], series: Series, roi_name: str = "", path: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Fills contours into a mask aligned with ``series`` by the even-odd rule.

    Each contour goes to the slice nearest along the normal (within half a slice spacing); its
    points are projected on the row and column direction cosines, and pixels whose centres lie
    inside are set. Several contours on one slice combine by XOR, so holes stay holes.

    Returns:
      (mask bool (slices, rows, cols), warnings for contours off the series or outside the image).
    """
    num_slices, rows, cols = series.pixels.shape
    mask = np.zeros((num_slices, rows, cols), bool)
    warnings = []
    geometry = SeriesGeometry.of(series)
    normal, coords = geometry.normal, geometry.slice_coords
    row_cosines, col_cosines = series.orientation[:3], series.orientation[3:]
    row_spacing, col_spacing = series.pixel_spacing
    for contour in contours:
        points = contour.points_mm
        along = points @ normal
        if np.ptp(along) > _PLANARITY_TOLERANCE_MM:
            warnings.append(
                f"{path}: ROI {roi_name}: a contour is not parallel to the slices; skipped"
            )
            continue
        distances = np.abs(coords - along.mean())
        k = int(np.argmin(distances))
        if distances[k] > geometry.half_spacing + 1e-6:
            warnings.append(
                f"{path}: ROI {roi_name}: a contour at {along.mean():.2f} mm lies on no slice; "
                "skipped"
            )
            continue
        offset = points - series.positions[k]
        # Column index grows along the row cosines in steps of the column spacing, and vice versa.
        col_index = offset @ row_cosines / col_spacing
        row_index = offset @ col_cosines / row_spacing
        rr, cc = skimage.draw.polygon(row_index, col_index, shape=(rows, cols))
        inside = (
            (row_index.max() >= -0.5)
            & (row_index.min() <= rows - 0.5)
            & (col_index.max() >= -0.5)
            & (col_index.min() <= cols - 0.5)
        )
        if not inside or rr.size == 0:
            warnings.append(
                f"{path}: ROI {roi_name}: a contour on slice {k} lies outside the image; skipped"
            )
            continue
        fill = np.zeros((rows, cols), bool)
        fill[rr, cc] = True
        mask[k] ^= fill
    return mask, warnings


def load_rtstruct_masks(
    rtstruct_path: str | os.PathLike,
    series: Series,
    roi_patterns: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Masks of an RTSTRUCT's ROIs aligned with ``series``.

    Each contour is placed on its slice by geometry; ContourImageSequence is not needed (the IBSI
    data's points at slices that are not there).

    Args:
      rtstruct_path: the RTSTRUCT file.
      series: the image series it contours (see ``load_series``).
      roi_patterns: if given, only the ROI chosen by ``select_rois`` is returned; else all ROIs.

    Returns:
      {roi_name: bool (slices, rows, cols)}.

    Raises:
      InputProblem: not an RTSTRUCT, another frame of reference, or no ROI matches the patterns.
    """
    structure = read_rtstruct(rtstruct_path)
    if structure.frame_of_reference_uids and series.frame_of_reference_uid not in set(
        structure.frame_of_reference_uids
    ):
        raise InputProblem(structure.path, "its frame of reference is not the series'")
    names = list(structure.rois)
    if roi_patterns is not None:
        chosen = select_rois(names, roi_patterns)
        if chosen is None:
            raise InputProblem(
                structure.path, f"no ROI matches {list(roi_patterns)} (ROIs: {sorted(names)})"
            )
        names = [chosen]
    return {
        name: rasterise(structure.rois[name], series, name, structure.path)[0] for name in names
    }
