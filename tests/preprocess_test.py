"""Tests for data_pipeline.preprocess: nearest-neighbour resize and min-max scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import skimage.transform
from absl.testing import absltest, parameterized

from data_pipeline import preprocess


def skimage_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """Independent reference: scikit-image's order-0 resize without smoothing."""
    return skimage.transform.resize(
        array, (size, size), order=0, anti_aliasing=False, preserve_range=True, mode="edge"
    )


class NearestIndicesTest(parameterized.TestCase):
    @parameterized.parameters(
        # Output pixel centres (i + 0.5) * size_in / size_out, floored, worked out by hand.
        (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),  # centres 0.25, 0.75, 1.25, ...
        (8, 4, [1, 3, 5, 7]),  # centres 1, 3, 5, 7: exactly on boundaries, take the right pixel.
        (6, 4, [0, 2, 3, 5]),  # centres 0.75, 2.25, 3.75, 5.25.
        (5, 3, [0, 2, 4]),  # centres 0.833, 2.5, 4.167.
        (3, 1, [1]),
        (7, 7, [0, 1, 2, 3, 4, 5, 6]),
    )
    def test_hand_computed(self, size_in, size_out, expected):
        np.testing.assert_array_equal(preprocess.nearest_indices(size_in, size_out), expected)

    def test_512_to_128_takes_every_fourth_pixel_from_the_third(self):
        np.testing.assert_array_equal(preprocess.nearest_indices(512, 128), 2 + 4 * np.arange(128))

    def test_bad_size_raises(self):
        with self.assertRaises(ValueError):
            preprocess.nearest_indices(0, 4)


class ResizeNearestTest(parameterized.TestCase):
    def test_hand_computed_4x4_to_2x2(self):
        array = np.arange(16).reshape(4, 4)
        np.testing.assert_array_equal(preprocess.resize_nearest(array, 2), [[5, 7], [13, 15]])

    @parameterized.parameters(
        ((512, 512), 128), ((100, 140), 128), ((37, 53), 16), ((128, 128), 128), ((3, 200), 64)
    )
    def test_equals_skimage_and_jax(self, shape, size):
        image = np.random.default_rng(0).normal(size=shape) * 1000.0
        resized = preprocess.resize_nearest(image, size)
        np.testing.assert_array_equal(resized, skimage_nearest(image, size))
        jax_resized = jax.image.resize(
            jnp.asarray(image, jnp.float32), (size, size), method="nearest"
        )
        np.testing.assert_array_equal(resized.astype(np.float32), np.asarray(jax_resized))

    def test_keeps_dtype_and_values(self):
        labels = np.random.default_rng(1).integers(0, 3, size=(50, 70)).astype(np.uint8)
        resized = preprocess.resize_nearest(labels, 32)
        self.assertEqual(resized.dtype, np.uint8)
        self.assertLessEqual(set(np.unique(resized)), {0, 1, 2})

    def test_rejects_3d(self):
        with self.assertRaises(ValueError):
            preprocess.resize_nearest(np.zeros((2, 4, 4)), 2)


class MinMaxTest(absltest.TestCase):
    def test_hand_computed(self):
        np.testing.assert_allclose(
            preprocess.min_max(np.array([[0.0, 5.0], [10.0, 20.0]])), [[0, 0.25], [0.5, 1]]
        )
        np.testing.assert_allclose(
            preprocess.min_max(np.array([-1000.0, 0.0, 1000.0])), [0, 0.5, 1]
        )

    def test_constant_image_gives_zeros(self):
        scaled = preprocess.min_max(np.full((4, 4), 7.5))
        self.assertEqual(scaled.dtype, np.float32)
        np.testing.assert_array_equal(scaled, np.zeros((4, 4)))

    def test_non_finite_raises(self):
        with self.assertRaises(ValueError):
            preprocess.min_max(np.array([0.0, np.nan, 1.0]))


class PreprocessTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(2)
        self.image_hu = rng.normal(40.0, 300.0, size=(96, 80)).astype(np.float32)
        self.mask = np.zeros((96, 80), np.uint8)
        self.mask[30:60, 20:50] = 1

    def test_shapes_dtypes_and_range(self):
        image, mask = preprocess.preprocess(self.image_hu, self.mask, image_size=32)
        self.assertEqual((image.shape, image.dtype), ((32, 32, 1), np.float32))
        self.assertEqual((mask.shape, mask.dtype), ((32, 32, 1), np.uint8))
        self.assertEqual((image.min(), image.max()), (0.0, 1.0))
        self.assertEqual(set(np.unique(mask)), {0, 1})

    def test_default_size_is_128(self):
        image, mask = preprocess.preprocess(self.image_hu, self.mask)
        self.assertEqual(image.shape, (128, 128, 1))
        self.assertEqual(mask.shape, (128, 128, 1))

    def test_against_float64_reference(self):
        image, mask = preprocess.preprocess(self.image_hu, self.mask, image_size=40)
        resized = skimage_nearest(self.image_hu.astype(np.float64), 40)
        expected = (resized - resized.min()) / (resized.max() - resized.min())
        np.testing.assert_allclose(image[..., 0], expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(mask[..., 0], skimage_nearest(self.mask, 40))

    def test_mask_follows_the_image_map(self):
        # A mask drawn from the image, resized, must equal the mask drawn from the resized image.
        threshold_hu = 100.0
        mask = (self.image_hu > threshold_hu).astype(np.uint8)
        image, resized_mask = preprocess.preprocess(self.image_hu, mask, image_size=57)
        resized_image_hu = preprocess.resize_nearest(self.image_hu, 57)
        np.testing.assert_array_equal(resized_mask[..., 0], resized_image_hu > threshold_hu)

    def test_nonbinary_mask_becomes_0_1(self):
        _, mask = preprocess.preprocess(self.image_hu, self.mask.astype(bool), image_size=16)
        _, mask_255 = preprocess.preprocess(self.image_hu, self.mask * 255, image_size=16)
        np.testing.assert_array_equal(mask, mask_255)
        self.assertEqual(mask.max(), 1)

    def test_same_result_for_any_linear_intensity_scale(self):
        # Domains stored in different units (HU, SUV, MR signal) all end up in [0, 1] the same way.
        image, _ = preprocess.preprocess(self.image_hu, self.mask, image_size=32)
        rescaled, _ = preprocess.preprocess(self.image_hu * 0.01 + 3.0, self.mask, image_size=32)
        np.testing.assert_allclose(image, rescaled, atol=1e-5)

    def test_shape_mismatch_raises(self):
        with self.assertRaises(ValueError):
            preprocess.preprocess(self.image_hu, self.mask[:-1])


if __name__ == "__main__":
    absltest.main()
