"""RTSTRUCT contours: reading, linking to their image series, and even-odd rasterisation."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pydicom
import pydicom.errors
import skimage.draw

from data_pipeline import dicom_rules, dicom_scan
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
    # ROI name -> why its contours cannot be trusted (a malformed contour: the mask would be
    # wrong); such an ROI is not used.
    problems: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # ROI name -> contours ignored for a reason that leaves the mask right (a point, an open
    # contour, fewer than 3 points): reported as warnings.
    notes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

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

    Raises:
      dicom_rules.Malformed: the value is not a list of numbers.
    """
    if _CONTOUR_DATA not in contour:
        return np.zeros(0)
    element = contour.get_item(_CONTOUR_DATA)
    if fast and isinstance(element, pydicom.dataelem.RawDataElement) and element.value is not None:
        return _parse_decimals(element.value.decode("ascii", "replace").strip(" \x00"))
    try:
        return np.asarray([float(v) for v in contour.ContourData], np.float64)
    except Exception as e:  # pydicom's DS converter raises for a malformed string
        raise dicom_rules.Malformed(f"ContourData unreadable ({type(e).__name__})") from None


def _parse_decimals(text: str) -> np.ndarray:
    try:
        return np.array(text.split("\\") if text else [], np.float64)
    except ValueError:
        raise dicom_rules.Malformed("ContourData is not a list of numbers") from None


@dataclasses.dataclass
class _RoiContours:
    """One ROIContourSequence item as read: its contours, and what was wrong with any."""

    number: int
    contours: list[Contour] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, index: int, kind: str, read_points, declared, uids: tuple[str, ...]) -> None:
        """Adds contour ``index`` (1-based) of type ``kind``; read_points() gives its ContourData
        (3n,); declared is its NumberOfContourPoints (None when absent)."""
        where = f"contour {index}"
        if kind not in dicom_rules.AREA_CONTOURS:
            if kind in dicom_rules.OTHER_CONTOURS:
                self.notes.append(f"{where} is {kind}, not an area; ignored")
            else:
                self.problems.append(f"{where} has ContourGeometricType {kind!r:.40}")
            return
        try:
            points = dicom_rules.contour_points(read_points(), declared)
        except dicom_rules.Malformed as e:
            self.problems.append(f"{where}: {e}")
            return
        if len(points) < 3:
            self.notes.append(f"{where} has {len(points)} points: no area; ignored")
            return
        self.contours.append(Contour(points, uids))


_ROI_CONTOURS, _REFERENCED_ROI_NUMBER, _CONTOUR_SEQUENCE = 0x30060039, 0x30060084, 0x30060040
_GEOMETRIC_TYPE, _CONTOUR_IMAGES, _REFERENCED_SOP_INSTANCE = 0x30060042, 0x30060016, 0x00081155
_NUMBER_OF_POINTS = 0x30060046
_REFERENCED_FRAMES, _FRAME_OF_REFERENCE, _REFERENCED_STUDIES = 0x30060010, 0x00200052, 0x30060012
_REFERENCED_SERIES, _SERIES_INSTANCE = 0x30060014, 0x0020000E


@dataclasses.dataclass
class _Scanned:
    """ROIContourSequence and ReferencedFrameOfReferenceSequence as read; `rest` is the file without
    them (_scan_rtstruct; empty when pydicom read them)."""

    rest: bytes
    contours: list[_RoiContours]  # per ROIContourSequence item
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
            read = _RoiContours(int(_text(buffer, roi.get(_REFERENCED_ROI_NUMBER))))
            for index, contour_item in enumerate(items(roi.get(_CONTOUR_SEQUENCE)), 1):
                contour = item_elements(contour_item)
                kind = _text(buffer, contour.get(_GEOMETRIC_TYPE), "CLOSED_PLANAR").upper()
                declared = _text(buffer, contour.get(_NUMBER_OF_POINTS))
                uids = tuple(
                    _text(buffer, image[_REFERENCED_SOP_INSTANCE])
                    for image in map(item_elements, items(contour.get(_CONTOUR_IMAGES)))
                    if _REFERENCED_SOP_INSTANCE in image
                )
                span = contour.get(_CONTOUR_DATA)
                read.add(
                    index,
                    kind,
                    lambda span=span: _parse_decimals(_text(buffer, span)),
                    int(declared) if declared else None,
                    uids,
                )
            result.contours.append(read)
    except (dicom_scan.ScanError, struct.error, ValueError, RecursionError):
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
    dicom_rules.regular_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about a bad file: ours are one line
        return _read_rtstruct(path, fast)


