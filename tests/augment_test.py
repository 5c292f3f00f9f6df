"""Tests for sarcoma_jax.augment against independent references (numpy, scipy, float64)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from absl.testing import absltest, parameterized

from sarcoma_jax import augment

# Every option on, at the `:strong` config's values (configs/segment_base.py).
STRONG = augment.Augmentation(
    flip_prob=0.5,
    rotation_prob=0.2,
    rotation_degrees=15.0,
    scale_prob=0.2,
    scale_range=(0.85, 1.25),
    elastic_prob=0.2,
    elastic_sigma=0.08,
    elastic_magnitude=0.02,
    gamma_prob=0.3,
    gamma_range=(0.7, 1.5),
    intensity_scale_prob=0.15,
    intensity_scale_range=(0.75, 1.25),
    intensity_shift_prob=0.15,
    intensity_shift=0.1,
    noise_prob=0.15,
    noise_std=0.05,
)
# Every spatial option drawn for every example, at large settings.
ALL_SPATIAL = augment.Augmentation(
    flip_prob=0.5,
    rotation_prob=1.0,
    rotation_degrees=30.0,
    scale_prob=1.0,
    scale_range=(0.7, 1.4),
    elastic_prob=1.0,
    elastic_magnitude=0.05,
)


def _batch(batch: int = 4, size: int = 24, channels: int = 3, seed: int = 0):
    """Images in [0, 1] and disc masks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, size, size, channels)).astype(np.float32)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((batch, size, size, 1), np.uint8)
    for i in range(batch):
        centre = rng.uniform(size / 3, 2 * size / 3, 2)
        masks[i, ..., 0] = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (size / 5) ** 2
    return images, masks


@functools.cache
def _compiled(augmentation: augment.Augmentation):
    # Eagerly every operation would compile alone; one jit per augmentation, shared by tests.
    return jax.jit(functools.partial(augment.augment_batch, augmentation=augmentation))


def _augment(key, images, masks, augmentation):
    """augment.augment_batch, jit-compiled."""
    return _compiled(augmentation)(key, images, masks)


def _params(height: int, width: int, channels: int = 1, **values) -> dict:
    neutral = {
        "flip": False,
        "angle": 0.0,
        "scale": 1.0,
        "displacement": np.zeros((height, width, 2), np.float32),
        "gamma": 1.0,
        "intensity_scale": 1.0,
        "intensity_shift": 0.0,
        "noise": np.zeros((height, width, channels), np.float32),
    }
    neutral.update(values)
    return {key: jnp.asarray(value) for key, value in neutral.items()}


