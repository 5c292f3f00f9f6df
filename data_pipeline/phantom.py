"""Synthetic soft-tissue-sarcoma DICOM (PET/CT and MR studies, RTSTRUCTs) laid out like TCIA's."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import enum
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import pydicom
import pydicom.uid
import scipy.ndimage
import skimage.measure
import tqdm
from absl import app, flags
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

ROI_NAMES = ("GTV_Mass", "GTV_Edema")
SERIES_NAMES = ("CT", "PT", "T1", "T2")  # T2 is a T2FS or a STIR series, depending on the patient.
F18_HALF_LIFE_S = 6586.2
SITES = ("thigh", "thigh", "thigh", "leg", "arm", "trunk", "buttock", "shoulder")

# Field of view of the CT (mm) and PET (mm) across the image, whatever the image size.
_CT_FOV_MM = 125.0
_PET_FOV_MM = 256.0
# Extent covered by the slices along their normal (mm).
_CT_EXTENT_MM = 100.0
_MR_EXTENT_MM = 110.0
# In-plane supersampling of the PET grid before blurring (partial volume).
_PET_SUPERSAMPLING = 3
_NAMESPACE = uuid.UUID("5a2c3f4e-9d1b-4c55-8f0e-3b6a1d2e7c90")


class Tissue(enum.IntEnum):
    """Tissue labels of the anatomy model; later ones win where regions overlap."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTEX = 3
    MARROW = 4
    EDEMA = 5
    MASS = 6  # viable tumour
    NECROSIS = 7


# Mean value per tissue (indexed by Tissue) before per-patient variation, noise and blur.
_CT_HU = np.array([-1000.0, -100.0, 45.0, 1100.0, 20.0, 30.0, 60.0, 22.0])
_PET_SUV = np.array([0.02, 0.3, 0.7, 0.4, 1.1, 1.2, 6.0, 0.6])  # MASS scaled per patient.
_MR_SIGNAL = {
    "T1": np.array([0.0, 1000.0, 420.0, 30.0, 900.0, 400.0, 370.0, 250.0]),
    "T2": np.array([0.0, 120.0, 300.0, 20.0, 130.0, 750.0, 900.0, 1300.0]),
    "STIR": np.array([0.0, 60.0, 220.0, 15.0, 70.0, 800.0, 950.0, 1400.0]),
}


def _uid(*parts: object) -> str:
    """Deterministic UID under 2.25 (ISO/IEC 9834-8) from a name-based UUID of ``parts``."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix (3, 3) about ``axis`` (Rodrigues)."""
    x, y, z = _unit(np.asarray(axis, np.float64))
    cross = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + np.sin(angle_rad) * cross + (1 - np.cos(angle_rad)) * cross @ cross


