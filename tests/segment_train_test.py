"""End-to-end tests of segmentation training on a tiny index: outputs, resume, bad configs."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import flax.linen as nn
import forced_devices  # tests/
import jax
import numpy as np
from absl.testing import absltest

from data_pipeline import index as index_lib
from data_pipeline import index_writer, loader
from sarcoma_jax import baseline, checkpoints, input_pipeline, report
from sarcoma_jax.segment import steps
from sarcoma_jax.segment import train as segment_train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # configs/ is imported as a package from the repo root.

from configs import segment_ct  # noqa: E402

IMAGE_PIXELS = 20  # stored slices; preprocessed to config.data.image_size


def write_tiny_index(out_dir: pathlib.Path, num_patients: int = 4, num_slices: int = 6) -> None:
    """A CT index of bright discs (tumour) on a noisy background; splits by the patient scheme."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:IMAGE_PIXELS, :IMAGE_PIXELS]
    with index_writer.IndexWriter(out_dir, split_scheme="patient", seed=0) as writer:
        for patient in range(num_patients):
            patient_key = f"P{patient:02d}"
            series_key = f"{patient_key}_CT"
            writer.add_patient(patient_key)
            writer.add_series(
                series_key=series_key,
                patient_key=patient_key,
                study_uid=f"1.2.{patient}",
                series_uid=f"1.2.{patient}.1",
                modality="CT",
                sequence=None,
                description="CT",
                frame_of_reference_uid=f"1.2.{patient}.0",
                rows=IMAGE_PIXELS,
                cols=IMAGE_PIXELS,
                pixel_spacing=(1.0, 1.0),
                slice_spacing=2.0,
                orientation=(1, 0, 0, 0, 1, 0),
                n_slices=num_slices,
                units="HU",
            )
            for slice_index in range(num_slices):
                centre = rng.integers(6, IMAGE_PIXELS - 6, size=2)
                radius = rng.integers(2, 5)
                mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
                image_hu = rng.normal(0.0, 20.0, mask.shape) + 200.0 * mask
                writer.add_slice(
                    series_key=series_key,
                    slice_index=slice_index,
                    position_mm=2.0 * slice_index,
                    sop_instance_uid=None,
                    image=image_hu.astype(np.float32),
                    mask=mask,
                )


def tiny_config(index_dir: pathlib.Path):
    config = segment_ct.get_config("smoke")
    config.data.source = "index"
    config.data.path = str(index_dir)
    config.data.image_size = 16
    config.model.base_filters = 2
    config.model.depth = 2
    config.batch_size = 2
    config.eval_batch_size = 4  # val/test have 6 slices: the last batch is padded
    config.num_epochs = 2
    config.checkpoint_every_steps = 4
    config.progress_bar = False
    config.num_example_slices = 2
    return config


class Interrupted(Exception):
    pass


def _interrupt_after(stop_step: int):
    def hook(step: int) -> None:
        if step == stop_step:
            raise Interrupted(f"simulated kill after step {step}")

    return hook


def _params(workdir: pathlib.Path, config) -> dict:
    """The latest checkpoint's params and batch stats, as numpy."""
    model = steps.create_model(config.model)
    size = config.data.image_size
    template = steps.create_train_state(
        jax.random.PRNGKey(0),
        model,
        (size, size, 1),
        steps.create_optimizer(config.optimizer),
    )
    manager = checkpoints.manager(workdir / "checkpoints" / "latest")
    state, _ = checkpoints.restore(manager, template)
    manager.close()
    return jax.device_get(
        {
            "params": state.params,
            "batch_stats": state.batch_stats,
            "opt": state.opt_state,
            "step": state.step,
        }
    )


class TrainSegmentTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="segment_train_test_"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.index_dir = cls.tmp / "index"
        write_tiny_index(cls.index_dir)
        cls.config = tiny_config(cls.index_dir)
        # One uninterrupted run, shared by the tests below.
        cls.full_dir = cls.tmp / "full"
        cls.full_results = segment_train.train_and_evaluate(cls.config, cls.full_dir)

    def test_writes_all_outputs(self):
        for name in (
            "config.json",
            "provenance.json",
            "metrics.jsonl",
            "results.json",
            "training_curves.png",
            "segmentation_examples.png",
        ):
            self.assertTrue((self.full_dir / name).is_file(), name)
        results = json.loads((self.full_dir / "results.json").read_text())
        for split in ("test", "val"):
            self.assertEqual(
                set(results[split]), {"f1", "dice", "accuracy", "auc", "zero_ratio", "loss"}
            )
        self.assertIn(results["best_epoch"], (1, 2))
        self.assertEqual(results["data"]["test"]["slices"], 6)  # one patient of six slices
        history = [json.loads(line) for line in (self.full_dir / "metrics.jsonl").open()]
        self.assertEqual([row["epoch"] for row in history], [1, 2])
        self.assertEqual(
            results["val"]["f1"], max(row["val_f1"] for row in history)
        )  # the best state is the one reported
        record = json.loads((self.full_dir / "provenance.json").read_text())
        self.assertEqual(record["seed"], self.config.seed)
        self.assertIn("jax", record["packages"])
        self.assertIn("commit", record["git"])
        self.assertTrue((self.full_dir / "checkpoints" / "best").is_dir())

    def test_baseline_is_the_threshold_fit_on_train(self):
        results = self.full_results["baseline_threshold"]
        splits = input_pipeline.load_splits(
            input_pipeline.query_splits(index_lib.Index(self.index_dir), "CT"), 16
        )
        rule = baseline.fit_intensity_threshold(splits["train"]["image"], splits["train"]["mask"])
        self.assertEqual(results["polarity"], "bright")  # discs are brighter than the background
        self.assertEqual(results["score_threshold"], rule.score_threshold)
        # Independent check of the test F1: per-image Dice of image >= threshold in float64.
        images, masks = splits["test"]["image"], splits["test"]["mask"] > 0
        predicted = images >= results["score_threshold"]
        dice = [
            1.0 if p.sum() + t.sum() == 0 else 2 * (p & t).sum() / (p.sum() + t.sum())
            for p, t in zip(predicted, masks, strict=True)
        ]
        self.assertAlmostEqual(results["test"]["f1"], np.mean(dice), places=12)
        # Per test image, with its patient (what cross-validation pools per patient).
        np.testing.assert_allclose(results["test_per_image"]["f1"], dice, rtol=0, atol=1e-12)
        self.assertEqual(
            results["test_per_image"]["patient_key"], splits["test"]["patient_key"].tolist()
        )

    def test_resume_after_interruption_equals_uninterrupted(self):
        workdir = self.tmp / "interrupted"
        # Step 9: mid-epoch 2 (6 steps per epoch), one step after the checkpoint at step 8.
        with self.assertRaises(Interrupted):
            segment_train.train_and_evaluate(self.config, workdir, step_hook=_interrupt_after(9))
        self.assertFalse((workdir / "results.json").exists())
        resumed = segment_train.train_and_evaluate(self.config, workdir)

        expected, actual = _params(self.full_dir, self.config), _params(workdir, self.config)
        jax.tree.map(np.testing.assert_array_equal, expected, actual)
        self.assertEqual(resumed["test"], self.full_results["test"])
        self.assertEqual(resumed["best_epoch"], self.full_results["best_epoch"])
        self.assertEqual(
            (workdir / "metrics.jsonl").read_text(), (self.full_dir / "metrics.jsonl").read_text()
        )

    def test_refuses_a_workdir_of_another_config(self):
        other = tiny_config(self.index_dir)
        other.optimizer.learning_rate = 0.5
        with self.assertRaisesRegex(input_pipeline.ConfigError, "another config"):
            segment_train.train_and_evaluate(other, self.full_dir)


