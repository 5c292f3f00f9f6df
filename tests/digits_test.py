"""Tests for sarcoma_jax.digits: the offline pair, SVHN/MNIST through tfds, the task, the table."""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl.testing import absltest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from tensorflow_datasets.image_classification import mnist

from configs import adda_digits_offline, adda_svhn_mnist
from data_pipeline import vocabulary
from sarcoma_jax import models
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.digits import classifier, tfds_builders
from sarcoma_jax.digits import data as digits_data
from sarcoma_jax.digits import task as digits_task
from sarcoma_jax.report import digits as report_digits

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class _TempDirMixin:
    """Temporary folders removed after the test (absltest's create_tempdir needs parsed flags)."""

    def _temp_dir(self) -> pathlib.Path:
        temp_dir = tempfile.TemporaryDirectory()
        self.addCleanup(temp_dir.cleanup)
        return pathlib.Path(temp_dir.name)


class ModelImagesTest(absltest.TestCase):
    def test_rgb_is_itu_601_luma_over_255(self):
        rgb = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
        expected = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
        got = digits_data.to_model_images(rgb)
        self.assertEqual(got.shape, (3, 28, 28, 1))
        self.assertEqual(got.dtype, np.float32)
        # PIL rounds the luma to uint8: within half a grey level.
        np.testing.assert_allclose(got[..., 0], expected, atol=0.5 / 255 + 1e-6)

    def test_gray_28_is_only_scaled(self):
        gray = np.arange(28 * 28, dtype=np.int64).reshape(1, 28, 28, 1) % 256
        got = digits_data.to_model_images(gray.astype(np.uint8))
        np.testing.assert_allclose(got, gray / 255.0, rtol=1e-6)

    def test_32_to_28_keeps_a_constant_image_and_a_left_right_split(self):
        image = np.full((1, 32, 32, 1), 200, np.uint8)
        image[:, :, 16:] = 20
        got = digits_data.to_model_images(image)[0, ..., 0] * 255
        np.testing.assert_allclose(got[:, :12], 200, atol=0.5)
        np.testing.assert_allclose(got[:, 16:], 20, atol=0.5)

    def test_rejects_float_images(self):
        with self.assertRaises(ValueError):
            digits_data.to_model_images(np.zeros((1, 28, 28, 1), np.float32))


class OfflinePairTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sizes = (400, 100, 40)
        cls.source, cls.target = digits_data.offline_pair(3, cls.sizes)

    def test_shapes_dtypes_ranges_and_sizes(self):
        for domain, sizes in ((self.source, self.sizes), (self.target, (1078, 359, 360))):
            for split, size in zip(vocabulary.SPLITS, sizes, strict=True):
                data = domain[split]
                self.assertEqual(data.images.shape, (size, 28, 28, 1))
                self.assertEqual(data.images.dtype, np.float32)
                self.assertEqual(data.labels.dtype, np.int32)
                self.assertGreaterEqual(data.images.min(), 0.0)
                self.assertLessEqual(data.images.max(), 1.0)
                self.assertTrue(np.all((data.labels >= 0) & (data.labels <= 9)))

    def test_deterministic_per_seed(self):
        again_source, again_target = digits_data.offline_pair(3, self.sizes)
        other_source, other_target = digits_data.offline_pair(4, self.sizes)
        for split in vocabulary.SPLITS:
            np.testing.assert_array_equal(again_source[split].images, self.source[split].images)
            np.testing.assert_array_equal(again_target[split].labels, self.target[split].labels)
        self.assertFalse(np.array_equal(other_source["train"].images, self.source["train"].images))
        self.assertFalse(np.array_equal(other_target["test"].labels, self.target["test"].labels))

    def test_source_classes_balanced(self):
        labels = np.concatenate([self.source[split].labels for split in vocabulary.SPLITS])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 54))

    def test_target_splits_partition_the_handwritten_digits(self):
        everything = digits_data.load_handwritten_digits()
        images = np.concatenate([self.target[split].images for split in vocabulary.SPLITS])
        labels = np.concatenate([self.target[split].labels for split in vocabulary.SPLITS])
        order = _match_by_content(images, everything.images)
        np.testing.assert_array_equal(np.sort(order), np.arange(1797))
        np.testing.assert_array_equal(labels, everything.labels[order])

    def test_handwritten_digits_are_scikit_learns_upsampled(self):
        reference = load_digits()
        handwritten = digits_data.load_handwritten_digits()
        np.testing.assert_array_equal(handwritten.labels, reference.target)
        # Averaged back over an 8x8 grid, the central 20x20 box is the 8x8 original again.
        centre = handwritten.images[:, 4:24, 4:24, 0]
        coarse = np.stack([_area_downsample(image, 8) for image in centre])
        # (Bicubic overshoot and smoothing keep it from being exact: compare patterns.)
        flat_coarse = coarse.reshape(len(coarse), -1)
        flat_reference = reference.images.reshape(len(coarse), -1) / 16.0
        self.assertGreater(np.corrcoef(flat_coarse.ravel(), flat_reference.ravel())[0, 1], 0.95)
        distances = (
            (flat_coarse**2).sum(1)[:, None]
            - 2 * flat_coarse @ flat_reference.T
            + (flat_reference**2).sum(1)[None, :]
        )
        nearest_is_itself = np.argmin(distances, axis=1) == np.arange(len(coarse))
        self.assertGreater(nearest_is_itself.mean(), 0.99)

    def test_target_is_white_on_black_in_a_20x20_box(self):
        images = self.target["train"].images[..., 0]
        border = np.concatenate(
            [images[:, :4].ravel(), images[:, 24:].ravel(), images[:, :, :4].ravel()]
        )
        np.testing.assert_array_equal(border, 0.0)
        self.assertLess(images.mean(), 0.3)  # mostly black background

    def test_rendered_digits_carry_their_labels(self):
        # A linear classifier on polarity-free pixels (|x - median|, standardised) learns the
        # rendered labels far above chance (0.1): the label is in the image, not noise.
        def features(images):
            flat = images.reshape(len(images), -1)
            deviation = np.abs(flat - np.median(flat, axis=1, keepdims=True))
            return (deviation - deviation.mean(1, keepdims=True)) / deviation.std(1, keepdims=True)

        train, test = self.source["train"], self.source["val"]
        classifier = LogisticRegression(max_iter=500, C=0.1)
        classifier.fit(features(train.images), train.labels)
        self.assertGreater(classifier.score(features(test.images), test.labels), 0.3)

    def test_bad_sizes_raise_a_user_error(self):
        with self.assertRaisesRegex(digits_data.DigitsDataError, "source_sizes"):
            digits_data.offline_pair(0, (10, 0, 5))
        with self.assertRaisesRegex(digits_data.DigitsDataError, "fractions"):
            digits_data.offline_pair(0, (10, 5, 5), (0.5, 0.5, 0.5))


