"""Tests of patient-level k-fold cross-validation: the assignment (data_pipeline.splits), the folds
stored by the ingest, config checks, and runs of every fold (sarcoma_jax.folds) on real data."""

import collections
import copy
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from configs import adda_ct_pt, segment_ct
from data_pipeline import index as index_lib
from data_pipeline import ingest as ingest_lib
from data_pipeline import phantom, splits
from sarcoma_jax import folds, input_pipeline
from sarcoma_jax.adda import segmentation
from sarcoma_jax.adda import train as adda_train
from sarcoma_jax.input_pipeline import ConfigError
from sarcoma_jax.segment import train as segment_train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SARCOMA_JAX_SHARED", REPO_ROOT / ".." / "shared"))
STS_IBSI_DICOM = SHARED / "data" / "sts_ibsi" / "dicom"
_COMPILATION_CACHE = tempfile.TemporaryDirectory()


def setUpModule():
    # Every fold builds its own jitted functions; JAX's persistent cache turns the compiles of
    # the folds after the first into lookups.
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _partition(folds_of: dict[str, int]) -> frozenset:
    """The folds as a set of patient sets (fold numbers ignored)."""
    groups = collections.defaultdict(set)
    for key, fold in folds_of.items():
        groups[fold].add(key)
    return frozenset(frozenset(group) for group in groups.values())


class FoldAssignmentTest(parameterized.TestCase):
    def test_hand_worked_example(self):
        # By tumour slices: A 10, B 9 | C 8, D 7 | E 1. Rounds of 2, each in draw order to folds
        # 0, 1: B ('1') -> 0, A ('3') -> 1; C ('0') -> 0, D ('2') -> 1; folds hold 17 and 17
        # slices, so the partial round's E goes to the lighter-or-lower fold 0.
        tumour_slices = {"A": 10, "B": 9, "C": 8, "D": 7, "E": 1}
        draws = {"A": "3", "B": "1", "C": "0", "D": "2", "E": "5"}
        self.assertEqual(
            splits.assign_folds(tumour_slices, draws, 2),
            {"A": 1, "B": 0, "C": 0, "D": 1, "E": 0},
        )
        # Three folds: A, B, C by draw (C '0', B '1', A '3') to folds 0, 1, 2 (8, 9, 10 slices);
        # the partial round D, E: D (7) to the lightest fold 0, E (1) to the next, fold 1.
        self.assertEqual(
            splits.assign_folds(tumour_slices, draws, 3),
            {"A": 2, "B": 1, "C": 0, "D": 0, "E": 1},
        )

    @parameterized.parameters((13, 2), (13, 3), (13, 5), (13, 10), (51, 5), (7, 7))
    def test_disjoint_covering_and_balanced(self, num_patients, num_folds):
        rng = np.random.default_rng(num_patients * 100 + num_folds)
        keys = [f"STS_{i:03d}" for i in range(num_patients)]
        tumour_slices = {key: int(rng.integers(5, 60)) for key in keys}
        for seed in range(5):
            draws = {key: splits.fold_draw(seed, key) for key in keys}
            assigned = splits.assign_folds(tumour_slices, draws, num_folds)
            self.assertEqual(sorted(assigned), sorted(keys))  # every patient, in one fold
            sizes = collections.Counter(assigned.values())
            self.assertEqual(sorted(sizes), list(range(num_folds)))
            self.assertLessEqual(max(sizes.values()) - min(sizes.values()), 1)
            # Each full round adds one patient per fold; the rounds' ranges telescope to at most
            # max - min, and the partial round adds one patient at most.
            ordered = sorted(tumour_slices.values(), reverse=True)
            partial = ordered[len(ordered) // num_folds * num_folds :]
            slices = [
                sum(tumour_slices[key] for key in keys if assigned[key] == fold)
                for fold in range(num_folds)
            ]
            bound = ordered[0] - ordered[-1] + (partial[0] if partial else 0)
            self.assertLessEqual(max(slices) - min(slices), bound)

    def test_the_seed_changes_the_partition(self):
        keys = [f"STS_{i:03d}" for i in range(13)]
        tumour_slices = {key: 20 + 3 * i for i, key in enumerate(keys)}
        partitions = {
            _partition(
                splits.assign_folds(
                    tumour_slices, {key: splits.fold_draw(seed, key) for key in keys}, 3
                )
            )
            for seed in range(10)
        }
        self.assertGreater(len(partitions), 5)

    def test_fold_patient_splits(self):
        keys = [f"STS_{i:03d}" for i in range(13)]
        draws = {key: splits.fold_draw(0, key) for key in keys}
        assigned = splits.assign_folds(dict.fromkeys(keys, 10), draws, 3)
        tested = []
        for fold in range(3):
            fold_splits = splits.fold_patient_splits(assigned, draws, fold)
            self.assertEqual(sorted(fold_splits), keys)
            by_split = collections.defaultdict(set)
            for key, split in fold_splits.items():
                by_split[split].add(key)
            self.assertEqual(by_split["test"], {k for k in keys if assigned[k] == fold})
            self.assertLen(by_split["val"], splits.num_holdout_patients(13))  # 2
            self.assertLen(by_split["train"], 13 - len(by_split["test"]) - 2)
            tested += sorted(by_split["test"])
        self.assertEqual(sorted(tested), keys)  # each patient tested exactly once

    @parameterized.parameters(
        # n - ceil(n / K) >= 2 leaves a val and a train patient; K <= min(10, n).
        (2, []),
        (3, [3]),
        (4, [2, 3, 4]),
        (13, list(range(2, 11))),
    )
    def test_fold_counts(self, num_patients, expected):
        self.assertEqual(splits.fold_counts(num_patients), expected)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "folds need"):
            splits.assign_folds({"A": 1, "B": 2}, {"A": "0", "B": "1"}, 3)
        with self.assertRaisesRegex(ValueError, "same patient keys"):
            splits.assign_folds({"A": 1}, {"B": "0"}, 2)