def _read_rtstruct(path: str, fast: bool) -> StructureSet:
    scanned = _scan_rtstruct(path) if fast else None
    try:
        # With the two long sequences scanned, pydicom reads the rest of the file only.
        ds = pydicom.dcmread(path if scanned is None else io.BytesIO(scanned.rest))
    except pydicom.errors.InvalidDicomError:
        raise InputProblem(path, "not a DICOM file (no DICM preamble)") from None
    except Exception as e:  # pydicom's reader raises many types for a malformed file
        raise InputProblem(path, f"unreadable DICOM ({type(e).__name__}: {e})") from None
    try:
        modality = str(ds.get("Modality", "")).upper()
        if modality != "RTSTRUCT":
            raise InputProblem(path, f"not an RTSTRUCT (Modality {modality!r:.40})")
        return _structure_set(path, ds, scanned, fast)
    except InputProblem:
        raise
    except Exception as e:
        # A file cut short or malformed inside its sequences, which pydicom reads lazily and
        # converts with many exception types.
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
        roi = _RoiContours(int(roi_contour.ReferencedROINumber))
        for index, contour in enumerate(roi_contour.get("ContourSequence", []), 1):
            declared = contour.get("NumberOfContourPoints")
            roi.add(
                index,
                str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).strip().upper(),
                lambda contour=contour: _contour_points(contour, fast),
                None if declared in (None, "") else int(declared),
                tuple(
                    str(item.ReferencedSOPInstanceUID)
                    for item in contour.get("ContourImageSequence", [])
                    if "ReferencedSOPInstanceUID" in item
                ),
            )
        read.contours.append(roi)
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
    problems: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    for read in sequences.contours:
        name = names.get(read.number, f"ROI_{read.number}")
        rois.setdefault(name, []).extend(read.contours)
        if read.problems:
            problems.setdefault(name, []).extend(read.problems)
        if read.notes:
            notes.setdefault(name, []).extend(read.notes)
    return StructureSet(
        path=path,
        patient_id=str(ds.get("PatientID", "")),
        frame_of_reference_uids=tuple(dict.fromkeys(f for f in frames if f)),
        referenced_series_uids=tuple(dict.fromkeys(s for s in series_uids if s)),
        description=str(ds.get("SeriesDescription", "")),
        rois={name: tuple(cs) for name, cs in rois.items()},
        problems={name: tuple(reasons) for name, reasons in problems.items()},
        notes={name: tuple(reasons) for name, reasons in notes.items()},
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


def _plane_distances(structure: StructureSet, geometry: SeriesGeometry) -> np.ndarray | None:
    """Distance (mm) of each contour's plane to the nearest slice; None when a contour is not
    parallel to the slices."""
    normal = geometry.normal
    distances = []
    for points, plane_normal in structure.contour_planes():
        if plane_normal is not None and abs(float(plane_normal @ normal)) < 1 - 1e-3:
            return None
        coord = float((points @ normal).mean())
        distances.append(float(np.abs(geometry.slice_coords - coord).min()))
    return np.array(distances)


def geometric_fit(
    structure: StructureSet, geometry: SeriesGeometry, share: float = 1.0
) -> float | None:
    """Mean distance (mm) of the contour planes to their nearest slice, None when they do not fit.

    They fit when every contour is parallel to the slices and (at least ``share`` of them) within
    half a slice spacing of one; the mean is over those.
    """
    distances = _plane_distances(structure, geometry)
    if distances is None or not distances.size:
        return None
    on_slices = distances[distances <= geometry.half_spacing]
    if on_slices.size < share * distances.size or not on_slices.size:
        return None
    return float(on_slices.mean())


# The share of contours that must lie on the slices of the series an RTSTRUCT names by UID.
_UID_LINK_SHARE = 0.5


def link_rtstruct(
    structure: StructureSet, candidates: Sequence[SeriesGeometry]
) -> tuple[SeriesGeometry, str, list[str]]:
    """Chooses the image series an RTSTRUCT contours, as SPEC §2 orders it.

    1. the SeriesInstanceUID named in RTReferencedSeriesSequence, when that series is present
       and at least half of the contours lie on its slices;
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
        # Most contours on its slices will do: a slice lost to a bad file leaves its contour off.
        if uid in by_uid and geometric_fit(structure, by_uid[uid], _UID_LINK_SHARE) is not None:
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


_LINK_STRENGTH = {"series_uid": 0, "contour_images": 1, "geometry": 2}
_LINK_WORDS = {
    "series_uid": "the series UID it references",
    "contour_images": "its contour image UIDs",
    "geometry": "geometry only",
}


@dataclasses.dataclass(frozen=True)
class Link:
    """An RTSTRUCT linked to an image series, and how."""

    structure: StructureSet
    series: SeriesGeometry
    how: str  # 'series_uid' | 'contour_images' | 'geometry'
    fit_mm: float  # mean contour plane distance to the slices; inf when they do not fit

    def strength(self) -> tuple:
        """Sorts strongest first: the rule that linked it, then the closer fit, then the path."""
        return _LINK_STRENGTH[self.how], self.fit_mm, self.structure.path


def link_all(
    structures: Sequence[StructureSet],
    candidates: Callable[[StructureSet], Sequence[SeriesGeometry]],
    display: Callable[[str], str] = str,
) -> tuple[dict[str, Link], list[InputProblem], list[str]]:
    """Links every RTSTRUCT to the series it contours, decided over all of them at once.

    Each RTSTRUCT is linked on its own (``link_rtstruct``); where several claim one series, the
    strongest claim wins, whatever order the files come in: a referenced series UID beats contour
    image UIDs, which beat geometry; then the closer geometric fit; then the path. Each losing
    file is blamed by name, with the file that won.

    Args:
      structures: the structure sets.
      candidates: the image series each structure set may contour (its patient's).
      display: how a path is written in the reasons.

    Returns:
      ({series uid: its Link}, a problem per RTSTRUCT not linked, warnings).
    """
    claims: dict[str, list[Link]] = {}
    problems, warnings = [], []
    for structure in structures:
        try:
            geometry, how, link_warnings = link_rtstruct(structure, candidates(structure))
        except InputProblem as problem:
            problems.append(problem)
            continue
        warnings.extend(w.replace(structure.path, display(structure.path)) for w in link_warnings)
        fit = geometric_fit(structure, geometry, _UID_LINK_SHARE)
        link = Link(structure, geometry, how, math.inf if fit is None else fit)
        claims.setdefault(geometry.series_instance_uid, []).append(link)
    links = {}
    for uid, series_claims in claims.items():
        winner, *losers = sorted(series_claims, key=Link.strength)
        links[uid] = winner
        for loser in losers:
            if loser.how == winner.how:
                why = f"both by {_LINK_WORDS[winner.how]}, and that one fits it as well or closer"
            else:
                why = f"that one by {_LINK_WORDS[winner.how]}, this one by {_LINK_WORDS[loser.how]}"
            problems.append(
                InputProblem(
                    loser.structure.path,
                    f"its image series is contoured by {display(winner.structure.path)} ({why})",
                )
            )
    return links, problems, warnings


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
      InputProblem: not a readable RTSTRUCT, another frame of reference, no ROI matches the
        patterns, or a malformed contour in a returned ROI.
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
    for name in names:
        if name in structure.problems:
            raise InputProblem(structure.path, f"ROI {name}: {structure.problems[name][0]}")
    return {
        name: rasterise(structure.rois[name], series, name, structure.path)[0] for name in names
    }