def _area_downsample(image: np.ndarray, side: int) -> np.ndarray:
    """Means over a side x side grid of equal areas (float64; n x n -> side x side)."""
    big = np.kron(image.astype(np.float64), np.ones((side, side)))
    block = big.shape[0] // side
    return big.reshape(side, block, side, block).mean(axis=(1, 3))


def _write_fake_mnist(folder: pathlib.Path, counts: dict[str, int], rng) -> tuple[dict, dict]:
    """IDX .gz files like MNIST's; returns (paths by tfds key, {split: (images, labels)})."""
    paths, originals = {}, {}
    for split, count in counts.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        paths[f"{split}_data"] = folder / f"{split}-images.gz"
        paths[f"{split}_labels"] = folder / f"{split}-labels.gz"
        with gzip.open(paths[f"{split}_data"], "wb") as f:
            f.write(b"\0" * 16 + images.tobytes())
        with gzip.open(paths[f"{split}_labels"], "wb") as f:
            f.write(b"\0" * 8 + labels.tobytes())
        originals[split] = (images[..., None], labels)
    return paths, originals


def _write_fake_svhn(folder: pathlib.Path, counts: dict[str, int], rng) -> tuple[dict, dict]:
    """.mat files like SVHN's (X (32, 32, 3, n), y (n, 1) with 10 for the digit 0)."""
    paths, originals = {}, {}
    for split, count in counts.items():
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        stored_labels = rng.integers(1, 11, (count, 1)).astype(np.uint8)
        paths[split] = folder / f"{split}_32x32.mat"
        scipy.io.savemat(paths[split], {"X": np.moveaxis(images, 0, -1), "y": stored_labels})
        originals[split] = (images, stored_labels[:, 0] % 10)
    return paths, originals