class NumSeedsTest(absltest.TestCase):
    """config.num_seeds: seeds trained by one vmapped step, each equal to its single run."""

    def test_each_seed_equals_its_single_run(self):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="num_seeds_test_"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        write_tiny_index(tmp / "index")
        config = tiny_config(tmp / "index")
        config.seed, config.num_seeds = 3, 2
        summary = segment_train.train_and_evaluate(config, tmp / "vmapped")
        self.assertEqual(sorted(summary["seeds"]), ["3", "4"])
        for seed in (3, 4):
            single = segment_train.seed_config(config, seed)
            self.assertEqual(single.num_seeds, 1)
            expected = segment_train.train_and_evaluate(single, tmp / f"single_{seed}")
            seed_dir = tmp / "vmapped" / f"seed_{seed}"
            got = json.loads((seed_dir / "results.json").read_text())
            self.assertEqual(got["seed"], seed)
            self.assertEqual(got["best_epoch"], expected["best_epoch"])
            for split in ("val", "test"):
                for name, value in expected[split].items():
                    # One program for all seeds may order float sums differently (XLA's fusion
                    # and scheduling; with jax.vmap, grouped convolutions): equal up to rounding.
                    self.assertAlmostEqual(got[split][name], value, delta=1e-4 * max(1, abs(value)))
            rows = [json.loads(line) for line in (seed_dir / "metrics.jsonl").open()]
            single_rows = [
                json.loads(line) for line in (tmp / f"single_{seed}" / "metrics.jsonl").open()
            ]
            self.assertEqual([sorted(row) for row in rows], [sorted(row) for row in single_rows])
            for row, single_row in zip(rows, single_rows, strict=True):
                for key, value in row.items():
                    np.testing.assert_allclose(value, single_row[key], rtol=1e-4, err_msg=key)
            self.assertTrue((seed_dir / "segmentation_examples.png").is_file())
            self.assertEqual(json.loads((seed_dir / "config.json").read_text())["seed"], seed)
        # The two seeds really differ (their own init and data order).
        self.assertNotEqual(summary["seeds"]["3"]["val"], summary["seeds"]["4"]["val"])
        # The report reads the seed runs when given the whole run.
        runs, _ = report.load_runs([tmp / "vmapped"])
        self.assertEqual(sorted(run.seed for run in runs), [3, 4])

    def test_killed_run_of_seeds_resumes_to_the_same_result(self):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="num_seeds_resume_test_"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        write_tiny_index(tmp / "index")
        config = tiny_config(tmp / "index")
        config.num_seeds = 2
        whole = segment_train.train_and_evaluate(config, tmp / "whole")
        # Step 9: mid-epoch 2 (6 steps per epoch), one step after the checkpoint at step 8.
        with self.assertRaises(Interrupted):
            segment_train.train_and_evaluate(config, tmp / "killed", step_hook=_interrupt_after(9))
        rows_at_kill = (tmp / "killed" / "seed_1" / "metrics.jsonl").read_text().splitlines()
        self.assertLen(rows_at_kill, 1)  # epoch 1's row; the run was killed in epoch 2
        resumed = segment_train.train_and_evaluate(config, tmp / "killed")
        self.assertEqual(resumed["seeds"], whole["seeds"])
        for seed in ("seed_0", "seed_1"):
            self.assertEqual(
                (tmp / "killed" / seed / "metrics.jsonl").read_text(),
                (tmp / "whole" / seed / "metrics.jsonl").read_text(),
            )

    def test_bad_num_seeds_is_a_config_error(self):
        config = tiny_config(pathlib.Path("/nonexistent"))
        config.num_seeds = 0
        with self.assertRaisesRegex(
            input_pipeline.ConfigError, "num_seeds must be an integer >= 1"
        ):
            segment_train.train_and_evaluate(config, "/tmp/never_written")


_DEVICES_SCRIPT = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import jax
import segment_train_test as t
from sarcoma_jax.segment import train as segment_train
assert jax.local_device_count() == 4, jax.devices()
tmp = pathlib.Path(sys.argv[2])
output = {}
for name, num_devices, num_seeds in (("one", 1, 1), ("four", 4, 1), ("four_seeds", 4, 2)):
    config = t.tiny_config(tmp / "index")
    config.batch_size, config.num_devices, config.num_seeds = 4, num_devices, num_seeds
    summary = segment_train.train_and_evaluate(config, tmp / name)
    run = tmp / name / ("seed_0" if num_seeds > 1 else "")
    output[name] = {
        "devices": summary["devices"],
        "rows": [json.loads(line) for line in (run / "metrics.jsonl").open()],
        "test": json.loads((run / "results.json").read_text())["test"],
    }
config = t.tiny_config(tmp / "index")
config.batch_size = 5
try:
    segment_train.train_and_evaluate(config, tmp / "odd")
except segment_train.input_pipeline.ConfigError as error:
    output["odd_batch_error"] = str(error)
