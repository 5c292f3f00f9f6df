"""Tests for the per-slice .npz files: both writers (ISA-L + our zip, zipfile), dtypes, bytes."""

import io
import os
import tempfile
import warnings
import zipfile
from unittest import mock

import numpy as np
from absl.testing import absltest, parameterized

from data_pipeline import fast_paths, slice_store


class SliceFileTest(parameterized.TestCase):
    @parameterized.parameters(True, False)
    def test_values_survive_whatever_dtype_stores_them(self, fast):
        hu = np.array([[-1024.0, 0.0], [3071.0, 40.0]], np.float32)  # integral: stored as int16
        suv = np.array([[0.25, 1.5], [7.125, 0.0]], np.float32)  # fractional: stored as float32
        huge = np.array([[1e6, 0.0], [1.0, 2.0]], np.float32)  # beyond int16: float32
        mask = np.array([[True, False], [False, True]])
        with tempfile.TemporaryDirectory() as folder:
            for name, image, stored_dtype in (
                ("hu", hu, np.int16),
                ("suv", suv, np.float32),
                ("huge", huge, np.float32),
            ):
                path = os.path.join(folder, f"{name}.npz")
                self.assertEqual(slice_store.write_slice(path, image, mask, fast), 2)
                with np.load(path) as arrays:
                    self.assertEqual(arrays["image"].dtype, stored_dtype)
                loaded_image, loaded_mask = slice_store.read_slice(path)
                self.assertEqual(loaded_image.dtype, np.float32)
                np.testing.assert_array_equal(loaded_image, image)
                np.testing.assert_array_equal(loaded_mask, mask.astype(np.uint8))

    @parameterized.parameters(True, False)
    def test_archive_is_a_valid_deflated_zip_with_fixed_bytes(self, fast):
        rng = np.random.default_rng(0)
        image = rng.normal(0.0, 50.0, (64, 48)).round().astype(np.float32)
        mask = rng.random((64, 48)) > 0.7
        with tempfile.TemporaryDirectory() as folder:
            first, second = os.path.join(folder, "a.npz"), os.path.join(folder, "b.npz")
            slice_store.write_slice(first, image, mask, fast)
            slice_store.write_slice(second, image, mask, fast)
            with open(first, "rb") as a, open(second, "rb") as b:
                self.assertEqual(a.read(), b.read())
            with zipfile.ZipFile(first) as archive:
                self.assertIsNone(archive.testzip())  # every member's CRC checks out
                infos = archive.infolist()
                self.assertEqual([info.filename for info in infos], ["image.npy", "mask.npy"])
                for info in infos:
                    self.assertEqual(info.compress_type, zipfile.ZIP_DEFLATED)
                    self.assertEqual(info.date_time, (1980, 1, 1, 0, 0, 0))
                    self.assertLess(info.compress_size, info.file_size)
                # The members are the .npy bytes numpy itself writes for these arrays.
                expected = io.BytesIO()
                np.lib.format.write_array(expected, mask, allow_pickle=False)
                self.assertEqual(archive.read("mask.npy"), expected.getvalue())
            with np.load(first) as arrays:
                np.testing.assert_array_equal(arrays["image"], image.astype(np.int16))
                np.testing.assert_array_equal(arrays["mask"], mask)

    def test_values_beyond_int16_write_without_a_warning(self):
        image = np.array([[1e30, -3e38], [0.5, 2.0]], np.float32)
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("error")
            path = os.path.join(folder, "huge.npz")
            slice_store.write_slice(path, image, np.zeros((2, 2), bool))
            np.testing.assert_array_equal(slice_store.read_slice(path)[0], image)

    def test_both_writers_store_the_same_members(self):
        rng = np.random.default_rng(1)
        image = rng.normal(0.0, 2.0, (40, 30)).astype(np.float32)
        mask = rng.random((40, 30)) > 0.5
        with tempfile.TemporaryDirectory() as folder:
            fast, slow = os.path.join(folder, "fast.npz"), os.path.join(folder, "slow.npz")
            slice_store.write_slice(fast, image, mask, True)
            slice_store.write_slice(slow, image, mask, False)
            with zipfile.ZipFile(fast) as a, zipfile.ZipFile(slow) as b:
                for name in ("image.npy", "mask.npy"):
                    self.assertEqual(a.read(name), b.read(name))

    def test_environment_switch(self):
        for value, expected in (
            ("", True),
            ("1", True),
            ("true", True),
            ("0", False),
            ("off", False),
        ):
            with mock.patch.dict(os.environ, {fast_paths.ENV_VAR: value}):
                self.assertEqual(fast_paths.enabled(), expected, value)
                self.assertTrue(fast_paths.enabled(True))
                self.assertFalse(fast_paths.enabled(False))
        with mock.patch.dict(os.environ, {fast_paths.ENV_VAR: "maybe"}):
            with self.assertRaisesRegex(ValueError, "SARCOMA_JAX_FAST_PATHS='maybe'"):
                fast_paths.enabled()


if __name__ == "__main__":
    absltest.main()