def _match_by_content(loaded: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Index into reference of each loaded image (tfds shuffles the order); fails if absent."""
    keys = {image.tobytes(): index for index, image in enumerate(reference)}
    return np.array([keys[image.tobytes()] for image in loaded])


class TfdsWithoutTensorflowTest(_TempDirMixin, absltest.TestCase):
    """download_and_prepare + as_data_source of the TF-free builders on fake downloads."""

    def setUp(self):
        super().setUp()
        self.folder = self._temp_dir()
        self.rng = np.random.default_rng(0)

    def _load(self, name, split, files):
        with (
            mock.patch.object(tfds_builders, "_check_reachable"),
            mock.patch.object(tfds.download.DownloadManager, "download", lambda self, urls: files),
            mock.patch.object(mnist, "_TRAIN_EXAMPLES", 30),
            mock.patch.object(mnist, "_TEST_EXAMPLES", 20),
        ):
            return tfds_builders.load_tfds_split(name, split, data_dir=str(self.folder / "tfds"))

    def test_mnist_prepared_and_read_back(self):
        files, originals = _write_fake_mnist(self.folder, {"train": 30, "test": 20}, self.rng)
        for split, count in (("train", 30), ("test", 20)):
            loaded = self._load("mnist", split, files)
            images, labels = originals[split]
            self.assertEqual(loaded.images.shape, (count, 28, 28, 1))
            as_uint8 = np.round(loaded.images * 255).astype(np.uint8)
            order = _match_by_content(as_uint8, images)
            np.testing.assert_array_equal(np.sort(order), np.arange(count))
            np.testing.assert_array_equal(loaded.labels, labels[order])
        self.assertTrue(list((self.folder / "tfds" / "mnist" / "3.0.1").glob("*.array_record*")))

    def test_svhn_prepared_and_read_back_with_0_for_10(self):
        files, originals = _write_fake_svhn(self.folder, {"train": 12, "test": 8}, self.rng)
        loaded = self._load("svhn_cropped", "test", files)
        images, labels = originals["test"]
        expected = digits_data.to_model_images(images)
        order = _match_by_content(loaded.images, expected)
        np.testing.assert_array_equal(np.sort(order), np.arange(8))
        np.testing.assert_array_equal(loaded.labels, labels[order])
        self.assertTrue(np.all(loaded.labels < 10))

    def test_no_internet_is_one_clear_line(self):
        with (
            mock.patch.object(
                tfds_builders.socket, "create_connection", side_effect=OSError("no route to host")
            ),
            self.assertRaises(digits_data.DigitsDataError) as raised,
        ):
            tfds_builders.load_tfds_split("mnist", "train", data_dir=str(self.folder / "tfds"))
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn("internet", message)
        self.assertIn("configs/adda_digits_offline.py", message)


class SvhnMnistConfigDataTest(absltest.TestCase):
    def test_mock_data_through_the_config(self):
        config = adda_svhn_mnist.get_config()
        config.data.val_examples = 7
        with tfds.testing.mock_data(num_examples=25):
            source, target = digits_task.load_pair(config.data)
        for domain in (source, target):
            self.assertEqual(
                {split: len(domain[split].labels) for split in vocabulary.SPLITS},
                {"train": 18, "val": 7, "test": 25},
            )
            for data in domain.values():
                self.assertEqual(data.images.shape[1:], (28, 28, 1))
                self.assertEqual(data.images.dtype, np.float32)
                self.assertTrue(0.0 <= data.images.min() and data.images.max() <= 1.0)
        # Mock SVHN is random RGB (mean ~127/255); the same scaling gives the same mean grey.
        self.assertAlmostEqual(float(source["train"].images.mean()), 0.5, delta=0.05)
        self.assertAlmostEqual(float(target["train"].images.mean()), 0.5, delta=0.05)

    def test_val_examples_too_large(self):
        config = adda_svhn_mnist.get_config()
        config.data.val_examples = 25
        with (
            tfds.testing.mock_data(num_examples=25),
            self.assertRaisesRegex(digits_data.DigitsDataError, "val_examples"),
        ):
            digits_task.load_pair(config.data)


class SourceClassifierTest(absltest.TestCase):
    def test_learns_keeps_the_best_epoch_and_is_deterministic(self):
        source, _ = digits_data.offline_pair(1, (200, 60, 10))
        optimizer = classifier.create_classifier_optimizer()  # one object: one compilation
        params, history = classifier.train_source_classifier(
            source, seed=0, num_epochs=3, optimizer=optimizer
        )
        self.assertLen(history, 3)
        self.assertLess(history[-1]["loss"], history[0]["loss"])
        model = models.LeNetEncoder()
        logits = model.apply({"params": params}, source["val"].images, train=False)
        expected = float(np.mean(np.argmax(np.asarray(logits), -1) == source["val"].labels))
        self.assertAlmostEqual(classifier.accuracy(params, model, source["val"]), expected)
        self.assertEqual(max(h["val_accuracy"] for h in history), expected)
        again, _ = classifier.train_source_classifier(
            source, seed=0, num_epochs=3, optimizer=optimizer
        )
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(a, b)


def _write_results(workdir: pathlib.Path, scheme: str, seed: int, source: float, values: dict):
    """results.json of a digits run that ran the default criteria; `values` those it reached."""
    criteria = {name: {"test": {"accuracy": value}} for name, value in values.items()}
    workdir.mkdir(parents=True)
    (workdir / "results.json").write_text(
        json.dumps(
            {
                "scheme": scheme,
                "seed": seed,
                "source_test": {"accuracy": source},
                "criteria": criteria,
                "criteria_not_reached": [
                    c for c in criteria_lib.THESIS_CRITERIA if c not in values
                ],
            }
        )
    )


class Table103Test(_TempDirMixin, absltest.TestCase):
    def test_cells_by_hand(self):
        root = self._temp_dir()
        full = {
            "initial": 0.6,
            "highest_peak": 0.8,
            "confusion": 0.7,
            "latest": 0.75,
            "best_loss": 0.65,
        }
        _write_results(root / "a0", "adda", 0, 0.9, full)
        _write_results(root / "a1", "adda", 1, 0.94, {**full, "initial": 0.64, "latest": 0.85})
        _write_results(root / "r0", "reset", 0, 0.9, {"initial": 0.6, "latest": 0.7})
        _write_results(root / "r1", "reset", 1, 0.94, {"initial": 0.64, "latest": 0.72})
        table = report_digits.table_10_3(sorted(root.iterdir()), include_thesis=False)
        lines = table.strip().splitlines()
        self.assertLen(lines, 4)
        adda = [cell.strip() for cell in lines[2].strip("|").split("|")]
        reset = [cell.strip() for cell in lines[3].strip("|").split("|")]
        # Source per seed 0.9 and 0.94: mean 0.92, sd sqrt(2 * 0.02**2 / 1) = 0.028284.
        self.assertEqual(adda[0], "0.9200 ± 0.0283 (n=2)")
        self.assertEqual(adda[1], "0.6200 ± 0.0283 (n=2)")
        self.assertEqual(adda[2], "ADDA")
        self.assertEqual(adda[3], "0.8000 ± 0.0000 (n=2)")
        self.assertEqual(adda[5], "0.8000 ± 0.0707 (n=2)")  # latest 0.75, 0.85
        self.assertEqual(reset[2], "RESET")
        self.assertEqual(reset[3], "–")  # never reached
        self.assertEqual(reset[5], "0.7100 ± 0.0141 (n=2)")

    def test_thesis_rows(self):
        root = self._temp_dir()
        _write_results(root / "a", "adda", 0, 0.9, {"initial": 0.5})
        table = report_digits.table_10_3([root / "a"])
        self.assertIn(
            "| 0.9095 | 0.6424 | ADDA (thesis, SVHN→MNIST) | 0.8218 | 0.7994 | 0.8128 | 0.7994 |",
            table,
        )
        self.assertIn("| RESET (thesis, SVHN→MNIST) | 0.8169 | 0.7944 | 0.8114 | 0.7944 |", table)


class OfflineSmokeEndToEndTest(_TempDirMixin, absltest.TestCase):
    def test_main_runs_the_offline_smoke_config(self):
        workdir = self._temp_dir() / "run"
        completed = subprocess.run(
            [
                sys.executable,
                "main.py",
                "--config=configs/adda_digits_offline.py:smoke",
                f"--workdir={workdir}",
                "--config.scheme=reset",
                "--config.target_epochs=0.05",
                "--config.progress_bar=False",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-3000:])
        results = json.loads((workdir / "results.json").read_text())
        self.assertEqual(results["scheme"], "reset")
        self.assertEqual(results["primary_metric"], "accuracy")
        self.assertTrue(0.0 <= results["source_test"]["accuracy"] <= 1.0)
        for name in ("initial", "latest", "highest_peak"):
            self.assertTrue(0.0 <= results["criteria"][name]["test"]["accuracy"] <= 1.0)
        # 'initial' (before DA) is the trained source classifier on the target test split.
        config = adda_digits_offline.get_config("smoke")
        _, target = digits_data.offline_pair(config.data.seed, config.data.source_sizes)
        variables = digits_task.DigitsTask().source_variables(config, workdir, data=None)
        logits = models.LeNetEncoder().apply(variables, target["test"].images, train=False)
        expected = np.mean(np.argmax(np.asarray(logits), -1) == target["test"].labels)
        self.assertAlmostEqual(results["criteria"]["initial"]["test"]["accuracy"], expected)
        self.assertTrue((workdir / "source" / digits_task.SOURCE_RUN_FILE).is_file())
        table = report_digits.table_10_3([workdir], include_thesis=False)
        self.assertIn("| RESET |", table)


if __name__ == "__main__":
    absltest.main()
