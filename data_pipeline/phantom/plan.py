"""One phantom patient planned before any pixel is made: geometry, identifiers, TCIA quirks."""

from __future__ import annotations

import dataclasses
import datetime
import uuid

import numpy as np

from data_pipeline.phantom.anatomy import (
    Anatomy,
    Tissue,
    rotation_matrix,
    sample_anatomy,
    unit_vector,
)

ROI_NAMES = ("GTV_Mass", "GTV_Edema")
SERIES_NAMES = ("CT", "PT", "T1", "T2")  # T2 is a T2FS or a STIR series, depending on the patient.
SITES = ("thigh", "thigh", "thigh", "leg", "arm", "trunk", "buttock", "shoulder")

# Field of view of the CT (mm) and PET (mm) across the image, whatever the image size.
_CT_FOV_MM = 125.0
_PET_FOV_MM = 256.0
# Extent covered by the slices along their normal (mm).
_CT_EXTENT_MM = 100.0
_MR_EXTENT_MM = 110.0
_NAMESPACE = uuid.UUID("5a2c3f4e-9d1b-4c55-8f0e-3b6a1d2e7c90")


def _uid(*parts: object) -> str:
    """Deterministic UID under 2.25 (ISO/IEC 9834-8) from a name-based UUID of ``parts``."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


@dataclasses.dataclass(frozen=True)
class Frame:
    """A frame of reference: patient mm = rotation @ anatomy mm + translation."""

    uid: str
    rotation: np.ndarray  # (3, 3)
    translation_mm: np.ndarray  # (3,)

    def to_anatomy(self, points_mm: np.ndarray) -> np.ndarray:
        return (points_mm - self.translation_mm) @ self.rotation


@dataclasses.dataclass(frozen=True)
class SliceGeometry:
    """Image plane geometry of a series, slices in ascending order along the normal.

    All values are exactly those written to the DICOM files (already rounded).
    """

    row_cosine: np.ndarray  # (3,) direction of increasing column index
    col_cosine: np.ndarray  # (3,) direction of increasing row index
    pixel_spacing_mm: tuple[float, float]  # DICOM PixelSpacing: (between rows, between columns)
    rows: int
    cols: int
    positions_mm: np.ndarray  # (slices, 3) ImagePositionPatient
    slice_spacing_mm: float  # between slice centres along the normal
    slice_thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return unit_vector(np.cross(self.row_cosine, self.col_cosine))

    def to_patient(self, slice_index: int, rows_cols: np.ndarray) -> np.ndarray:
        """Patient mm (n, 3) of fractional (row, column) indices (n, 2) on one slice."""
        row_mm = rows_cols[:, :1] * self.pixel_spacing_mm[0]
        col_mm = rows_cols[:, 1:] * self.pixel_spacing_mm[1]
        return self.positions_mm[slice_index] + col_mm * self.row_cosine + row_mm * self.col_cosine

    def voxel_centres(self, supersampling: int = 1) -> np.ndarray:
        """Patient mm of voxel centres (slices, rows, cols, 3), or of a supersampled in-plane grid
        (slices, rows * s, cols * s, 3) whose s x s blocks average to one voxel."""
        step = 1.0 / supersampling
        offsets = (np.arange(supersampling) + 0.5) * step - 0.5
        rows = (np.arange(self.rows)[:, None] + offsets).ravel()
        cols = (np.arange(self.cols)[:, None] + offsets).ravel()
        in_plane = (
            cols[None, :, None] * self.pixel_spacing_mm[1] * self.row_cosine
            + rows[:, None, None] * self.pixel_spacing_mm[0] * self.col_cosine
        )
        return self.positions_mm[:, None, None, :] + in_plane[None]


def _make_geometry(
    centre_mm: np.ndarray,
    row_cosine: np.ndarray,
    col_cosine: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    shape: tuple[int, int, int],
    slice_spacing_mm: float,
    slice_thickness_mm: float,
) -> SliceGeometry:
    """A stack of ``shape`` = (slices, rows, cols) centred on ``centre_mm``.

    Values are rounded as they will be written to DICOM, so the geometry used to make pixels and
    contours is exactly the one a reader finds in the files.
    """
    num_slices, rows, cols = shape
    row_cosine = np.round(row_cosine, 8)
    col_cosine = np.round(col_cosine, 8)
    spacing = (round(pixel_spacing_mm[0], 6), round(pixel_spacing_mm[1], 6))
    slice_spacing_mm = round(slice_spacing_mm, 4)
    normal = unit_vector(np.cross(row_cosine, col_cosine))
    corner = (
        centre_mm
        - (cols - 1) / 2 * spacing[1] * row_cosine
        - (rows - 1) / 2 * spacing[0] * col_cosine
    )
    offsets = (np.arange(num_slices) - (num_slices - 1) / 2) * slice_spacing_mm
    return SliceGeometry(
        row_cosine=row_cosine,
        col_cosine=col_cosine,
        pixel_spacing_mm=spacing,
        rows=rows,
        cols=cols,
        positions_mm=np.round(corner + offsets[:, None] * normal, 4),
        slice_spacing_mm=slice_spacing_mm,
        slice_thickness_mm=round(slice_thickness_mm, 4),
    )


@dataclasses.dataclass(frozen=True)
class StructurePlan:
    """An RTSTRUCT outlining one image series."""

    sop_uid: str
    series_uid: str
    description: str
    series_number: int
    folder: str  # relative to the patient folder
    roi_order: tuple[str, ...]
    roi_numbers: tuple[int, ...]
    contour_images: bool  # whether each contour names its image (ContourImageSequence)
    implicit_vr: bool


@dataclasses.dataclass(frozen=True)
class SeriesPlan:
    """One image series: what it shows, its geometry and its identifiers."""

    name: str  # one of SERIES_NAMES
    modality: str  # 'CT' | 'PT' | 'MR'
    sequence: str | None  # 'T1' | 'T2' | 'STIR' for MR
    description: str
    study_uid: str
    series_uid: str
    series_number: int
    frame: Frame
    geometry: SliceGeometry
    sop_uids: tuple[str, ...]  # per slice, ascending along the normal
    instance_numbers: tuple[int, ...]  # per slice, ascending along the normal
    file_names: tuple[str, ...]  # per slice, ascending along the normal
    folder: str  # relative to the patient folder
    implicit_vr: bool
    structure: StructurePlan


@dataclasses.dataclass(frozen=True)
class PatientPlan:
    """Everything random about one phantom patient, drawn before any pixel is made."""

    key: str
    index: int
    seed: int
    age: int
    sex: str
    site: str
    weight_kg: float
    height_m: float
    anatomy: Anatomy
    petct_study_uid: str
    mr_study_uid: str
    petct_date: str
    mr_date: str
    injection_time: str  # HHMMSS
    petct_study_time: str  # HHMMSS
    ct_series_time: str  # HHMMSS
    pet_series_time: str  # HHMMSS, the PET acquisition start (decay correction reference)
    injected_dose_bq: float
    mass_suv: float
    contrast_jitter: np.ndarray  # (8,) multiplicative per tissue value
    series: dict[str, SeriesPlan]


def _hhmmss(minutes: int) -> str:
    """DICOM TM of a time of day given in minutes after midnight."""
    return f"{minutes // 60:02d}{minutes % 60:02d}00"


def patient_key(index: int) -> str:
    """Pseudonymous patient key (PatientID) of patient ``index``."""
    return f"PHANTOM_{index:03d}"


@dataclasses.dataclass(frozen=True)
class _Quirks:
    """The TCIA irregularities one patient shows."""

    t2_sequence: str  # 'T2' (a T2FS series) or 'STIR'
    t2_plane: str  # 'axial', 'coronal', or 'flipped' (axial with the row axis reversed)
    t1_oblique: bool  # T1 slices tilted 10-15 degrees
    t1_square_pixels: bool  # else fewer, wider-spaced rows
    instance_orders: dict[str, str]  # series name -> 'descending' | 'random' (default ascending)
    without_contour_images: tuple[str, ...]  # RTSTRUCTs whose contours name no image


# Patient i shows _QUIRKS[i % 4], so any four consecutive patients show them all.
_QUIRKS = (
    _Quirks("T2", "axial", False, True, {"CT": "descending"}, ("T1", "T2")),
    _Quirks("STIR", "coronal", False, False, {"T1": "random"}, ()),
    _Quirks("T2", "axial", True, True, {"PT": "descending"}, ("PT",)),
    _Quirks("T2", "flipped", False, False, {"CT": "random"}, ()),
)
_AXIAL_ROW, _AXIAL_COL = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])


def _instance_numbers(rng: np.random.Generator, num_slices: int, order: str) -> np.ndarray:
    """InstanceNumber per slice (slices ascending along the normal) in the given order."""
    if order == "descending":
        return np.arange(num_slices, 0, -1)
    if order == "random":
        return rng.permutation(num_slices) + 1
    return np.arange(1, num_slices + 1)


def _plan_geometries(
    rng: np.random.Generator,
    quirks: _Quirks,
    anatomy: Anatomy,
    petct_frame: Frame,
    mr_frame: Frame,
    image_size: int,
    num_slices: int,
) -> dict[str, SliceGeometry]:
    """Slice stacks of the four series around the tumour: CT and PET in one frame, MR in another."""

    def stack_centre(frame: Frame, jitter_mm: float) -> np.ndarray:
        """Patient mm of a stack's centre: near the limb axis, about the tumour's height."""
        anatomy_centre = np.array(
            [
                rng.uniform(-4, 4),
                rng.uniform(-4, 4),
                anatomy.tumour_centre_mm[2] + rng.uniform(-jitter_mm, jitter_mm),
            ]
        )
        return frame.rotation @ anatomy_centre + frame.translation_mm

    ct_spacing = _CT_FOV_MM / image_size
    ct_thickness = _CT_EXTENT_MM / num_slices
    pet_size = max(image_size // 2, 8)
    pet_spacing = _PET_FOV_MM / pet_size * rng.uniform(0.97, 1.07)
    pet_slices = max(round(num_slices * 0.8), 4)
    pet_thickness = _CT_EXTENT_MM * 1.05 / pet_slices
    mr_slices = max(round(num_slices * 2 / 3), 4)
    mr_thickness = _MR_EXTENT_MM / mr_slices
    mr_fov = rng.uniform(140, 160)
    geometries = {
        "CT": _make_geometry(
            stack_centre(petct_frame, 8),
            _AXIAL_ROW,
            _AXIAL_COL,
            pixel_spacing_mm=(ct_spacing, ct_spacing),
            shape=(num_slices, image_size, image_size),
            slice_spacing_mm=ct_thickness,
            slice_thickness_mm=ct_thickness,
        ),
        "PT": _make_geometry(
            stack_centre(petct_frame, 8),
            _AXIAL_ROW,
            _AXIAL_COL,
            pixel_spacing_mm=(pet_spacing, pet_spacing),
            shape=(pet_slices, pet_size, pet_size),
            slice_spacing_mm=pet_thickness,
            slice_thickness_mm=pet_thickness,
        ),
    }

    tilt = rotation_matrix([1, 1, 0], np.radians(rng.uniform(10, 15)) if quirks.t1_oblique else 0.0)
    t1_col_spacing = mr_fov / image_size
    t1_rows, t1_row_spacing = image_size, t1_col_spacing
    if not quirks.t1_square_pixels:  # a 0.9 x 1 field of view in 3/4 of the rows
        t1_rows = round(image_size * 0.75)
        t1_row_spacing = 0.9 * mr_fov / t1_rows
    geometries["T1"] = _make_geometry(
        stack_centre(mr_frame, 10),
        tilt @ _AXIAL_ROW,
        tilt @ _AXIAL_COL,
        pixel_spacing_mm=(t1_row_spacing, t1_col_spacing),
        shape=(mr_slices, t1_rows, image_size),
        slice_spacing_mm=mr_thickness * 1.1,  # a 10% gap between slices
        slice_thickness_mm=mr_thickness,
    )

    t2_pixel = mr_fov * rng.uniform(0.95, 1.05) / image_size
    if quirks.t2_plane == "coronal":  # rows run feet-ward, slices stacked anterior to posterior
        t2_row, t2_col = _AXIAL_ROW, np.array([0.0, 0.0, -1.0])
        t2_slices, t2_spacing = mr_slices, 115.0 / mr_slices
        t2_centre = stack_centre(mr_frame, 4)
    else:
        t2_row = -_AXIAL_ROW if quirks.t2_plane == "flipped" else _AXIAL_ROW
        t2_col = _AXIAL_COL
        t2_slices, t2_spacing = mr_slices + 2, mr_thickness * 0.95
        t2_centre = stack_centre(mr_frame, 10)
    geometries["T2"] = _make_geometry(
        t2_centre,
        t2_row,
        t2_col,
        pixel_spacing_mm=(t2_pixel, t2_pixel),
        shape=(t2_slices, image_size, image_size),
        slice_spacing_mm=t2_spacing,
        slice_thickness_mm=t2_spacing * 0.9,
    )
    return geometries


def _descriptions(rng: np.random.Generator, quirks: _Quirks) -> tuple[dict, dict]:
    """SeriesDescriptions of the image series and of their RTSTRUCTs, in TCIA's varied spellings."""
    t2_names = ["COR STIR", "STIR COR"] if quirks.t2_plane == "coronal" else ["AX STIR", "STIR"]
    images = {
        "CT": rng.choice(["CT", "CT IMAGES", "CTAC 3.75 Thick", "WB CT SLICES"]),
        "PT": rng.choice(["PET AC", "PET WB", "PET AC 3D", "WB 3D MAC"]),
        "T1": rng.choice(["T1 OBL"] if quirks.t1_oblique else ["T1 AX", "AX T1", "T1_tra"]),
        "T2": rng.choice(
            t2_names if quirks.t2_sequence == "STIR" else ["T2FS", "AX T2 FS", "T2 FSE FS"]
        ),
    }
    t2_suffix = "STIR" if quirks.t2_sequence == "STIR" else "T2FS"
    structures = {
        "CT": rng.choice(["RTstructCT", "RTStructCT"]),
        "PT": rng.choice(["RTstructPET", "RTStructPET"]),
        "T1": rng.choice(["RTstruct_T1", "RTStructT1"]),
        "T2": rng.choice([f"RTstruct_{t2_suffix}", f"RTStruct{t2_suffix}"]),
    }
    return (
        {k: str(v) for k, v in images.items()},
        {k: str(v) for k, v in structures.items()},
    )


