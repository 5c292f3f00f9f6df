"""The phantom's anatomy: a limb (fat, muscle, bone) with an irregular tumour and oedema."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np


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


def unit_vector(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix (3, 3) about ``axis`` (Rodrigues)."""
    x, y, z = unit_vector(np.asarray(axis, np.float64))
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
            unit_vector(rng.normal(size=(count, 3))),
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


def sample_anatomy(rng: np.random.Generator, site: str) -> Anatomy:
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
    axes = rotation_matrix(rng.normal(size=3), rng.uniform(0, np.pi)) @ rotation_matrix(
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
        texture_waves=unit_vector(rng.normal(size=(4, 3))) * (2 * np.pi / wavelengths)[:, None],
        texture_phases=rng.uniform(0, 2 * np.pi, 4),
    )
