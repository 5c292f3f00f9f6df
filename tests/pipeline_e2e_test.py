"""End to end: phantom DICOM -> ingest -> Index.query -> TFDS (array_record) -> loader batches."""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest

import data_pipeline.tfds.soft_tissue_sarcoma as sts
from data_pipeline import datasets, loader, vocabulary

PHANTOM = dict(phantom_patients=4, phantom_image_size=32, phantom_slices=8)
SPLITS = ("train", "val", "test")


def assert_valid_batch(test, batch, batch_size, image_size):
    test.assertEqual(batch["image"].shape, (batch_size, image_size, image_size, 1))
    test.assertEqual(batch["image"].dtype, np.float32)
    test.assertEqual(batch["mask"].shape, (batch_size, image_size, image_size, 1))
    test.assertEqual(batch["mask"].dtype, np.uint8)
    # Every image is min-max scaled on its own: it spans exactly [0, 1].
    np.testing.assert_array_equal(batch["image"].min(axis=(1, 2, 3)), 0.0)
    np.testing.assert_array_equal(batch["image"].max(axis=(1, 2, 3)), 1.0)
    test.assertLessEqual(set(np.unique(batch["mask"])), {0, 1})
    # Only tumour slices are selected by default, so every mask survived preprocessing.
    test.assertTrue(np.all(batch["mask"].sum(axis=(1, 2, 3)) > 0))


class PipelineEndToEndTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.cache_dir = pathlib.Path(cls.tmp.name) / "cache"
        cls.index = datasets.get_index(
            "phantom", cache_dir=cls.cache_dir, seed=0, progress=False, **PHANTOM
        )
        (cls.phantom_entry,) = cls.cache_dir.iterdir()
        cls.dicom_dir = cls.phantom_entry / "dicom"

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_phantom_index(self):
        summary = self.index.summary()
        self.assertEqual(summary["patients"], 4)
        self.assertEqual(summary["split_scheme"], "patient")
        self.assertGreater(summary["slices_with_tumor"], 0)
        self.assertEqual({p["patient_key"] for p in self.index.patients()}.__len__(), 4)

    def test_phantom_cache_is_reused(self):
        sqlite_path = self.index.out_dir / "index.sqlite"
        before = sqlite_path.stat().st_mtime_ns
        again = datasets.get_index(
            "phantom", cache_dir=self.cache_dir, seed=0, progress=False, **PHANTOM
        )
        self.assertEqual(again.out_dir, self.index.out_dir)
        self.assertEqual(sqlite_path.stat().st_mtime_ns, before)
        self.assertEqual([p.name for p in self.cache_dir.iterdir()], [self.phantom_entry.name])
        self.assertEmpty([p for p in self.phantom_entry.iterdir() if ".tmp-" in p.name])

    def test_thesis_scheme_reuses_the_phantom_dicom(self):
        dicom_mtime = self.dicom_dir.stat().st_mtime_ns
        thesis = datasets.get_index(
            "phantom",
            cache_dir=self.cache_dir,
            seed=0,
            split_scheme="thesis",
            progress=False,
            **PHANTOM,
        )
        self.assertEqual(thesis.meta()["split_scheme"], "thesis")
        self.assertNotEqual(thesis.out_dir, self.index.out_dir)
        self.assertEqual(self.dicom_dir.stat().st_mtime_ns, dicom_mtime)
        self.assertEqual(thesis.summary()["slices"], self.index.summary()["slices"])

    def test_query_to_in_memory_batches(self):
        for domain in ("CT", "PT", "T1"):
            records = self.index.query(**datasets.domain_query(domain, "train"))
            self.assertNotEmpty(records, domain)
            self.assertTrue(all(r.has_tumor for r in records))
            arrays = datasets.load_domain(self.index, domain, "train", image_size=32)
            self.assertEqual(arrays["image"].shape, (len(records), 32, 32, 1))
            self.assertEqual(list(arrays["patient_key"]), [r.patient_key for r in records])
            batch = next(loader.train_batches(arrays, batch_size=2, seed=0))
            assert_valid_batch(self, batch, 2, 32)
            evaluated = sum(len(b["image"]) for b in loader.eval_batches(arrays, 2))
            self.assertEqual(evaluated, len(records))

    def test_all_slices_option(self):
        tumour = self.index.query(**datasets.domain_query("CT", None))
        every = self.index.query(**datasets.domain_query("CT", None, tumour_only=False))
        self.assertGreater(len(every), len(tumour))

    def test_tfds_build_from_the_dicom_root(self):
        data_dir = pathlib.Path(self.tmp.name) / "tfds"
        builder = tfds.builder("soft_tissue_sarcoma/ct_64", data_dir=str(data_dir))
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(self.dicom_dir)),
        )
        sources = builder.as_data_source()
        for split in SPLITS:
            records = self.index.query(**datasets.domain_query("CT", split))
            if not records:
                self.assertNotIn(split, sources)
                continue
            source = sources[split]
            self.assertLen(source, len(records))
            self.assertEqual(
                [ex["patient_key"].decode() for ex in source], [r.patient_key for r in records]
            )
            # The TFDS examples equal the in-memory preprocessing of the same query.
            arrays = loader.load_arrays(records, image_size=64)
            np.testing.assert_array_equal(np.stack([ex["image"] for ex in source]), arrays["image"])
            np.testing.assert_array_equal(np.stack([ex["mask"] for ex in source]), arrays["mask"])
        train = sources["train"]
        batches = loader.train_batches(train, batch_size=3, seed=1)
        for _ in range(3):
            assert_valid_batch(self, next(batches), 3, 64)
        again = next(loader.train_batches(train, batch_size=3, seed=1))
        first = next(loader.train_batches(train, batch_size=3, seed=1))
        np.testing.assert_array_equal(again["image"], first["image"])

    def test_dicom_source_is_cached_by_content(self):
        dicom_copy = pathlib.Path(self.tmp.name) / "dicom_copy"
        shutil.copytree(self.dicom_dir, dicom_copy)
        cache_dir = pathlib.Path(self.tmp.name) / "dicom_cache"
        first = datasets.get_index("dicom", dicom_copy, cache_dir=cache_dir, progress=False)
        self.assertEqual(first.summary()["slices"], self.index.summary()["slices"])
        self.assertEqual(
            datasets.get_index("dicom", dicom_copy, cache_dir=cache_dir, progress=False).out_dir,
            first.out_dir,
        )
        (dicom_copy / "notes.txt").write_text("a file added after the first ingest\n")
        changed = datasets.get_index("dicom", dicom_copy, cache_dir=cache_dir, progress=False)
        self.assertNotEqual(changed.out_dir, first.out_dir)

    def test_index_source(self):
        opened = datasets.get_index("index", self.index.out_dir)
        self.assertEqual(opened.summary(), self.index.summary())

    def test_interrupted_build_leaves_no_entry(self):
        cache_dir = pathlib.Path(self.tmp.name) / "interrupted"
        with mock.patch.object(datasets.ingest_lib, "ingest", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                datasets.get_index("dicom", self.dicom_dir, cache_dir=cache_dir, progress=False)
        leftovers = [p for p in cache_dir.rglob("*") if p.is_file() or "index" in p.name]
        self.assertEmpty(leftovers)
        # A run killed outright (no cleanup) leaves its staging folder; the next build removes it.
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
        (entry,) = cache_dir.iterdir()
        killed_staging = entry / f".index.tmp-{int(dead.stdout)}-abc123"
        (killed_staging / "index").mkdir(parents=True)
        (killed_staging / "index" / "half_written.npz").write_bytes(b"")
        index = datasets.get_index("dicom", self.dicom_dir, cache_dir=cache_dir, progress=False)
        self.assertEqual(index.out_dir, entry / "index")
        self.assertEqual([p.name for p in entry.iterdir()], ["index"])


class DatasetsErrorsTest(absltest.TestCase):
    def test_unknown_source(self):
        with self.assertRaisesRegex(datasets.DatasetError, "unknown data source 'mnist'"):
            datasets.get_index("mnist")

    def test_missing_dicom_folder(self):
        with self.assertRaisesRegex(datasets.DatasetError, "DICOM folder not found: /no/such"):
            datasets.get_index("dicom", "/no/such/folder")
        with self.assertRaisesRegex(datasets.DatasetError, "DICOM folder not found"):
            datasets.get_index("dicom")

    def test_missing_index(self):
        with tempfile.TemporaryDirectory() as empty:
            with self.assertRaises(datasets.DatasetError) as raised:
                datasets.get_index("index", empty)
        self.assertNotIn("\n", str(raised.exception))
        self.assertIsInstance(raised.exception, ValueError)

    def test_bad_split_scheme(self):
        with self.assertRaisesRegex(datasets.DatasetError, "split scheme"):
            datasets.get_index("phantom", split_scheme="random")

    def test_cache_dir_from_environment(self):
        with mock.patch.dict(os.environ, {datasets.CACHE_ENV_VAR: "/tmp/somewhere"}):
            self.assertEqual(datasets.default_cache_dir(), pathlib.Path("/tmp/somewhere"))
        with mock.patch.dict(os.environ, {datasets.CACHE_ENV_VAR: ""}):
            self.assertEqual(
                datasets.default_cache_dir(), pathlib.Path.home() / ".cache" / "sarcoma_jax"
            )

    def test_domain_query(self):
        self.assertEqual(
            datasets.domain_query("pet", "val"),
            {"modality": "PT", "split": "val", "has_tumor": True},
        )
        self.assertEqual(
            datasets.domain_query("t2", tumour_only=False),
            {"modality": "T2", "split": None, "has_tumor": None},
        )
        self.assertEqual(datasets.domain_query("MR_STIR")["modality"], "STIR")
        with self.assertRaisesRegex(datasets.DatasetError, "unknown domain 'US'"):
            datasets.domain_query("US")

    def test_builder_configs_cover_every_domain(self):
        domains = {config.domain for config in sts.BUILDER_CONFIGS}
        self.assertEqual(domains, set(vocabulary.DOMAINS))


if __name__ == "__main__":
    absltest.main()