def plan_patient(
    seed: int, patient_index: int, image_size: int = 128, num_slices: int = 30
) -> PatientPlan:
    """Draws one patient's anatomy, acquisition geometry, identifiers and TCIA quirks.

    The plan depends only on (seed, patient_index, image_size, num_slices), never on how many
    patients are written. Patient i shows the quirks ``_QUIRKS[i % 4]``.

    Args:
      seed: the phantom's seed.
      patient_index: which patient (0-based).
      image_size: CT and MR rows/columns (PET gets half).
      num_slices: CT slices (PET gets ~0.8x, MR ~2/3x).

    Returns:
      The PatientPlan.
    """
    rng = np.random.default_rng([seed, patient_index, 1])
    key = patient_key(patient_index)
    quirks = _QUIRKS[patient_index % len(_QUIRKS)]
    site = str(rng.choice(SITES))
    sex = str(rng.choice(["M", "F"]))
    age = int(rng.integers(20, 86))
    weight_kg = round(float(rng.uniform(52, 105)), 1)
    height_m = round(float(rng.uniform(1.55, 1.95)), 2)
    anatomy = sample_anatomy(rng, site)

    petct_day = datetime.date(2004, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 1500)))
    mr_day = petct_day - datetime.timedelta(days=int(rng.integers(1, 30)))
    injection_min = int(rng.integers(8 * 60, 13 * 60))
    pet_start_min = injection_min + int(rng.integers(50, 80))

    petct_frame = Frame(
        _uid(seed, key, "frame", "petct"),
        np.eye(3),
        np.array([rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(-900, -600)]),
    )
    # The patient lies differently in the MR scanner: another frame, rotated and shifted.
    mr_frame = Frame(
        _uid(seed, key, "frame", "mr"),
        rotation_matrix([0, 0, 1], np.radians(rng.uniform(-8, 8)))
        @ rotation_matrix([1, 0, 0], np.radians(rng.uniform(-4, 4))),
        np.array([rng.uniform(-30, 30), rng.uniform(-60, 20), rng.uniform(-200, 200)]),
    )
    geometries = _plan_geometries(
        rng, quirks, anatomy, petct_frame, mr_frame, image_size, num_slices
    )
    descriptions, structure_descriptions = _descriptions(rng, quirks)
    study_uids = {"petct": _uid(seed, key, "study", "petct"), "mr": _uid(seed, key, "study", "mr")}
    study_folders = {
        "petct": f"{petct_day:%m-%d-%Y}-NA-PETCT {site}-{int(rng.integers(10000, 99999))}",
        "mr": f"{mr_day:%m-%d-%Y}-NA-MR {site}-{int(rng.integers(10000, 99999))}",
    }

    series = {}
    for name, series_number in zip(SERIES_NAMES, (3, 5, 10, 13), strict=True):
        study = "mr" if name in ("T1", "T2") else "petct"
        geometry = geometries[name]
        count = len(geometry.positions_mm)
        order = quirks.instance_orders.get(name, "ascending")
        instances = _instance_numbers(rng, count, order)
        # Files are named 1-NNN.dcm after the InstanceNumber, or in yet another order.
        file_numbers = rng.permutation(count) + 1 if order == "random" else instances
        structure_description = structure_descriptions[name]
        structure = StructurePlan(
            sop_uid=_uid(seed, key, name, "rtstruct", "sop"),
            series_uid=_uid(seed, key, name, "rtstruct", "series"),
            description=structure_description,
            series_number=series_number + 1000,
            folder=f"{study_folders[study]}/1.000000-{structure_description}-"
            f"{int(rng.integers(10000, 99999))}",
            roi_order=tuple(str(n) for n in rng.permutation(list(ROI_NAMES))),
            roi_numbers=tuple(int(n) for n in rng.choice(np.arange(1, 10), 2, replace=False)),
            contour_images=name not in quirks.without_contour_images,
            implicit_vr=bool(rng.integers(0, 2)),
        )
        series[name] = SeriesPlan(
            name=name,
            modality="MR" if study == "mr" else name,
            sequence={"T1": "T1", "T2": quirks.t2_sequence}.get(name),
            description=descriptions[name],
            study_uid=study_uids[study],
            series_uid=_uid(seed, key, name, "series"),
            series_number=series_number,
            frame=mr_frame if study == "mr" else petct_frame,
            geometry=geometry,
            sop_uids=tuple(_uid(seed, key, name, "sop", k) for k in range(count)),
            instance_numbers=tuple(int(n) for n in instances),
            file_names=tuple(f"1-{int(n):03d}.dcm" for n in file_numbers),
            folder=f"{study_folders[study]}/{series_number}.000000-{descriptions[name]}-"
            f"{int(rng.integers(10000, 99999))}",
            implicit_vr=bool(rng.integers(0, 2)),
            structure=structure,
        )
    return PatientPlan(
        key=key,
        index=patient_index,
        seed=seed,
        age=age,
        sex=sex,
        site=site,
        weight_kg=weight_kg,
        height_m=height_m,
        anatomy=anatomy,
        petct_study_uid=study_uids["petct"],
        mr_study_uid=study_uids["mr"],
        petct_date=f"{petct_day:%Y%m%d}",
        mr_date=f"{mr_day:%Y%m%d}",
        injection_time=_hhmmss(injection_min),
        petct_study_time=_hhmmss(pet_start_min - 5),
        ct_series_time=_hhmmss(pet_start_min - 3),
        pet_series_time=_hhmmss(pet_start_min),
        injected_dose_bq=round(float(rng.uniform(250e6, 450e6)), -3),
        mass_suv=float(rng.uniform(4.0, 12.0)),
        contrast_jitter=rng.uniform(0.92, 1.08, len(Tissue)),
        series=series,
    )


def true_masks(plan: PatientPlan, series_name: str) -> dict[str, np.ndarray]:
    """Ground-truth ROI masks of one series, computed from the anatomy (nothing is read from disk).

    Args:
      plan: the patient's plan (``plan_patient``).
      series_name: one of SERIES_NAMES.

    Returns:
      {'GTV_Mass': bool (slices, rows, cols), 'GTV_Edema': ...}, slices ascending along the
      normal (the order ``data_pipeline.load_series`` gives).
    """
    series = plan.series[series_name]
    points = series.frame.to_anatomy(series.geometry.voxel_centres())
    return plan.anatomy.masks(points)
