"""Training-time augmentation on the device (`config.augment`), pure and jit-compiled in the step.

Per example, with probabilities and ranges from `Augmentation`:
  spatial    left-right flip, rotation, isotropic scaling and an elastic deformation, composed into
             one map of sampling coordinates, so the image is resampled once: linearly
             (`jax.scipy.ndimage.map_coordinates`, order 1) and the mask by nearest neighbour
             (order 0, so it stays binary); beyond the border the edge pixel repeats ('nearest').
  intensity  then, on the image only (every channel alike): gamma, scale, shift, Gaussian noise.

Everything is drawn from one `jax.random` key (segment/steps.py derives it from the state's rng
and step), so a run is deterministic per seed and a resumed run draws what the uninterrupted one
did. Conventions: images are (h, w, c) in [0, 1] (c = 1, or 2k + 1 with 2.5D context), masks
(h, w, 1); rows run down, columns across, and "left-right" mirrors the columns.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

# Gaussian kernel of the elastic field: taps out to this many sigmas on each side.
ELASTIC_TRUNCATE = 3.0


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What to draw for each training example; every default leaves the example unchanged.

    Lengths are fractions of the image side, so one setting means the same at 32 and 128 pixels.

    Attributes:
      flip_prob: probability of a left-right mirror.
      rotation_prob, rotation_degrees: probability of a rotation by an angle uniform in
        [-rotation_degrees, rotation_degrees].
      scale_prob, scale_range: probability of a zoom by a factor uniform in scale_range (> 1
        enlarges the anatomy).
      elastic_prob, elastic_sigma, elastic_magnitude: probability of an elastic deformation
        (Simard et al. 2003): white noise per axis smoothed by a Gaussian of std elastic_sigma,
        scaled to a root-mean-square displacement of elastic_magnitude.
      gamma_prob, gamma_range: probability of x -> x ** gamma, gamma uniform in gamma_range.
      intensity_scale_prob, intensity_scale_range: probability of x -> a x, a uniform in the range.
      intensity_shift_prob, intensity_shift: probability of x -> x + b, b uniform in
        [-intensity_shift, intensity_shift].
      noise_prob, noise_std: probability of adding Gaussian noise whose std is uniform in
        [0, noise_std] (one std per example, fresh noise per pixel).
    """

    flip_prob: float = 0.0
    rotation_prob: float = 0.0
    rotation_degrees: float = 0.0
    scale_prob: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    elastic_prob: float = 0.0
    elastic_sigma: float = 0.08
    elastic_magnitude: float = 0.0
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (1.0, 1.0)
    intensity_scale_prob: float = 0.0
    intensity_scale_range: tuple[float, float] = (1.0, 1.0)
    intensity_shift_prob: float = 0.0
    intensity_shift: float = 0.0
    noise_prob: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not field.name.endswith("_range"):
                value = float(value)
                object.__setattr__(self, field.name, value)
            if field.name.endswith("_prob") and not 0.0 <= value <= 1.0:
                raise ValueError(f"config.augment.{field.name} must be in [0, 1], got {value}")
            if field.name.endswith("_range"):
                if len(value) != 2 or not 0.0 < value[0] <= value[1]:
                    raise ValueError(
                        f"config.augment.{field.name} must be (low, high) with 0 < low <= high, "
                        f"got {value}"
                    )
                object.__setattr__(self, field.name, (float(value[0]), float(value[1])))
        for name in ("rotation_degrees", "elastic_magnitude", "intensity_shift", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"config.augment.{name} must be >= 0, got {getattr(self, name)}")
        if not self.elastic_sigma > 0:
            raise ValueError(f"config.augment.elastic_sigma must be > 0, got {self.elastic_sigma}")

    @classmethod
    def from_config(cls, augment_config: Mapping[str, Any] | None) -> "Augmentation | None":
        """The augmentation that `config.augment` describes, or None when it is off (or absent).

        The values are checked even when it is off, so that switching it on cannot fail later.

        Raises:
          ValueError: an unknown field or a value out of range (one line naming the field).
        """
        if not augment_config:
            return None
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(augment_config) - names - {"enabled"})
        if unknown:
            raise ValueError(f"config.augment.{unknown[0]} is not an augmentation option")
        augmentation = cls(
            **{name: augment_config[name] for name in names if name in augment_config}
        )
        return augmentation if augment_config.get("enabled") else None