@dataclasses.dataclass(frozen=True)
class Lobes:
    """Smooth radial perturbation of an ellipsoid surface: 1 + sum_k a_k sin(f_k u.v_k + p_k)."""

    directions: np.ndarray  # (K, 3) unit vectors
    frequencies: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)
    amplitudes: np.ndarray  # (K,)

    @classmethod
    def sample(cls, rng: np.random.Generator, count: int, total_amplitude: float) -> Lobes:
        amplitudes = rng.dirichlet(np.ones(count)) * total_amplitude
        return cls(
            _unit(rng.normal(size=(count, 3))),
            rng.uniform(1.5, 4.0, count),
            rng.uniform(0, 2 * np.pi, count),
            amplitudes,
        )

    def radius(self, unit_directions: np.ndarray) -> np.ndarray:
        """Relative surface radius (...,) along unit directions (..., 3)."""
        angles = unit_directions @ self.directions.T * self.frequencies + self.phases
        return 1.0 + np.sin(angles) @ self.amplitudes


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """A limb (fat, muscle, bone) with a tumour (mass, necrotic core) and oedema, in anatomy mm.

    The limb runs along the anatomy z axis; the tumour is an irregular ellipsoid.
    """

    limb_radii_mm: tuple[float, float]
    limb_taper_per_mm: float
    fat_thickness_mm: float
    bone_centre_mm: tuple[float, float]
    cortex_radius_mm: float
    marrow_radius_mm: float
    tumour_centre_mm: np.ndarray  # (3,)
    tumour_axes: np.ndarray  # (3, 3) rows: the ellipsoid's axes as unit vectors
    tumour_semi_axes_mm: np.ndarray  # (3,)
    mass_lobes: Lobes
    necrosis_fraction: float
    necrosis_lobes: Lobes
    edema_scale: float
    edema_lobes: Lobes
    texture_waves: np.ndarray  # (J, 3) wave vectors, rad/mm
    texture_phases: np.ndarray  # (J,)

    def _tumour_radius(self, points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised ellipsoid radius (...,) and its unit direction (..., 3)."""
        local = (points_mm - self.tumour_centre_mm) @ self.tumour_axes.T / self.tumour_semi_axes_mm
        radius = np.linalg.norm(local, axis=-1)
        return radius, local / np.maximum(radius, 1e-9)[..., None]

    def regions(self, points_mm: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean regions (...,) at points (..., 3): limb, muscle, cortex, marrow, mass, ..."""
        x, y, z = np.moveaxis(points_mm, -1, 0)
        scale = 1.0 + self.limb_taper_per_mm * z
        rx, ry = self.limb_radii_mm
        fat = self.fat_thickness_mm
        limb = (x / (rx * scale)) ** 2 + (y / (ry * scale)) ** 2 <= 1.0
        muscle = (x / (rx * scale - fat)) ** 2 + (y / (ry * scale - fat)) ** 2 <= 1.0
        bone_r2 = (x - self.bone_centre_mm[0]) ** 2 + (y - self.bone_centre_mm[1]) ** 2
        bone = bone_r2 <= self.cortex_radius_mm**2
        marrow = bone_r2 <= self.marrow_radius_mm**2
        radius, direction = self._tumour_radius(points_mm)
        soft_limb = limb & ~bone
        # The lobes are evaluated only where the oedema can reach (a small part of the image).
        reach = self.edema_scale * (1.0 + self.edema_lobes.amplitudes.sum())
        near = soft_limb & (radius <= reach)
        radius, direction = radius[near], direction[near]
        mass = np.zeros_like(near)
        necrosis = np.zeros_like(near)
        edema = np.zeros_like(near)
        mass[near] = radius <= self.mass_lobes.radius(direction)
        necrosis[near] = mass[near] & (
            radius <= self.necrosis_fraction * self.necrosis_lobes.radius(direction)
        )
        edema[near] = radius <= self.edema_scale * self.edema_lobes.radius(direction)
        return dict(
            limb=limb,
            muscle=muscle,
            cortex=bone,
            marrow=marrow,
            mass=mass,
            necrosis=necrosis,
            edema=edema | mass,
        )

    def labels(self, points_mm: np.ndarray) -> np.ndarray:
        """Tissue label (uint8, ...) at points (..., 3)."""
        region = self.regions(points_mm)
        labels = np.where(region["limb"], Tissue.FAT, Tissue.AIR).astype(np.uint8)
        for name, tissue in (
            ("muscle", Tissue.MUSCLE),
            ("cortex", Tissue.CORTEX),
            ("marrow", Tissue.MARROW),
            ("edema", Tissue.EDEMA),
            ("mass", Tissue.MASS),
            ("necrosis", Tissue.NECROSIS),
        ):
            labels[region[name]] = tissue
        return labels

    def masks(self, points_mm: np.ndarray) -> dict[str, np.ndarray]:
        """The ground-truth ROIs at points: GTV_Mass (mass with its necrosis) and GTV_Edema.

        GTV_Edema is the oedema envelope, the mass included (as outlined on T2 in the collection).
        """
        region = self.regions(points_mm)
        return {"GTV_Mass": region["mass"], "GTV_Edema": region["edema"]}

    def texture(self, points_mm: np.ndarray) -> np.ndarray:
        """Smooth tissue heterogeneity in [-1, 1] at points (..., 3)."""
        waves = np.cos(points_mm @ self.texture_waves.T + self.texture_phases)
        return waves.mean(axis=-1)


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
        return _unit(np.cross(self.row_cosine, self.col_cosine))

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
    normal = _unit(np.cross(row_cosine, col_cosine))
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


def _sample_anatomy(rng: np.random.Generator, site: str) -> Anatomy:
    scale = {"arm": 0.8, "shoulder": 0.9, "leg": 0.85, "trunk": 1.05}.get(site, 1.0)
    limb_radii = (rng.uniform(48, 56) * scale, rng.uniform(40, 50) * scale)
    fat = rng.uniform(6, 13) * scale
    bone_centre = (rng.uniform(-6, 6), rng.uniform(-6, 6))
    cortex = rng.uniform(10, 13) * scale
    semi_axes = np.array([rng.uniform(12, 19), rng.uniform(11, 17), rng.uniform(15, 26)]) * scale
    # The tumour sits in the muscle beside the bone, at a random angle around it.
    angle = rng.uniform(0, 2 * np.pi)
    distance = cortex + 0.8 * semi_axes[:2].max() + rng.uniform(1, 5)
    centre = np.array(
        [
            bone_centre[0] + distance * np.cos(angle),
            bone_centre[1] + distance * np.sin(angle),
            rng.uniform(-6, 6),
        ]
    )
    axes = _rotation(rng.normal(size=3), rng.uniform(0, np.pi)) @ _rotation(
        [0, 0, 1], rng.uniform(0, 2 * np.pi)
    )
    wavelengths = rng.uniform(8, 20, 4)
    return Anatomy(
        limb_radii_mm=limb_radii,
        limb_taper_per_mm=rng.uniform(-0.002, 0.0),
        fat_thickness_mm=fat,
        bone_centre_mm=bone_centre,
        cortex_radius_mm=cortex,
        marrow_radius_mm=cortex * rng.uniform(0.5, 0.65),
        tumour_centre_mm=centre,
        tumour_axes=axes,
        tumour_semi_axes_mm=semi_axes,
        mass_lobes=Lobes.sample(rng, 5, rng.uniform(0.1, 0.25)),
        necrosis_fraction=rng.uniform(0.35, 0.6),
        necrosis_lobes=Lobes.sample(rng, 4, 0.2),
        edema_scale=rng.uniform(1.3, 1.6),
        edema_lobes=Lobes.sample(rng, 5, rng.uniform(0.15, 0.3)),
        texture_waves=_unit(rng.normal(size=(4, 3))) * (2 * np.pi / wavelengths)[:, None],
        texture_phases=rng.uniform(0, 2 * np.pi, 4),
    )


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

    tilt = _rotation([1, 1, 0], np.radians(rng.uniform(10, 15)) if quirks.t1_oblique else 0.0)
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
    anatomy = _sample_anatomy(rng, site)

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
        _rotation([0, 0, 1], np.radians(rng.uniform(-8, 8)))
        @ _rotation([1, 0, 0], np.radians(rng.uniform(-4, 4))),
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


def _pet_decay_factor(plan: PatientPlan) -> float:
    """Fraction of the injected activity left at the PET series start."""
    start = datetime.datetime.strptime(plan.pet_series_time, "%H%M%S")
    injection = datetime.datetime.strptime(plan.injection_time, "%H%M%S")
    elapsed_s = (start - injection).total_seconds()
    return 2.0 ** (-elapsed_s / F18_HALF_LIFE_S)


def _series_rng(plan: PatientPlan, series_name: str) -> np.random.Generator:
    return np.random.default_rng([plan.seed, plan.index, 2, SERIES_NAMES.index(series_name)])


def _tissue_image(plan: PatientPlan, series: SeriesPlan, table: np.ndarray, supersampling: int):
    """Piecewise-constant tissue values with tumour texture at the voxel centres (or supersampled).

    Returns:
      (values float64 (slices, rows*s, cols*s), points in patient mm (..., 3)).
    """
    points_patient = series.geometry.voxel_centres(supersampling)
    points = series.frame.to_anatomy(points_patient)
    labels = plan.anatomy.labels(points)
    values = (table * plan.contrast_jitter)[labels]
    for tissues, strength in ((labels == Tissue.MUSCLE, 0.03), (labels >= Tissue.EDEMA, 0.12)):
        values[tissues] *= 1.0 + strength * plan.anatomy.texture(points[tissues])
    return values, points_patient


def _ct_hu(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """CT in HU: small tumour contrast, sharp, Gaussian noise (slices, rows, cols)."""
    values, _ = _tissue_image(plan, series, _CT_HU, 1)
    values = scipy.ndimage.gaussian_filter(values, sigma=(0.0, 0.6, 0.6))
    values += _series_rng(plan, series.name).normal(0.0, 12.0, values.shape)
    return np.clip(values, -1024, 3071)


def _pet_bqml(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """PET activity in Bq/ml, decay corrected to the series start (slices, rows, cols).

    A hot viable rim around a cold necrotic core, blurred (FWHM ~7 mm) with count-like noise.
    """
    table = _PET_SUV.copy()
    table[Tissue.MASS] = plan.mass_suv
    s = _PET_SUPERSAMPLING
    suv, _ = _tissue_image(plan, series, table, s)
    slices, rows, cols = suv.shape
    suv = suv.reshape(slices, rows // s, s, cols // s, s).mean(axis=(2, 4))
    geometry = series.geometry
    sigma_mm = 7.0 / 2.355
    sigma = (
        sigma_mm / geometry.slice_spacing_mm,
        sigma_mm / geometry.pixel_spacing_mm[0],
        sigma_mm / geometry.pixel_spacing_mm[1],
    )
    suv = scipy.ndimage.gaussian_filter(suv, sigma)
    noise = _series_rng(plan, series.name).normal(0.0, 1.0, suv.shape)
    suv = np.maximum(suv + 0.12 * np.sqrt(suv * 0.7) * noise, 0.0)
    bq_per_ml_per_suv = plan.injected_dose_bq * _pet_decay_factor(plan) / (plan.weight_kg * 1000.0)
    return suv * bq_per_ml_per_suv


def _mr_signal(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """MR magnitude (slices, rows, cols): the sequence's contrast, bias field, Rician noise."""
    values, points = _tissue_image(plan, series, _MR_SIGNAL[series.sequence], 1)
    values = scipy.ndimage.gaussian_filter(values, sigma=(0.0, 0.5, 0.5))
    rng = _series_rng(plan, series.name)
    centred_dm = (points - points.reshape(-1, 3).mean(axis=0)) / 100.0  # decimetres
    gradient = rng.normal(0.0, 0.2, 3)
    curvature = rng.normal(0.0, 0.15, 3)
    bias = np.exp(centred_dm @ gradient + (centred_dm**2) @ curvature)
    sigma = 0.03 * _MR_SIGNAL[series.sequence][Tissue.MUSCLE]
    real = values * bias + rng.normal(0.0, sigma, values.shape)
    imaginary = rng.normal(0.0, sigma, values.shape)
    return np.hypot(real, imaginary)


def _ds(value: float, decimals: int = 6) -> float:
    """A float whose shortest repr fits a DICOM DS (16 characters)."""
    return round(float(value), decimals)


def _file_meta(sop_class_uid: str, sop_uid: str, implicit_vr: bool) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit_vr else pydicom.uid.ExplicitVRLittleEndian
    )
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _common_dataset(
    plan: PatientPlan,
    sop_class_uid: str,
    sop_uid: str,
    implicit_vr: bool,
    modality: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    description: str,
    series_time: str,
) -> Dataset:
    """SOP common, patient, general study, general series and equipment modules."""
    is_mr = study_uid == plan.mr_study_uid
    date = plan.mr_date if is_mr else plan.petct_date
    study_time = "083000" if is_mr else plan.petct_study_time
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_uid, implicit_vr)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.StudyTime = study_time
    ds.SeriesTime = series_time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "sarcoma_jax phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR" if is_mr else "PETCT"
    ds.SeriesDescription = description
    ds.PatientName = "ANONYMIZED"
    ds.PatientID = plan.key
    ds.PatientBirthDate = ""
    ds.PatientSex = plan.sex
    ds.PatientAge = f"{plan.age:03d}Y"
    ds.PatientSize = plan.height_m
    ds.PatientWeight = plan.weight_kg
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "EXTREMITY"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    return ds


def _image_datasets(plan: PatientPlan, series: SeriesPlan) -> list[Dataset]:
    """The image files of one series (slices ascending along the normal)."""
    geometry = series.geometry
    if series.modality == "CT":
        values = _ct_hu(plan, series)
        sop_class = pydicom.uid.CTImageStorage
        series_time = plan.ct_series_time
    elif series.modality == "PT":
        values = _pet_bqml(plan, series)
        sop_class = pydicom.uid.PositronEmissionTomographyImageStorage
        series_time = plan.pet_series_time
    else:
        values = _mr_signal(plan, series)
        sop_class = pydicom.uid.MRImageStorage
        series_time = "084500" if series.name == "T1" else "090000"
    orientation = [_ds(v, 8) for v in (*geometry.row_cosine, *geometry.col_cosine)]
    normal = geometry.normal
    datasets = []
    for k, sop_uid in enumerate(series.sop_uids):
        ds = _common_dataset(
            plan,
            sop_class,
            sop_uid,
            series.implicit_vr,
            series.modality,
            series.study_uid,
            series.series_uid,
            series.series_number,
            series.description,
            series_time,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if series.modality == "CT" else "OTHER"]
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = series_time
        ds.PatientPosition = "FFS"
        ds.InstanceNumber = series.instance_numbers[k]
        ds.FrameOfReferenceUID = series.frame.uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v, 4) for v in geometry.positions_mm[k]]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = list(geometry.pixel_spacing_mm)
        ds.SliceThickness = geometry.slice_thickness_mm
        ds.SliceLocation = _ds(geometry.positions_mm[k] @ normal, 4)
        if series.modality == "CT":
            stored = np.round(values[k] + 1024.0).astype(np.int16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
            ds.KVP = 120
            ds.AcquisitionNumber = 1
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
        elif series.modality == "PT":
            _add_pet_attributes(plan, ds, len(series.sop_uids))
            # Per-slice slope so that the slice maximum fills the uint16 range (as scanners do).
            slope = _ds(max(float(values[k].max()), 1.0) / 65000.0, 10)
            stored = np.round(values[k] / slope).astype(np.uint16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
            ds.RescaleIntercept = 0
            ds.RescaleSlope = slope
        else:
            _add_mr_attributes(ds, series.sequence, geometry.slice_spacing_mm)
            stored = np.round(np.clip(values[k], 0, 65535)).astype(np.uint16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
        datasets.append(ds)
    return datasets


def _add_pet_attributes(plan: PatientPlan, ds: Dataset, num_slices: int) -> None:
    """PET series, PET image and PET isotope modules."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT-based"
    ds.ReconstructionMethod = "OSEM"
    ds.NumberOfSlices = num_slices
    ds.ImageIndex = ds.InstanceNumber
    ds.FrameReferenceTime = 0.0
    ds.ActualFrameDuration = 180000
    ds.CollimatorType = "NONE"
    drug = Dataset()
    drug.Radiopharmaceutical = "Fluorodeoxyglucose"
    drug.RadiopharmaceuticalStartTime = plan.injection_time
    drug.RadiopharmaceuticalStartDateTime = plan.petct_date + plan.injection_time
    drug.RadionuclideTotalDose = plan.injected_dose_bq
    drug.RadionuclideHalfLife = F18_HALF_LIFE_S
    drug.RadionuclidePositronFraction = 0.97
    nuclide = Dataset()
    nuclide.CodeValue = "C-111A1"
    nuclide.CodingSchemeDesignator = "SRT"
    nuclide.CodeMeaning = "^18^Fluorine"
    drug.RadionuclideCodeSequence = Sequence([nuclide])
    ds.RadiopharmaceuticalInformationSequence = Sequence([drug])
    ds.PatientOrientationCodeSequence = Sequence()
    ds.PatientGantryRelationshipCodeSequence = Sequence()


def _add_mr_attributes(ds: Dataset, sequence: str, slice_spacing_mm: float) -> None:
    """MR image module: scanning sequence and timing of a T1 SE, T2 FSE with fat sat, or STIR."""
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.TriggerTime = 0
    if sequence == "T1":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 550.0, 12.0, 1
    elif sequence == "STIR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = ["IR", "SE"], ["SK", "SP"], ""
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4500.0, 45.0, 12
        ds.InversionTime = 150.0
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", ["SK", "SP"], "FS"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4000.0, 90.0, 16
    ds.SpacingBetweenSlices = slice_spacing_mm


def _contours_mm(mask: np.ndarray, geometry: SliceGeometry, slice_index: int) -> list[np.ndarray]:
    """Closed contours (n, 3) in patient mm around a boolean slice mask (rows, cols).

    Marching squares at level 0.5 passes half way between inside and outside pixel centres, so an
    even-odd fill of these polygons at the pixel centres gives back exactly the mask.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    contours = []
    for rows_cols in skimage.measure.find_contours(padded, 0.5):
        rows_cols = _drop_collinear(rows_cols[:-1] - 1.0)
        contours.append(geometry.to_patient(slice_index, rows_cols))
    return contours


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Removes vertices (of a closed polygon (n, 2)) that lie on the line through their neighbours.

    Written here because skimage.measure.approximate_polygon imports scipy.signal (seconds).
    """
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(turn) > 1e-9]


def _structure_dataset(plan: PatientPlan, series: SeriesPlan) -> Dataset:
    """The RTSTRUCT outlining ``series`` with GTV_Mass and GTV_Edema."""
    structure = series.structure
    masks = true_masks(plan, series.name)
    sop_class = pydicom.uid.RTStructureSetStorage
    ds = _common_dataset(
        plan,
        sop_class,
        structure.sop_uid,
        structure.implicit_vr,
        "RTSTRUCT",
        series.study_uid,
        structure.series_uid,
        structure.series_number,
        structure.description,
        "120000",
    )
    ds.FrameOfReferenceUID = series.frame.uid
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure.description[:16]
    ds.StructureSetName = structure.description
    ds.StructureSetDate = ds.StudyDate
    ds.StructureSetTime = "120000"
    image_class = {
        "CT": pydicom.uid.CTImageStorage,
        "PT": pydicom.uid.PositronEmissionTomographyImageStorage,
        "MR": pydicom.uid.MRImageStorage,
    }[series.modality]

    def image_reference(sop_uid: str) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image_class
        item.ReferencedSOPInstanceUID = sop_uid
        return item

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = Sequence([image_reference(u) for u in series.sop_uids])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    referenced_study.ReferencedSOPInstanceUID = series.study_uid
    referenced_study.RTReferencedSeriesSequence = Sequence([referenced_series])
    referenced_frame = Dataset()
    referenced_frame.FrameOfReferenceUID = series.frame.uid
    referenced_frame.RTReferencedStudySequence = Sequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([referenced_frame])

    rois, roi_contours, observations = [], [], []
    colours = {"GTV_Mass": [255, 0, 0], "GTV_Edema": [0, 128, 255]}
    for roi_name, roi_number in zip(structure.roi_order, structure.roi_numbers, strict=True):
        roi = Dataset()
        roi.ROINumber = roi_number
        roi.ReferencedFrameOfReferenceUID = series.frame.uid
        roi.ROIName = roi_name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        contour_items = []
        for k in range(len(series.sop_uids)):
            for points_mm in _contours_mm(masks[roi_name][k], series.geometry, k):
                contour = Dataset()
                if structure.contour_images:
                    contour.ContourImageSequence = Sequence([image_reference(series.sop_uids[k])])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points_mm)
                contour.ContourNumber = len(contour_items) + 1
                contour.ContourData = [round(float(v), 3) for v in points_mm.ravel()]
                contour_items.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = colours[roi_name]
        roi_contour.ReferencedROINumber = roi_number
        roi_contour.ContourSequence = Sequence(contour_items)
        roi_contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = roi_number
        observation.ReferencedROINumber = roi_number
        observation.RTROIInterpretedType = "GTV"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def write_patient(plan: PatientPlan, out_dir: str | os.PathLike) -> int:
    """Writes a patient's series and RTSTRUCTs under ``out_dir/<key>/``; returns the file count."""
    patient_dir = pathlib.Path(out_dir) / plan.key
    count = 0
    for series in plan.series.values():
        folder = patient_dir / series.folder
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, ds in zip(series.file_names, _image_datasets(plan, series), strict=True):
            ds.save_as(folder / file_name, enforce_file_format=True)
            count += 1
        structure_folder = patient_dir / series.structure.folder
        structure_folder.mkdir(parents=True, exist_ok=True)
        _structure_dataset(plan, series).save_as(
            structure_folder / "1-1.dcm", enforce_file_format=True
        )
        count += 1
    return count


def write_phantom(
    out_dir: str | os.PathLike,
    num_patients: int,
    seed: int = 0,
    image_size: int = 128,
    num_slices: int = 30,
    progress: bool = True,
) -> list[str]:
    """Writes the phantom collection: DICOM per patient and ``clinical.csv``.

    The collection is built in a temporary folder beside ``out_dir`` and moved into place at the
    end, so an interrupted run leaves nothing half written. The same arguments give the same bytes.

    Args:
      out_dir: destination; must not exist or be an empty folder.
      num_patients: how many patients (PHANTOM_000, PHANTOM_001, ...).
      seed: the phantom's seed.
      image_size: CT and MR rows/columns (PET gets half), at least 16.
      num_slices: CT slices (PET ~0.8x, MR ~2/3x), at least 6.
      progress: show a progress bar.

    Returns:
      The patient keys.

    Raises:
      ValueError: bad arguments.
      FileExistsError: ``out_dir`` exists and is not empty.
    """
    if num_patients < 1:
        raise ValueError(f"num_patients must be at least 1, got {num_patients}")
    if image_size < 16 or num_slices < 6:
        raise ValueError(
            f"image_size >= 16 and num_slices >= 6 needed, got {image_size}, {num_slices}"
        )
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        keys = []
        with open(staging / "clinical.csv", "w", newline="") as clinical:
            writer = csv.writer(clinical, lineterminator="\n")
            writer.writerow(["patient_id", "age", "sex", "site"])
            for index in tqdm.trange(
                num_patients, desc="phantom patients", unit="patient", disable=not progress
            ):
                plan = plan_patient(seed, index, image_size, num_slices)
                write_patient(plan, staging)
                writer.writerow([plan.key, plan.age, plan.sex, plan.site])
                keys.append(plan.key)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return keys


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes under ``folder`` (to compare two runs)."""
    digest = hashlib.sha256()
    root = pathlib.Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program so importing this module defines none."""
    flags.DEFINE_string("out", None, "Folder to write the phantom to (must not exist or be empty).")
    flags.DEFINE_integer("patients", 20, "Number of patients.")
    flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same bytes.")
    flags.DEFINE_integer("image_size", 128, "CT/MR rows and columns (PET gets half).")
    flags.DEFINE_integer("num_slices", 30, "CT slices (PET ~0.8x, MR ~2/3x).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if not FLAGS.out:
        sys.exit("error: --out is required")
    start = time.perf_counter()
    try:
        keys = write_phantom(
            FLAGS.out, FLAGS.patients, FLAGS.seed, FLAGS.image_size, FLAGS.num_slices
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    files = [p for p in pathlib.Path(FLAGS.out).rglob("*.dcm")]
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"wrote {len(keys)} patients, {len(keys) * 2 * len(SERIES_NAMES)} series, "
        f"{len(files)} DICOM files ({megabytes:.1f} MB) and clinical.csv to {FLAGS.out} in "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