class SpatialTest(parameterized.TestCase):
    def test_flip_is_exactly_the_mirrored_array(self):
        images, masks = _batch()
        flipped_images, flipped_masks = _augment(
            jax.random.PRNGKey(0), images, masks, augment.Augmentation(flip_prob=1.0)
        )
        np.testing.assert_array_equal(flipped_images, images[:, :, ::-1])
        np.testing.assert_array_equal(flipped_masks, masks[:, :, ::-1])
        self.assertEqual(flipped_masks.dtype, np.uint8)

    @parameterized.named_parameters(
        ("nothing_drawn", augment.Augmentation()),
        (
            "rotation_0_scale_1_drawn_always",
            augment.Augmentation(
                rotation_prob=1.0, rotation_degrees=0.0, scale_prob=1.0, scale_range=(1.0, 1.0)
            ),
        ),
        ("elastic_of_magnitude_0", augment.Augmentation(elastic_prob=1.0)),
        ("gamma_1", augment.Augmentation(gamma_prob=1.0)),
    )
    def test_neutral_settings_are_the_identity(self, augmentation):
        images, masks = _batch(size=17)  # odd and even sizes alike
        out_images, out_masks = _augment(jax.random.PRNGKey(1), images, masks, augmentation)
        np.testing.assert_array_equal(out_images, images)
        np.testing.assert_array_equal(out_masks, masks)

    def test_rotation_by_90_degrees_is_numpy_rot90(self):
        images, masks = _batch(batch=1, size=20, channels=2)
        params = _params(20, 20, angle=math.pi / 2)
        coordinates = augment.sampling_coordinates(params, 20, 20)
        rotated = augment.warp(jnp.asarray(images[0]), coordinates, order=1)
        rotated_mask = augment.warp(jnp.asarray(masks[0], jnp.float32), coordinates, order=0)
        np.testing.assert_allclose(rotated, np.rot90(images[0]), atol=1e-5)
        np.testing.assert_array_equal(rotated_mask, np.rot90(masks[0]))

    def test_coordinates_against_the_inverse_matrix_in_float64(self):
        rng = np.random.default_rng(3)
        height, width = 12, 9
        displacement = rng.normal(0.0, 0.7, (height, width, 2)).astype(np.float32)
        for flip in (False, True):
            angle, scale = 0.37, 1.21
            params = _params(
                height, width, flip=flip, angle=angle, scale=scale, displacement=displacement
            )
            got = np.asarray(augment.sampling_coordinates(params, height, width))
            # Forward map of (p - c): mirror columns, rotate by angle, zoom by scale; the output
            # reads the input at its inverse, plus the displacement.
            mirror = np.diag([1.0, -1.0 if flip else 1.0])
            rotation = np.array(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
            )
            inverse = np.linalg.inv(scale * rotation @ mirror)
            centre = np.array([(height - 1) / 2, (width - 1) / 2])
            pixels = np.stack(np.mgrid[:height, :width], axis=-1).astype(np.float64)
            expected = centre + (pixels - centre) @ inverse.T + displacement
            np.testing.assert_allclose(np.moveaxis(got, 0, -1), expected, atol=1e-5)

    @parameterized.parameters(0, 1)
    def test_warp_equals_scipy_map_coordinates(self, order):
        rng = np.random.default_rng(order)
        image = rng.uniform(0.0, 1.0, (15, 11, 2)).astype(np.float32)
        # Coordinates inside, near and beyond the border.
        coordinates = rng.uniform(-3.0, 17.0, (2, 15, 11)).astype(np.float32)
        got = augment.warp(jnp.asarray(image), jnp.asarray(coordinates), order=order)
        expected = np.stack(
            [
                scipy.ndimage.map_coordinates(
                    image[..., c].astype(np.float64), coordinates, order=order, mode="nearest"
                )
                for c in range(2)
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got, expected, atol=1e-6)

    def test_smooth_field_equals_scipy_gaussian_filter(self):
        noise = np.random.default_rng(4).normal(size=(40, 28, 2)).astype(np.float32)
        got = augment.smooth_field(jnp.asarray(noise), 3.2)
        expected = np.stack(
            [
                scipy.ndimage.gaussian_filter(
                    noise[..., c].astype(np.float64), 3.2, mode="reflect", truncate=3.0
                )
                for c in range(2)
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got, expected, atol=1e-6)

    def test_elastic_displacement_has_the_asked_rms_and_is_smooth(self):
        size = 64
        augmentation = augment.Augmentation(
            elastic_prob=1.0, elastic_sigma=0.1, elastic_magnitude=0.03
        )
        params = jax.jit(lambda key: augment.sample_parameters(key, augmentation, (size, size, 1)))(
            jax.random.PRNGKey(5)
        )
        displacement = np.asarray(params["displacement"], np.float64)
        self.assertAlmostEqual(np.sqrt(np.mean(displacement**2)), 0.03 * size, places=4)
        # Smooth: neighbouring pixels move almost alike (white noise would not).
        step = np.abs(np.diff(displacement, axis=0)).mean()
        self.assertLess(step, 0.2 * np.abs(displacement).mean())

    def test_image_and_mask_move_together(self):
        # The image is the mask itself: wherever its linear resampling is exactly 0 or 1 (all
        # four source pixels alike), the nearest-neighbour mask must hold that value.
        _, masks = _batch(batch=4, size=32)
        images = masks.astype(np.float32)
        out_images, out_masks = _augment(jax.random.PRNGKey(6), images, masks, ALL_SPATIAL)
        out_images, out_masks = np.asarray(out_images), np.asarray(out_masks)
        settled = (out_images == 0.0) | (out_images == 1.0)
        self.assertGreater(settled.mean(), 0.8)
        np.testing.assert_array_equal(out_masks[settled], out_images[settled].astype(np.uint8))
        self.assertFalse(np.array_equal(out_masks, masks))  # it did move

    def test_nearest_keeps_the_mask_binary(self):
        images, masks = _batch(batch=4, size=32, channels=1)
        _, out_masks = _augment(jax.random.PRNGKey(7), images, masks, ALL_SPATIAL)
        self.assertEqual(out_masks.dtype, np.uint8)
        self.assertContainsSubset(set(np.unique(out_masks).tolist()), {0, 1})
        self.assertGreater(int(out_masks.sum()), 0)


class IntensityTest(absltest.TestCase):
    def test_against_numpy_float64(self):
        rng = np.random.default_rng(8)
        image = rng.uniform(0.0, 1.0, (10, 12, 3)).astype(np.float32)
        noise = rng.normal(0.0, 0.03, (10, 12, 3)).astype(np.float32)
        for gamma in (0.7, 1.0, 1.4):
            params = _params(
                10, 12, 3, gamma=gamma, intensity_scale=1.2, intensity_shift=-0.05, noise=noise
            )
            got = augment.adjust_intensity(jnp.asarray(image), params)
            expected = np.power(image.astype(np.float64), gamma) * 1.2 - 0.05 + noise
            np.testing.assert_allclose(got, expected, atol=2e-6)

    def test_draws_stay_in_their_ranges(self):
        augmentation = augment.Augmentation(
            gamma_prob=0.5,
            gamma_range=(0.7, 1.5),
            intensity_scale_prob=0.5,
            intensity_scale_range=(0.75, 1.25),
            intensity_shift_prob=0.5,
            intensity_shift=0.1,
            noise_prob=0.5,
            noise_std=0.05,
        )
        draws = jax.jit(
            jax.vmap(lambda key: augment.sample_parameters(key, augmentation, (8, 8, 1)))
        )(jax.random.split(jax.random.PRNGKey(9), 400))
        gamma, scale = np.asarray(draws["gamma"]), np.asarray(draws["intensity_scale"])
        shift, noise = np.asarray(draws["intensity_shift"]), np.asarray(draws["noise"])
        for values, neutral, (low, high) in (
            (gamma, 1.0, (0.7, 1.5)),
            (scale, 1.0, (0.75, 1.25)),
            (shift, 0.0, (-0.1, 0.1)),
        ):
            drawn = values != neutral
            self.assertBetween(drawn.mean(), 0.4, 0.6)  # probability 0.5
            self.assertTrue(np.all((values[drawn] >= low) & (values[drawn] <= high)))
        noise_std = noise.reshape(400, -1).std(axis=1)
        self.assertBetween((noise_std > 0).mean(), 0.4, 0.6)
        self.assertLess(noise_std.max(), 0.05 * 1.6)  # 64 samples of a std <= 0.05


class DeterminismTest(absltest.TestCase):
    def test_same_key_same_batch_other_key_other_batch(self):
        images, masks = _batch()
        first = _augment(jax.random.PRNGKey(10), images, masks, STRONG)
        again = _augment(jax.random.PRNGKey(10), images, masks, STRONG)
        other = _augment(jax.random.PRNGKey(11), images, masks, STRONG)
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b)
        self.assertFalse(np.array_equal(first[0], other[0]))

    def test_examples_of_a_batch_get_their_own_draws(self):
        images, masks = _batch(batch=4)
        images[1], masks[1] = images[0], masks[0]
        out_images, _ = _augment(jax.random.PRNGKey(12), images, masks, STRONG)
        self.assertFalse(np.array_equal(out_images[0], out_images[1]))


class ConfigTest(absltest.TestCase):
    def test_from_config(self):
        self.assertIsNone(augment.Augmentation.from_config(None))
        self.assertIsNone(augment.Augmentation.from_config({"enabled": False, "flip_prob": 1.0}))
        made = augment.Augmentation.from_config(
            {"enabled": True, "flip_prob": 1, "scale_range": [0.9, 1.1]}
        )
        self.assertEqual(made, augment.Augmentation(flip_prob=1.0, scale_range=(0.9, 1.1)))
        hash(made)  # a static argument of jit-compiled steps

    def test_bad_values_name_the_field(self):
        for fields, fragment in (
            ({"flip_prob": 1.5}, "config.augment.flip_prob must be in [0, 1]"),
            ({"scale_range": (1.2, 0.9)}, "config.augment.scale_range"),
            ({"gamma_range": (0.0, 1.0)}, "config.augment.gamma_range"),
            ({"noise_std": -0.1}, "config.augment.noise_std must be >= 0"),
            ({"elastic_sigma": 0.0}, "config.augment.elastic_sigma must be > 0"),
            ({"flip_probability": 0.5}, "config.augment.flip_probability is not"),
        ):
            with self.assertRaisesRegex(ValueError, fragment.replace("[", r"\[")):
                augment.Augmentation.from_config({"enabled": True, **fields})


if __name__ == "__main__":
    absltest.main()