@functools.lru_cache(maxsize=16)
def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) float32 M with M @ x = scipy.ndimage.gaussian_filter1d(x, sigma) along axis 0
    (mode 'reflect', taps out to ELASTIC_TRUNCATE sigmas): the filter of each unit vector."""
    return scipy.ndimage.gaussian_filter1d(
        np.eye(size), sigma, axis=0, mode="reflect", truncate=ELASTIC_TRUNCATE
    ).astype(np.float32)


def smooth_field(noise: jax.Array, sigma: float) -> jax.Array:
    """A (h, w, c) field convolved per channel with a Gaussian of std `sigma` pixels, as
    scipy.ndimage.gaussian_filter (mode 'reflect', ELASTIC_TRUNCATE) does on each channel.

    Two matrix products with the filter's banded matrices (`gaussian_matrix`) rather than a
    convolution: XLA:CPU runs a 63-tap depthwise convolution of a 128x128 field (dm_pix's
    gaussian_blur) in ~115 ms, these products in well under 1 ms.
    """
    height, width, _ = noise.shape
    rows = jnp.asarray(gaussian_matrix(height, float(sigma)))
    cols = jnp.asarray(gaussian_matrix(width, float(sigma)))
    return jnp.einsum("ij,jkc,lk->ilc", rows, noise, cols, precision=jax.lax.Precision.HIGHEST)


def sample_parameters(
    key: jax.Array, augmentation: Augmentation, image_shape: tuple[int, int, int]
) -> dict[str, jax.Array]:
    """One example's random transform.

    All scalars come from two uniform draws of one call (whether, and what), the elastic field
    and the noise from one normal draw each: few random-number calls, because XLA:CPU compiles
    each one slowly (about a second apiece here).

    Returns:
      {'flip': bool, 'angle': radians, 'scale', 'displacement': (h, w, 2) pixels (rows, cols),
       'gamma', 'intensity_scale', 'intensity_shift', 'noise': (h, w, c)}; neutral values
      (False, 0, 1, zeros, 1, 1, 0, zeros) for what was not drawn.
    """
    height, width, channels = image_shape
    a = augmentation
    # name: (probability, low, high, neutral value)
    scalars = {
        "flip": (a.flip_prob, 0.0, 1.0, 0.0),
        "degrees": (a.rotation_prob, -a.rotation_degrees, a.rotation_degrees, 0.0),
        "scale": (a.scale_prob, *a.scale_range, 1.0),
        "elastic": (a.elastic_prob, 0.0, 1.0, 0.0),
        "gamma": (a.gamma_prob, *a.gamma_range, 1.0),
        "intensity_scale": (a.intensity_scale_prob, *a.intensity_scale_range, 1.0),
        "intensity_shift": (a.intensity_shift_prob, -a.intensity_shift, a.intensity_shift, 0.0),
        "noise_std": (a.noise_prob, 0.0, a.noise_std, 0.0),
    }
    probs, lows, highs, neutrals = (
        jnp.asarray(column, jnp.float32) for column in zip(*scalars.values(), strict=True)
    )
    scalar_key, field_key, noise_key = jax.random.split(key, 3)
    whether, what = jax.random.uniform(scalar_key, (2, len(scalars)), jnp.float32)
    values = jnp.where(whether < probs, lows + (highs - lows) * what, neutrals)
    drawn = dict(zip(scalars, values, strict=True))

    side = min(height, width)
    displacement = jnp.zeros((height, width, 2), jnp.float32)
    if a.elastic_prob > 0 and a.elastic_magnitude > 0:  # static: no field computed when off
        field = smooth_field(
            jax.random.normal(field_key, (height, width, 2), jnp.float32), a.elastic_sigma * side
        )
        rms = jnp.sqrt(jnp.mean(jnp.square(field)))
        elastic = whether[list(scalars).index("elastic")] < a.elastic_prob
        displacement = jnp.where(elastic, field * (a.elastic_magnitude * side / rms), displacement)
    noise = jnp.zeros((height, width, channels), jnp.float32)
    if a.noise_prob > 0 and a.noise_std > 0:
        noise = drawn["noise_std"] * jax.random.normal(noise_key, noise.shape, jnp.float32)
    return {
        "flip": whether[0] < a.flip_prob,
        "angle": jnp.deg2rad(drawn["degrees"]),
        "scale": drawn["scale"],
        "displacement": displacement,
        "gamma": drawn["gamma"],
        "intensity_scale": drawn["intensity_scale"],
        "intensity_shift": drawn["intensity_shift"],
        "noise": noise,
    }


def sampling_coordinates(params: Mapping[str, jax.Array], height: int, width: int) -> jax.Array:
    """(2, h, w): the input (row, col) each output pixel reads.

    With c the image centre and p an output pixel, q = c + F R(-angle) (p - c) / scale + d(p): F
    mirrors the columns when flip is set, R(a) = [[cos a, -sin a], [sin a, cos a]] acts on
    (row, col), d is the displacement. So the output is the input mirrored, then rotated by
    `angle` (90 degrees equals np.rot90: counter-clockwise as displayed), then zoomed by `scale`,
    then deformed.
    """
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32) - centre_row,
        jnp.arange(width, dtype=jnp.float32) - centre_col,
        indexing="ij",
    )
    cos, sin = jnp.cos(params["angle"]), jnp.sin(params["angle"])
    # R(-angle) (p - c), exactly p - c when the angle is 0 (cos 1, sin 0).
    rotated_rows = cos * rows + sin * cols
    rotated_cols = cos * cols - sin * rows
    rotated_cols = jnp.where(params["flip"], -rotated_cols, rotated_cols)
    displacement = params["displacement"]
    return jnp.stack(
        [
            centre_row + rotated_rows / params["scale"] + displacement[..., 0],
            centre_col + rotated_cols / params["scale"] + displacement[..., 1],
        ]
    )


def warp(array: jax.Array, coordinates: jax.Array, order: int) -> jax.Array:
    """Resamples every channel of an (h, w, c) array at (2, h, w) coordinates: order 1 linear,
    order 0 nearest; the edge repeats beyond the border."""

    def warp_channel(channel: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(
            channel, [coordinates[0], coordinates[1]], order=order, mode="nearest"
        )

    return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(array)


def adjust_intensity(image: jax.Array, params: Mapping[str, jax.Array]) -> jax.Array:
    """gamma (on the image clipped to [0, 1]), then scale, shift and noise, in that order."""
    gamma = params["gamma"]
    image = jnp.where(gamma != 1.0, jnp.power(jnp.clip(image, 0.0, 1.0), gamma), image)
    return image * params["intensity_scale"] + params["intensity_shift"] + params["noise"]


def augment_example(
    key: jax.Array, image: jax.Array, mask: jax.Array, augmentation: Augmentation
) -> tuple[jax.Array, jax.Array]:
    """One example's image (h, w, c) float and mask (h, w, 1), transformed together."""
    height, width, _ = image.shape
    params = sample_parameters(key, augmentation, image.shape)
    coordinates = sampling_coordinates(params, height, width)
    warped_image = warp(image.astype(jnp.float32), coordinates, order=1)
    warped_mask = warp(mask.astype(jnp.float32), coordinates, order=0).astype(mask.dtype)
    return adjust_intensity(warped_image, params).astype(image.dtype), warped_mask


def augment_batch(
    key: jax.Array, images: jax.Array, masks: jax.Array, augmentation: Augmentation
) -> tuple[jax.Array, jax.Array]:
    """A batch (b, h, w, c) and its masks (b, h, w, 1), each example with its own key from `key`."""
    keys = jax.random.split(key, images.shape[0])
    example = functools.partial(augment_example, augmentation=augmentation)
    return jax.vmap(example)(keys, images, masks)
