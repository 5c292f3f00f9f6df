"""Tests for the soft_tissue_sarcoma TFDS builder: array_record without TensorFlow, data sources."""

import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import skimage.transform
import tensorflow_datasets as tfds
from absl.testing import absltest

import data_pipeline.tfds.soft_tissue_sarcoma as sts
from data_pipeline import datasets, index_writer, loader
from data_pipeline import index as index_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SERIES_SHAPES = {("CT", None): (40, 48), ("MR", "T2"): (32, 32)}
SLICES_PER_SERIES = 5
TUMOUR_SLICES = (1, 2, 3)


def write_tiny_index(out_dir: str) -> index_lib.Index:
    """A hand-written index: 4 patients with a CT and an MR T2 series of 5 slices each."""
    rng = np.random.default_rng(0)
    with index_writer.IndexWriter(out_dir, split_scheme="patient", seed=0) as writer:
        for patient in range(4):
            patient_key = f"P{patient:02d}"
            writer.add_patient(patient_key)
            for (modality, sequence), shape in SERIES_SHAPES.items():
                series_key = f"{patient_key}_{modality}{sequence or ''}"
                writer.add_series(
                    series_key=series_key, patient_key=patient_key, study_uid="1.2",
                    series_uid=f"1.2.{patient}.{len(modality)}", modality=modality,
                    sequence=sequence, description="", frame_of_reference_uid="1.2.3",
                    rows=shape[0], cols=shape[1], pixel_spacing=(1.0, 1.0), slice_spacing=2.0,
                    orientation=(1, 0, 0, 0, 1, 0), n_slices=SLICES_PER_SERIES, units=None,
                )  # fmt: skip
                for slice_index in range(SLICES_PER_SERIES):
                    image = rng.normal(0.0, 200.0, size=shape).astype(np.float32)
                    mask = np.zeros(shape, bool)
                    if slice_index in TUMOUR_SLICES:
                        mask[10 + slice_index : 20, 12 : 22 + patient] = True
                    writer.add_slice(
                        series_key=series_key, slice_index=slice_index,
                        position_mm=2.0 * slice_index - 3.0, sop_instance_uid=None,
                        image=image, mask=mask,
                    )  # fmt: skip
    return index_lib.Index(out_dir)


def reference_preprocess(image: np.ndarray, mask: np.ndarray, size: int):
    """Independent reference: scikit-image order-0 resize and float64 min-max."""
    kwargs = dict(order=0, anti_aliasing=False, preserve_range=True)
    resized = skimage.transform.resize(image.astype(np.float64), (size, size), **kwargs)
    scaled = (resized - resized.min()) / (resized.max() - resized.min())
    return scaled, skimage.transform.resize(mask, (size, size), **kwargs)


def prepare(config, data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
    builder = tfds.builder(f"soft_tissue_sarcoma/{config}", data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return builder


class BuilderOnIndexTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.index_dir = os.path.join(cls.tmp.name, "index")
        cls.data_dir = os.path.join(cls.tmp.name, "tfds")
        cls.index = write_tiny_index(cls.index_dir)
        cls.builder = prepare("mr_t2_64", cls.data_dir, cls.index_dir)
        cls.sources = cls.builder.as_data_source()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_splits_hold_the_index_tumour_slices_in_order(self):
        self.assertEqual(set(self.sources), {"train", "val", "test"})
        for split, source in self.sources.items():
            records = self.index.query(modality="T2", split=split, has_tumor=True)
            self.assertLen(source, len(records))
            stored = [(ex["series_key"].decode(), int(ex["slice_index"])) for ex in source]
            self.assertEqual(stored, [(r.series_key, r.slice_index) for r in records])
        patients = {
            split: {ex["patient_key"].decode() for ex in source}
            for split, source in self.sources.items()
        }
        self.assertEqual(len(set.union(*patients.values())), 4)
        self.assertEmpty(patients["train"] & (patients["val"] | patients["test"]))

    def test_features(self):
        records = self.index.query(modality="T2", split="train", has_tumor=True)
        for record, example in zip(records, self.sources["train"], strict=True):
            self.assertEqual(example["image"].shape, (64, 64, 1))
            self.assertEqual(example["image"].dtype, np.float32)
            self.assertEqual(example["mask"].shape, (64, 64, 1))
            self.assertEqual(example["mask"].dtype, np.uint8)
            expected_image, expected_mask = reference_preprocess(*record.load(), 64)
            np.testing.assert_allclose(example["image"][..., 0], expected_image, atol=1e-6)
            np.testing.assert_array_equal(example["mask"][..., 0], expected_mask)
            self.assertGreater(example["mask"].sum(), 0)
            self.assertEqual(example["patient_key"].decode(), record.patient_key)
            self.assertEqual(example["modality"].decode(), "MR")
            self.assertEqual(example["sequence"].decode(), "T2")
            self.assertAlmostEqual(float(example["slice_position_mm"]), record.position_mm)
            self.assertTrue(example["has_tumor"])

    def test_loader_batches_from_data_source(self):
        train = self.sources["train"]
        batch = next(loader.train_batches(train, batch_size=4, seed=0))
        self.assertEqual(batch["image"].shape, (4, 64, 64, 1))
        self.assertEqual(batch["image"].dtype, np.float32)
        self.assertEqual(batch["mask"].dtype, np.uint8)
        self.assertTrue(np.all(batch["mask"].sum(axis=(1, 2, 3)) > 0))
        eval_images = np.concatenate([b["image"] for b in loader.eval_batches(train, 4)])
        np.testing.assert_array_equal(eval_images, np.stack([ex["image"] for ex in train]))

    def test_tfds_data_source_by_name_reuses_the_build(self):
        source = tfds.data_source(
            "soft_tissue_sarcoma/mr_t2_64", split="val", data_dir=self.data_dir
        )
        self.assertLen(source, len(self.sources["val"]))

    def test_custom_config_with_all_slices(self):
        config = sts.SoftTissueSarcomaConfig(
            name="ct_32_all", domain="CT", image_size=32, tumour_only=False
        )
        builder = sts.Builder(config=config, data_dir=self.data_dir)
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=self.index_dir),
        )
        sources = builder.as_data_source()
        self.assertEqual(sum(len(s) for s in sources.values()), 4 * SLICES_PER_SERIES)
        masks = np.stack([ex["mask"] for s in sources.values() for ex in s])
        self.assertEqual(masks.shape[1:], (32, 32, 1))
        self.assertEqual(int((masks.sum(axis=(1, 2, 3)) > 0).sum()), 4 * len(TUMOUR_SLICES))

    def test_index_with_other_splits_is_refused(self):
        with self.assertRaisesRegex(datasets.DatasetError, "thesis"):
            prepare("mr_t2_64_thesis", self.data_dir, self.index_dir)

    def test_domain_without_slices_is_refused(self):
        with self.assertRaisesRegex(datasets.DatasetError, "no PT slices"):
            prepare("pt_64", self.data_dir, self.index_dir)