class StoredFoldsTest(absltest.TestCase):
    """Folds written by the ingest: complete, and the same after re-ingest and with a salt."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="folds_test_"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.dicom = cls.tmp / "dicom"
        phantom.write_phantom(cls.dicom, 6, seed=2, image_size=16, num_slices=6, progress=False)

        def ingest(name, **kwargs):
            ingest_lib.ingest(
                str(cls.dicom), str(cls.tmp / name), progress=False, log=lambda _: None, **kwargs
            )
            return index_lib.Index(cls.tmp / name)

        cls.index = ingest("plain")
        cls.again = ingest("again")
        cls.salted = ingest("salted", patient_salt="pepper")
        cls.other_seed = ingest("seed_1", seed=1)

    def _table(self, index, rename=lambda key: key):
        return {
            (num_folds, fold): {rename(key): split for key, split in fold_splits.items()}
            for num_folds in splits.fold_counts(6)
            for fold in range(num_folds)
            for fold_splits in [index.fold_splits(num_folds, fold)]
        }

    def test_every_fold_count_covers_every_patient_once(self):
        patients = {row["patient_key"] for row in self.index.patients()}
        self.assertEqual(splits.fold_counts(6), [2, 3, 4, 5, 6])
        for num_folds in splits.fold_counts(6):
            tested = []
            for fold in range(num_folds):
                fold_splits = self.index.fold_splits(num_folds, fold)
                self.assertEqual(set(fold_splits), patients)
                self.assertEqual(set(fold_splits.values()), {"train", "val", "test"})
                tested += [key for key, split in fold_splits.items() if split == "test"]
            self.assertCountEqual(tested, patients)

    def test_stable_under_reingest_and_across_the_patient_salt(self):
        table = self._table(self.index)
        self.assertEqual(self._table(self.again), table)
        keys = {row["patient_key"] for row in self.index.patients()}
        salted_keys = {row["patient_key"] for row in self.salted.patients()}
        self.assertEqual(salted_keys, {ingest_lib.patient_key(key, "pepper") for key in keys})
        self.assertTrue(keys.isdisjoint(salted_keys))
        # The salted index, its keys mapped back, holds the same folds with the same numbers.
        unsalt = {ingest_lib.patient_key(key, "pepper"): key for key in keys}
        self.assertEqual(self._table(self.salted, unsalt.get), table)

    def test_the_data_seed_changes_the_folds(self):
        self.assertNotEqual(self._table(self.other_seed), self._table(self.index))

    def test_fold_records_take_the_folds_splits(self):
        for fold in range(3):
            fold_splits = self.index.fold_splits(3, fold)
            records = input_pipeline.query_splits(self.index, "CT", fold_splits=fold_splits)
            for split, split_records in records.items():
                self.assertNotEmpty(split_records)
                self.assertEqual(
                    {record.patient_key for record in split_records},
                    {key for key, s in fold_splits.items() if s == split}
                    & {r.patient_key for r in self.index.query(modality="CT", has_tumor=True)},
                )
                self.assertEqual({record.split for record in split_records}, {split})

    def test_fold_counts_the_index_does_not_store(self):
        with self.assertRaisesRegex(ValueError, "more folds than patients"):
            self.index.fold_splits(7, 0)
        config = segment_ct.get_config("smoke")
        config.data.num_folds, config.data.fold = 7, 0
        with self.assertRaisesRegex(ConfigError, "more folds than patients") as raised:
            input_pipeline.patient_splits(self.index, config.data)
        self.assertLen(str(raised.exception).splitlines(), 1)

    def test_index_without_folds_says_ingest_again(self):
        old = self.tmp / "old"
        shutil.copytree(self.tmp / "plain", old)
        connection = sqlite3.connect(old / "index.sqlite")
        with connection:
            connection.execute("DROP TABLE fold_splits")
        connection.close()
        config = segment_ct.get_config("smoke")
        config.data.num_folds, config.data.fold = 2, 0
        with self.assertRaisesRegex(ConfigError, "ingest it again") as raised:
            input_pipeline.patient_splits(index_lib.Index(old), config.data)
        self.assertLen(str(raised.exception).splitlines(), 1)

    def test_main_reports_more_folds_than_patients_in_one_line(self):
        result = subprocess.run(
            [
                sys.executable,
                "main.py",
                "--config=configs/segment_ct.py:smoke",
                f"--workdir={self.tmp / 'main_run'}",
                "--config.data.source=index",
                f"--config.data.path={self.tmp / 'plain'}",
                "--config.data.num_folds=7",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("more folds than patients", result.stderr)
        self.assertLen(result.stderr.strip().splitlines(), 1)
        self.assertFalse((self.tmp / "main_run").exists())  # nothing written, nothing run


class FoldConfigTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("fold_past_the_last", {"num_folds": 3, "fold": 3}, "one of 0..2"),
        ("negative_fold", {"num_folds": 3, "fold": -1}, "one of 0..2"),
        ("one_fold", {"num_folds": 1}, "0 .no folds. or >= 2"),
        ("too_many_folds", {"num_folds": 11, "fold": 0}, "over 10"),
        ("thesis_scheme", {"num_folds": 3, "fold": 0, "split_scheme": "thesis"}, "'patient'"),
        ("fold_without_num_folds", {"fold": 1}, "needs config.data.num_folds"),
        ("num_folds_without_fold", {"num_folds": 3}, "config.data.fold is unset"),
    )
    def test_bad_folds_are_one_line_errors(self, overrides, message):
        config = segment_ct.get_config("smoke")
        config.data.update(overrides)
        with self.assertRaisesRegex(ConfigError, message) as raised:
            segment_train.validate_config(config)
        self.assertLen(str(raised.exception).splitlines(), 1)

    def test_all_folds_needs_no_fold(self):
        config = segment_ct.get_config("smoke")
        config.data.num_folds = 3
        self.assertTrue(folds.runs_all_folds(config))
        input_pipeline.validate_folds(config.data, all_folds=True)
        config.data.fold = 1
        self.assertFalse(folds.runs_all_folds(config))

    def test_an_adda_fold_reaches_the_source_run(self):
        config = adda_ct_pt.get_config("smoke")
        config.data.num_folds = 2
        single = folds.fold_config(config, 1)
        self.assertEqual((single.data.fold, single.source.data.fold), (1, 1))
        self.assertIsNone(config.data.fold)  # the folds run's config is left alone

    def test_a_shared_source_checkpoint_is_refused(self):
        config = adda_ct_pt.get_config("smoke")
        config.data.num_folds = 2
        config.source_checkpoint = "/some/run"
        with self.assertRaisesRegex(ConfigError, "source_checkpoint"):
            folds.run_all_folds(config, "/nonexistent", None, adda_train.validate_config)

    def test_main_reports_a_bad_fold_in_one_line(self):
        with tempfile.TemporaryDirectory() as tmp:
            result = subprocess.run(
                [
                    sys.executable,
                    "main.py",
                    "--config=configs/segment_ct.py:smoke",
                    f"--workdir={tmp}/run",
                    "--config.data.num_folds=3",
                    "--config.data.fold=3",
                ],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertEqual(result.returncode, 1, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            self.assertIn("config.data.fold must be one of 0..2, got 3", result.stderr)
            self.assertLen(result.stderr.strip().splitlines(), 1)
            self.assertFalse(pathlib.Path(tmp, "run").exists())


def _section(keys, f1, **test):
    return {"test": test, "test_per_image": {"patient_key": keys, "f1": f1}}


class PoolFoldsTest(absltest.TestCase):
    def _results(self, seed, shift):
        """Segmentation results of folds 0 and 1 (model F1 shifted by `shift` per seed)."""

        def run(keys, f1, accuracy, auc):
            model = _section(keys, [value + shift for value in f1], accuracy=accuracy, auc=auc)
            return {
                "seed": seed,
                **model,
                "baseline_threshold": _section(keys, [0.5] * len(keys), accuracy=0.5, auc=0.5),
            }

        return {
            0: run(["a", "a", "b"], [1.0, 0.5, 0.0], accuracy=0.9, auc=0.8),
            1: run(["c"], [0.25], accuracy=0.5, auc=0.6),
        }

    def test_pooled_by_hand(self):
        by_seed = {0: self._results(0, 0.0), 1: self._results(1, 0.1)}
        summary = folds.pool_folds(
            {fold: {s: by_seed[s][fold] for s in by_seed} for fold in (0, 1)}
        )
        self.assertEqual(
            summary["patients"],
            {
                "a": {"fold": 0, "test_images": 2},
                "b": {"fold": 0, "test_images": 1},
                "c": {"fold": 1, "test_images": 1},
            },
        )
        model = summary["pooled"][folds.MODEL]
        seed_0 = model["seeds"]["0"]
        self.assertAlmostEqual(seed_0["f1"], (1.0 + 0.5 + 0.0 + 0.25) / 4)
        self.assertEqual(seed_0["patient_f1"], {"a": 0.75, "b": 0.0, "c": 0.25})
        self.assertAlmostEqual(seed_0["patient_f1_mean"], 1.0 / 3)
        self.assertAlmostEqual(seed_0["patient_f1_sd"], np.std([0.75, 0.0, 0.25], ddof=1))
        self.assertAlmostEqual(seed_0["accuracy"], (0.9 * 3 + 0.5 * 1) / 4)  # over all pixels
        self.assertAlmostEqual(seed_0["auc_fold_mean"], 0.7)
        self.assertAlmostEqual(model["seeds"]["1"]["f1"], 0.4375 + 0.1)
        self.assertAlmostEqual(model["over_seeds"]["f1"]["mean"], 0.4375 + 0.05)
        self.assertAlmostEqual(model["over_seeds"]["f1"]["sd"], np.std([0.4375, 0.5375], ddof=1))
        self.assertAlmostEqual(model["per_patient"]["a"]["mean"], 0.8)
        self.assertAlmostEqual(summary["pooled"][folds.BASELINE]["seeds"]["1"]["f1"], 0.5)

    def test_a_patient_in_two_folds_is_an_error(self):
        results = self._results(0, 0.0)
        results[1] = {**results[1], **_section(["a"], [0.3], accuracy=0.5, auc=0.5)}
        with self.assertRaisesRegex(ValueError, "patient a is tested in folds 0 and 1"):
            folds.pool_folds({fold: {0: results[fold]} for fold in (0, 1)})

    def test_a_criterion_missing_from_a_fold(self):
        fold_0 = {
            "seed": 0,
            "criteria": {
                "initial": _section(["a"], [0.2], auc=0.5),
                "confusion": _section(["a"], [0.4], auc=0.5),
            },
        }
        fold_1 = {"seed": 0, "criteria": {"initial": _section(["b"], [0.6], auc=0.5)}}
        pooled = folds.pool_folds({0: {0: fold_0}, 1: {0: fold_1}})["pooled"]
        self.assertAlmostEqual(pooled["initial"]["seeds"]["0"]["f1"], 0.4)
        self.assertEqual(pooled["confusion"]["seeds"]["0"], {"missing_folds": [1]})

    def test_adda_per_image_scores_carry_patient_keys(self):
        logits = np.array([1.0, -1.0, 1.0, -1.0]).reshape(4, 1, 1, 1)
        arrays = {
            "mask": np.array([1, 1, 0, 0], np.uint8).reshape(4, 1, 1, 1),
            "patient_key": np.array(["a", "a", "b", "b"]),
        }
        per_image = segmentation.SegmentationTask().per_image(logits, arrays)
        self.assertEqual(
            per_image, {"patient_key": ["a", "a", "b", "b"], "f1": [1.0, 0.0, 0.0, 1.0]}
        )


def _tiny_segmentation(config):
    config.data.image_size = 16
    config.model.depth = 2
    config.model.base_filters = 2
    config.num_epochs = 1
    config.progress_bar = False
    config.eval_batch_size = 25
    config.bn_recalibration_batches = 2
    config.num_example_slices = 1
    return config


@absltest.skipUnless(STS_IBSI_DICOM.is_dir(), "shared IBSI data not found")
class AllFoldsRealDataTest(absltest.TestCase):
    """Three folds of the 13 real patients, one command: every patient tested once, resumable."""

    def test_three_folds_pool_thirteen_patients_and_resume_fold_by_fold(self):
        with tempfile.TemporaryDirectory() as tmp:
            config = _tiny_segmentation(segment_ct.get_config("smoke"))
            config.data.source = "dicom"
            config.data.path = str(STS_IBSI_DICOM)
            config.data.cache_dir = str(pathlib.Path(tmp) / "cache")
            config.data.num_folds = 3
            workdir = pathlib.Path(tmp) / "folds"
            calls = []

            def train(single, run_dir):
                calls.append(single.data.fold)
                return segment_train.train_and_evaluate(single, run_dir)

            results = folds.run_all_folds(
                config,
                workdir,
                train,
                segment_train.validate_config,
                segment_train.RESUMABLE_CONFIG_CHANGES,
            )
            self.assertEqual(calls, [0, 1, 2])
            self.assertLen(results["patients"], 13)
            self.assertEqual(results["untested_patients"], [])
            index = input_pipeline.open_index(config.data, progress=False)
            per_image_keys, per_image_f1 = [], []
            for fold in range(3):
                fold_results = json.loads((workdir / f"fold_{fold}" / "results.json").read_text())
                fold_config = json.loads((workdir / f"fold_{fold}" / "config.json").read_text())
                self.assertEqual(fold_config["data"]["fold"], fold)
                tested = set(fold_results["test_per_image"]["patient_key"])
                stored = index.fold_splits(3, fold)
                self.assertEqual(tested, {k for k, s in stored.items() if s == "test"})
                self.assertEqual(
                    tested, {k for k, p in results["patients"].items() if p["fold"] == fold}
                )
                per_image_keys += fold_results["test_per_image"]["patient_key"]
                per_image_f1 += fold_results["test_per_image"]["f1"]
            pooled = results["pooled"][folds.MODEL]["seeds"]["0"]
            self.assertAlmostEqual(pooled["f1"], float(np.mean(per_image_f1)))
            self.assertEqual(pooled["images"], len(per_image_f1))
            self.assertEqual(
                sum(p["test_images"] for p in results["patients"].values()), len(per_image_f1)
            )
            on_disk = json.loads((workdir / "results.json").read_text())
            self.assertEqual(on_disk["patients"], results["patients"])

            # Started again: finished folds are skipped; a fold without results runs again.
            calls.clear()
            again = folds.run_all_folds(
                config,
                workdir,
                train,
                segment_train.validate_config,
                segment_train.RESUMABLE_CONFIG_CHANGES,
            )
            self.assertEqual(calls, [])
            self.assertEqual(again["pooled"], results["pooled"])
            (workdir / "fold_1" / "results.json").unlink()
            calls.clear()
            again = folds.run_all_folds(
                config,
                workdir,
                train,
                segment_train.validate_config,
                segment_train.RESUMABLE_CONFIG_CHANGES,
            )
            self.assertEqual(calls, [1])
            np.testing.assert_allclose(
                again["pooled"][folds.MODEL]["seeds"]["0"]["f1"], pooled["f1"], rtol=1e-6
            )


class AllFoldsAddaTest(absltest.TestCase):
    """ADDA over two folds of the phantom: each fold's source map trains on its fold, the
    criteria pool, disjoint_domains works within a fold."""

    def test_two_folds_of_adda(self):
        config = adda_ct_pt.get_config("smoke")
        config.progress_bar = False
        config.model.depth = 2
        config.model.base_filters = 2
        config.source.num_epochs = 1
        config.target_epochs = 0.5
        config.data.image_size = 16
        config.data.disjoint_domains = True
        config.data.num_folds = 2
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp) / "adda_folds"
            results = folds.run_all_folds(
                config,
                workdir,
                adda_train.train_and_evaluate,
                adda_train.validate_config,
                adda_train.COSMETIC_CONFIG_KEYS,
            )
            self.assertEqual(results["num_folds"], 2)
            self.assertLen(results["patients"], config.data.phantom_patients)
            self.assertIn("initial", results["pooled"])
            index = input_pipeline.open_index(config.data, progress=False)
            for fold in range(2):
                run_dir = workdir / f"fold_{fold}"
                source_config = json.loads((run_dir / "source" / "config.json").read_text())
                self.assertEqual(source_config["data"]["fold"], fold)
                single = folds.fold_config(config, fold)
                data = segmentation.SegmentationTask().load_data(single)
                fold_splits = index.fold_splits(2, fold)
                source_train = set(data.source["train"]["patient_key"])
                target_train = set(data.target["train"]["patient_key"])
                self.assertEqual(source_train & target_train, set())
                self.assertLessEqual(
                    source_train | target_train,
                    {key for key, split in fold_splits.items() if split == "train"},
                )
                self.assertEqual(
                    set(data.target["test"]["patient_key"]),
                    {key for key, split in fold_splits.items() if split == "test"},
                )

            # Each fold reuses its own fold's source map ('{fold}'): none is trained again, and
            # the game starts from the same map as before.
            reuse = copy.deepcopy(config)
            reuse.source_checkpoint = str(workdir / "fold_{fold}" / "source")
            reused = folds.run_all_folds(
                reuse,
                pathlib.Path(tmp) / "reused",
                adda_train.train_and_evaluate,
                adda_train.validate_config,
                adda_train.COSMETIC_CONFIG_KEYS,
            )
            for fold in range(2):
                self.assertFalse(
                    (pathlib.Path(tmp) / "reused" / f"fold_{fold}" / "source").exists()
                )
                before = json.loads((workdir / f"fold_{fold}" / "results.json").read_text())
                after = json.loads(
                    (pathlib.Path(tmp) / "reused" / f"fold_{fold}" / "results.json").read_text()
                )
                self.assertEqual(after["source_test"], before["source_test"])
            self.assertEqual(reused["patients"].keys(), results["patients"].keys())

            # Another fold's map would have trained on this fold's test patients: refused.
            crossed = folds.fold_config(config, 1)
            crossed.source_checkpoint = str(workdir / "fold_0" / "source")
            with self.assertRaisesRegex(ConfigError, r"trained with data.fold=0, this run has 1"):
                adda_train.validate_config(crossed)
            literal = folds.fold_config(config, 1)
            literal.source_checkpoint = str(workdir / "fold_{fold}" / "source")
            with self.assertRaisesRegex(ConfigError, "only when every fold runs"):
                adda_train.validate_config(literal)


if __name__ == "__main__":
    absltest.main()