print(json.dumps(output))
"""


class DevicesTest(absltest.TestCase):
    def test_four_devices_give_the_loss_trajectory_of_one(self):
        # Data parallel over 4 (forced) CPU devices: the batch of 4 is split, BatchNorm
        # statistics and the loss are over the global batch, so every epoch's numbers equal the
        # one-device run's up to the order of float sums; with seeds as well.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="devices_test_"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        write_tiny_index(tmp / "index")
        output = forced_devices.run_json_script(_DEVICES_SCRIPT, [str(tmp)], num_devices=4)
        self.assertEqual(
            [output[name]["devices"] for name in ("one", "four", "four_seeds")], [1, 4, 4]
        )
        for name in ("four", "four_seeds"):
            rows, reference = output[name]["rows"], output["one"]["rows"]
            self.assertEqual([sorted(row) for row in rows], [sorted(row) for row in reference])
            for row, reference_row in zip(rows, reference, strict=True):
                for key, value in row.items():
                    np.testing.assert_allclose(
                        value, reference_row[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}"
                    )
            for key, value in output[name]["test"].items():
                np.testing.assert_allclose(value, output["one"]["test"][key], rtol=1e-4, atol=1e-6)
        self.assertIn("divisible by the 4 devices", output["odd_batch_error"])


class _OneBatchNorm(nn.Module):
    """A lone BatchNorm on (batch, h, w, c) 'images', to check the statistics by hand."""

    bn_momentum: float = 0.99

    @nn.compact
    def __call__(self, images, train: bool):
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(images)


class RecalibrateBatchStatsTest(absltest.TestCase):
    def test_mean_of_per_batch_statistics(self):
        rng = np.random.default_rng(0)
        train_data = {
            "image": rng.normal(3.0, 2.0, (7, 4, 4, 2)).astype(np.float32),
            "mask": np.zeros((7, 4, 4, 2), np.uint8),
        }
        model = _OneBatchNorm()
        state = steps.create_train_state(
            jax.random.PRNGKey(0),
            model,
            (4, 4, 2),
            steps.create_optimizer(tiny_config(pathlib.Path(".")).optimizer),
        )
        stats_fn = jax.jit(
            functools.partial(
                steps.batch_stats_step,
                stats_apply_fn=model.clone(bn_momentum=0.0).apply,
            )
        )
        recalibrated = steps.recalibrate_batch_stats(
            stats_fn, state, train_data, batch_size=3, num_batches=4, seed=5
        )
        # Independently: the same 4 batches, per-channel mean and (biased) variance in float64.
        batches = loader.train_batches(train_data, 3, seed=5)
        images = [next(batches)["image"].astype(np.float64) for _ in range(4)]
        expected_mean = np.mean([x.mean(axis=(0, 1, 2)) for x in images], axis=0)
        expected_var = np.mean([x.var(axis=(0, 1, 2)) for x in images], axis=0)
        stats = recalibrated.batch_stats["BatchNorm_0"]
        np.testing.assert_allclose(stats["mean"], expected_mean, rtol=1e-5)
        np.testing.assert_allclose(stats["var"], expected_var, rtol=1e-4)
        unchanged = steps.recalibrate_batch_stats(
            stats_fn, state, train_data, batch_size=3, num_batches=0, seed=5
        )
        self.assertIs(unchanged, state)


class BadConfigTest(absltest.TestCase):
    """main.py must fail in one line, without a traceback, before any compute."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="bad_config_test_"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.index_dir = cls.tmp / "index"
        write_tiny_index(cls.index_dir)

    def _run_main(self, *overrides: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            str(REPO_ROOT / "main.py"),
            f"--config={REPO_ROOT / 'configs' / 'segment_ct.py'}:smoke",
            f"--workdir={self.tmp / 'run'}",
            "--config.data.source=index",
            f"--config.data.path={self.index_dir}",
            *overrides,
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        return subprocess.run(
            command, capture_output=True, text=True, timeout=120, cwd=self.tmp, env=env
        )

    def _assert_one_line_error(self, result, *fragments: str) -> None:
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr)
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        self.assertLen(error_lines, 1, result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, error_lines[0])
        self.assertFalse((self.tmp / "run" / "checkpoints").exists())

    def test_unknown_modality(self):
        self._assert_one_line_error(self._run_main("--config.data.modality=XR"), "XR")

    def test_missing_data_folder(self):
        missing = self.tmp / "no_such_folder"
        result = self._run_main(f"--config.data.path={missing}")
        self._assert_one_line_error(result, "not found", str(missing))

    def test_image_size_not_divisible(self):
        result = self._run_main("--config.data.image_size=36", "--config.model.depth=3")
        self._assert_one_line_error(result, "image_size 36", "multiple of 8")

    def test_override_of_a_field_the_config_lacks(self):
        self._assert_one_line_error(self._run_main("--config.data.no_such_field=1"), "override")

    def test_empty_split(self):
        # The tiny index holds CT only: no STIR slices in any split.
        self._assert_one_line_error(self._run_main("--config.data.modality=STIR"), "no STIR")


if __name__ == "__main__":
    absltest.main()