class BuilderDefinitionTest(absltest.TestCase):
    def test_configs(self):
        names = {config.name for config in sts.Builder.BUILDER_CONFIGS}
        for prefix in ("ct", "pt", "mr_t1", "mr_t2", "mr_stir"):
            for size in (64, 128):
                self.assertIn(f"{prefix}_{size}", names)
                self.assertIn(f"{prefix}_{size}_thesis", names)
        config = tfds.builder("soft_tissue_sarcoma/mr_stir_128").builder_config
        self.assertEqual(
            (config.domain, config.image_size, config.tumour_only), ("STIR", 128, True)
        )

    def test_missing_manual_dir_shows_the_instructions(self):
        with tempfile.TemporaryDirectory() as data_dir:
            builder = tfds.builder("soft_tissue_sarcoma/ct_64", data_dir=data_dir)
            with self.assertRaisesRegex(AssertionError, "cancerimagingarchive.net/collection"):
                builder.download_and_prepare(file_format="array_record")

    def test_mock_data(self):
        with tfds.testing.mock_data(num_examples=6):
            source = tfds.data_source("soft_tissue_sarcoma/ct_128", split="train")
            self.assertLen(source, 6)
            batch = next(loader.train_batches(source, batch_size=4, seed=0))
        self.assertEqual(batch["image"].shape, (4, 128, 128, 1))
        self.assertEqual(batch["image"].dtype, np.float32)
        self.assertEqual(batch["mask"].shape, (4, 128, 128, 1))
        self.assertEqual(batch["mask"].dtype, np.uint8)


class WithoutTensorFlowTest(absltest.TestCase):
    def test_build_and_read_with_tensorflow_blocked(self):
        # Run in a fresh interpreter where `import tensorflow` fails even if it is installed.
        script = textwrap.dedent(
            """
            import importlib.machinery, sys

            class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
                @classmethod
                def find_spec(cls, name, path=None, target=None):
                    if name.partition(".")[0] == "tensorflow":
                        return None  # Not found, exactly as when it is not installed.
                    return super().find_spec(name, path, target)

            sys.meta_path[:] = [
                PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
                for finder in sys.meta_path]
            import tensorflow_datasets as tfds
            import data_pipeline.tfds.soft_tissue_sarcoma  # noqa: F401
            from tests.tfds_test import write_tiny_index

            tmp = sys.argv[1]
            write_tiny_index(tmp + "/index")
            builder = tfds.builder("soft_tissue_sarcoma/ct_64", data_dir=tmp + "/tfds")
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(manual_dir=tmp + "/index"))
            source = tfds.data_source("soft_tissue_sarcoma/ct_64", data_dir=tmp + "/tfds")
            assert "tensorflow" not in sys.modules
            try:
                import tensorflow  # noqa: F401
            except ModuleNotFoundError:
                print("tensorflow hidden")
            print("examples", sum(len(split) for split in source.values()))
            """
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(
                [sys.executable, "-c", script, tmp],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn(f"examples {4 * len(TUMOUR_SLICES)}", result.stdout)
        self.assertIn("tensorflow hidden", result.stdout)


if __name__ == "__main__":
    absltest.main()
