"""Tests for sarcoma_jax.adda: the loop, criteria in runs, resume, faults, devices, configs."""

import copy
import functools
import importlib
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import forced_devices  # tests/
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from configs import adda, adda_base, adda_ct_pt, adda_t2_ct, adda_t2_pt
from data_pipeline import loader
from sarcoma_jax import checkpoints, models, report
from sarcoma_jax.adda import criteria, programs, results, segmentation
from sarcoma_jax.adda import game as game_lib
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.adda import train as adda_train
from sarcoma_jax.input_pipeline import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE = 16
_COMPILATION_CACHE = tempfile.TemporaryDirectory()


def setUpModule():
    # The toy runs compile the same programs again and again (each run builds its own jitted
    # functions); JAX's persistent cache turns every compile after the first into a lookup.
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _toy_domain(rng: np.random.Generator, count: int, inverted: bool) -> dict[str, np.ndarray]:
    """Squares on noise; the target domain inverts the intensities (a real shift)."""
    images = rng.uniform(0.0, 0.3, (count, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    masks = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8)
    for i in range(count):
        row, col = rng.integers(2, IMAGE_SIZE - 7, size=2)
        masks[i, row : row + 5, col : col + 5] = 1
    images = np.where(masks > 0, 0.9, images).astype(np.float32)
    if inverted:
        images = 1.0 - images
    # Two images per toy patient, as the segmentation data carries a patient key per image.
    patient_keys = np.array([f"toy_{i // 2:02d}" for i in range(count)])
    return {"image": images, "mask": masks, "patient_key": patient_keys}


class ToyTask(segmentation.SegmentationTask):
    """Segmentation on tiny synthetic images; the source map is a random initialisation."""

    def validate_config(self, config):
        del config

    def load_data(self, config):
        rng = np.random.default_rng(0)
        sizes = {"train": 12, "val": 6, "test": 5}
        source = {split: _toy_domain(rng, n, inverted=False) for split, n in sizes.items()}
        sizes["val"] = 9  # unequal val sets exercise the wrap-around of the mixed batches
        target = {split: _toy_domain(rng, n, inverted=True) for split, n in sizes.items()}
        return task_lib.DomainData(source=source, target=target)

    def source_variables(self, config, workdir, data):
        del workdir
        model = models.create(config.model)
        image = jnp.zeros((1, *data.source["train"]["image"].shape[1:]))
        init = jax.jit(lambda rng: model.init(rng, image, train=False))
        return dict(init(jax.random.PRNGKey(config.seed + 100)))


class PoisonedToyTask(ToyTask):
    """ToyTask with one target training image set to NaN."""

    def __init__(self, poisoned_index):
        self.poisoned_index = poisoned_index

    def load_data(self, config):
        data = super().load_data(config)
        data.target["train"]["image"][self.poisoned_index] = np.nan
        return data


def toy_config(**overrides):
    config = adda_base.get_config("smoke", "CT", "PT")
    config.progress_bar = False
    config.model.depth = 1
    config.model.base_filters = 2
    config.discriminator.blocks = ((2,), (2,))
    config.batch_size = 4
    config.eval_batch_size = 4
    config.initial_disc_steps = 2
    config.disc_steps_per_cycle = 3
    config.target_steps_per_cycle = 2
    config.target_epochs = 2.0  # 6 target steps: 3 cycles
    config.fused_cycles = True  # the fused path (the CPU default is one call per step)
    config.confusion_window = 2
    config.confusion_delay = 4
    config.best_loss_min_target_steps = 2
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def run_toy(workdir, cycle_hook=None, **overrides):
    return adda_train.train_and_evaluate(
        toy_config(**overrides), workdir, task=ToyTask(), cycle_hook=cycle_hook
    )


def read_rows(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return [
        {key: value for key, value in row.items() if not key.endswith("seconds")} for row in rows
    ]


def final_target_params(workdir) -> dict:
    manager = checkpoints.manager(pathlib.Path(workdir) / "checkpoints" / "latest")
    restored = manager.restore(manager.latest_step())
    return restored["state"]["params"]


def without_wall_time(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "wall_time_s"}


def assert_rows_close(test, rows_a, rows_b, rtol):
    test.assertEqual([sorted(row) for row in rows_a], [sorted(row) for row in rows_b])
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key, value in row_a.items():
            if isinstance(value, float):
                np.testing.assert_allclose(value, row_b[key], rtol=rtol, atol=1e-6, err_msg=key)
            else:
                test.assertEqual(value, row_b[key], key)


_DEVICES_SCRIPT = """
import json, pathlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
import jax
import adda_train_test as t
from sarcoma_jax.adda import train as adda_train
assert jax.local_device_count() == 4, jax.devices()
output = {}
with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / "four"
    output["devices"] = t.run_toy(workdir, num_devices=4)["devices"]
    output["rows"] = t.read_rows(workdir)
    try:
        t.run_toy(pathlib.Path(tmp) / "odd", batch_size=5)
    except adda_train.ConfigError as error:
        output["odd_batch_error"] = str(error)
print(json.dumps(output))
"""


_HOSTS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import main
import adda_train_test as t
config = t.toy_config(**{
    "distributed.coordinator_address": f"localhost:{sys.argv[2]}",
    "distributed.num_processes": 2,
    "distributed.process_id": int(sys.argv[3]),
})
main.initialize_distributed(config)
import jax
from sarcoma_jax.adda import train as adda_train
assert (jax.process_count(), jax.device_count()) == (2, 4), jax.devices()
kill_after = int(sys.argv[5])


def hook(completed_phases):
    if completed_phases == kill_after:
        sys.exit(3)  # both hosts killed after the same phase


results = adda_train.train_and_evaluate(config, sys.argv[4], task=t.ToyTask(), cycle_hook=hook)
print(json.dumps({"devices": results["devices"], "hosts": results["hosts"]}))
"""


class Killed(Exception):
    """A simulated kill (raised by `kill_after`)."""


def kill_after(phases: int):
    """A cycle_hook that kills the run once `phases` phases are complete."""

    def hook(completed_phases):
        if completed_phases == phases:
            raise Killed

    return hook


class ToyGameTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.reference_dir = pathlib.Path(cls.tmp.name) / "reference"
        cls.reference = run_toy(cls.reference_dir)
        cls.reference_rows = read_rows(cls.reference_dir)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_schedule_of_evaluations_and_steps(self):
        # 12 target train images, batch 4, 2 epochs: 6 target steps = 3 cycles of k_t = 2.
        phases = [
            (row["phase"], row["disc_steps"], row["target_steps"]) for row in self.reference_rows
        ]
        self.assertEqual(
            phases,
            [
                ("before_da", 0, 0),
                ("initial_disc", 2, 0),
                ("cycle", 5, 2),
                ("cycle", 8, 4),
                ("cycle", 11, 6),
            ],
        )
        for row in self.reference_rows:
            self.assertEqual(row["step"], row["disc_steps"] + row["target_steps"])

    def test_criteria_follow_the_rows(self):
        rows = self.reference_rows[1:]  # 'before_da' is not a DA evaluation
        criteria = self.reference["criteria"]
        self.assertEqual(criteria["initial"]["step"], 0)
        self.assertEqual(criteria["latest"]["step"], rows[-1]["step"])
        # Highest peak: the best target-val F1, ties to the later.
        best_f1 = max(row["target_val_f1"] for row in rows)
        peak_step = [row["step"] for row in rows if row["target_val_f1"] == best_f1][-1]
        self.assertEqual(criteria["highest_peak"]["step"], peak_step)
        self.assertTrue(criteria["highest_peak"]["oracle"])
        np.testing.assert_allclose(criteria["highest_peak"]["val"]["f1"], best_f1, rtol=1e-6)
        # Best loss: the lowest target adversarial loss with >= 2 target steps.
        eligible = [row for row in rows if row["target_steps"] >= 2]
        lowest = min(row["target_adversarial_loss"] for row in eligible)
        loss_step = [r["step"] for r in eligible if r["target_adversarial_loss"] == lowest][-1]
        self.assertEqual(criteria["best_loss"]["step"], loss_step)
        # Confusion: eq. 26 over a window of 2 evaluations, > 4 discriminator steps.
        scores = []
        for previous, row in zip(rows, rows[1:], strict=False):
            score = 1 - np.mean(
                [abs(r["recall"] - 0.5) + abs(r["specificity"] - 0.5) for r in (previous, row)]
            )
            np.testing.assert_allclose(row["confusion_score"], score, rtol=1e-5)
            if row["disc_steps"] > 4:
                scores.append((score, row["step"]))
        best_score = max(score for score, _ in scores)
        confusion_step = [s for score, s in scores if np.isclose(score, best_score, rtol=1e-6)][-1]
        self.assertEqual(criteria["confusion"]["step"], confusion_step)

    def test_recall_and_specificity_count_every_val_sample_once(self):
        row = self.reference_rows[-1]
        # 6 source and 9 target val samples: fractions with those denominators.
        self.assertAlmostEqual(row["recall"] * 6, round(row["recall"] * 6), places=4)
        self.assertAlmostEqual(row["specificity"] * 9, round(row["specificity"] * 9), places=4)

    def test_results_layout(self):
        results = self.reference
        self.assertEqual(results["pair"], "CT->PT")
        self.assertEqual(results["scheme"], "adda")
        self.assertEqual(set(results["criteria"]), set(criteria.DEFAULT))
        for entry in results["criteria"].values():
            for split in ("test", "val"):
                self.assertLessEqual({"f1", "dice", "accuracy", "auc"}, set(entry[split]))
            # One F1 per test image (5 in ToyTask), averaging to the split's F1.
            per_image = entry["test_per_image"]["f1"]
            self.assertLen(per_image, 5)
            self.assertAlmostEqual(np.mean(per_image), entry["test"]["f1"], places=6)
        self.assertLessEqual({"f1", "dice", "accuracy", "auc"}, set(results["source_test"]))
        for name in ("config.json", "provenance.json", "results.json"):
            self.assertTrue((self.reference_dir / name).is_file(), name)

    def test_a_criterion_defined_in_a_test_file_runs_through_the_registry(self):
        # criteria_test.LowestDiscLoss is defined in that test file alone; naming it in
        # config.criteria gives it a checkpoint folder, a score column, an entry in results.json
        # and a column in the report's stopping table. It asserts, while traced, that it never
        # sees target labels (nor does its `measure`).
        workdir = pathlib.Path(self.tmp.name) / "new_criterion"
        names = (*criteria.DEFAULT, "criteria_test:LowestDiscLoss")
        results = run_toy(workdir, criteria=names)
        rows = read_rows(workdir)
        after_start = rows[1:]
        lowest = min(row["disc_loss"] for row in after_start)
        step = [row["step"] for row in after_start if row["disc_loss"] == lowest][-1]
        entry = results["criteria"]["lowest_disc_loss"]
        self.assertEqual(entry["step"], step)
        self.assertEqual(entry["label"], "lowest discriminator loss")
        self.assertNotIn("oracle", entry)
        np.testing.assert_allclose(entry["selection"]["disc_loss"], lowest, rtol=1e-6)
        for row in rows:
            self.assertIn("lowest_disc_loss_score", row)
            self.assertEqual(row["lowest_disc_loss_checked"], 1.0)  # its measure ran
        self.assertEqual(
            checkpoints.latest_step(workdir / "checkpoints" / "lowest_disc_loss"), step
        )
        for name in criteria.DEFAULT:  # the others as in a run without it
            self.assertEqual(
                results["criteria"][name]["step"], self.reference["criteria"][name]["step"]
            )
        out = pathlib.Path(self.tmp.name) / "new_criterion_report"
        report.write_report([workdir], out, overlays=False, progress=False)
        stopping = (out / "stopping.md").read_text()
        self.assertIn("lowest discriminator loss ADDA", stopping)

    def test_initial_criterion_is_the_source_map(self):
        # Before DA the target map is the source map: same outputs on target test, so the same F1
        # as scoring the source variables directly.
        task = ToyTask()
        config = toy_config()
        data = task.load_data(config)
        variables = task.source_variables(config, None, data)
        model = models.create(config.model)
        outputs = model.apply(variables, data.target["test"]["image"], train=False)
        expected = task.evaluate(np.asarray(outputs), data.target["test"])
        np.testing.assert_allclose(
            self.reference["criteria"]["initial"]["test"]["f1"], expected["f1"], rtol=1e-6
        )

    def test_fused_cycles_default_to_unfused_on_cpu_only(self):
        config = toy_config(fused_cycles=None)
        self.assertEqual(programs.fused_cycles(config), jax.default_backend() != "cpu")
        self.assertTrue(programs.fused_cycles(toy_config(fused_cycles=True)))
        self.assertFalse(programs.fused_cycles(toy_config(fused_cycles=False)))

    def test_fused_and_unfused_cycles_give_the_same_numbers(self):
        workdir = pathlib.Path(self.tmp.name) / "unfused"
        results = run_toy(workdir, fused_cycles=False)
        assert_rows_close(self, read_rows(workdir), self.reference_rows, rtol=1e-4)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            final_target_params(workdir),
            final_target_params(self.reference_dir),
        )
        self.assertEqual(results["criteria"].keys(), self.reference["criteria"].keys())

    def test_killed_run_resumes_to_the_same_result(self):
        workdir = pathlib.Path(self.tmp.name) / "killed"

        with self.assertRaises(Killed):
            run_toy(workdir, cycle_hook=kill_after(2))
        self.assertFalse((workdir / "results.json").exists())
        results = run_toy(workdir)
        self.assertEqual(without_wall_time(results), without_wall_time(self.reference))
        self.assertEqual(read_rows(workdir), self.reference_rows)
        jax.tree.map(
            np.testing.assert_array_equal,
            final_target_params(workdir),
            final_target_params(self.reference_dir),
        )

    def test_num_seeds_plays_each_seed_as_its_single_run(self):
        # Two seeds in one program, killed after two phases and resumed: each seed's folder
        # holds the run a single run of that seed gives, up to float rounding (one program for
        # all seeds may order sums differently).
        workdir = pathlib.Path(self.tmp.name) / "seeds"

        with self.assertRaises(Killed):
            run_toy(workdir, cycle_hook=kill_after(2), num_seeds=2)
        summary = run_toy(workdir, num_seeds=2)
        single_dir = pathlib.Path(self.tmp.name) / "seed_1_alone"
        single = {0: self.reference, 1: run_toy(single_dir, seed=1)}
        single_rows = {0: self.reference_rows, 1: read_rows(single_dir)}
        self.assertEqual(summary["num_seeds"], 2)
        self.assertEqual(summary["seed_workdirs"], ["seed_0", "seed_1"])
        for seed in (0, 1):
            seed_dir = workdir / f"seed_{seed}"
            assert_rows_close(self, read_rows(seed_dir), single_rows[seed], rtol=1e-4)
            results = json.loads((seed_dir / "results.json").read_text())
            self.assertEqual(results["seed"], seed)
            self.assertEqual(results["num_seeds_together"], 2)
            self.assertEqual(set(results["criteria"]), set(single[seed]["criteria"]))
            for name, scored in results["criteria"].items():
                self.assertEqual(scored["step"], single[seed]["criteria"][name]["step"], name)
                np.testing.assert_allclose(
                    scored["test"]["f1"], single[seed]["criteria"][name]["test"]["f1"], atol=1e-3
                )
                self.assertEqual(
                    summary["seeds"][str(seed)]["criteria"][name]["test"], scored["test"]
                )
            config = json.loads((seed_dir / "config.json").read_text())
            self.assertEqual((config["seed"], config["num_seeds"]), (seed, 1))
        self.assertNotEqual(read_rows(workdir / "seed_0"), read_rows(workdir / "seed_1"))
        # The report reads a num_seeds run as its seeds' runs.
        runs, _ = report.load_runs([workdir])
        self.assertEqual(sorted(run.seed for run in runs), [0, 1])

    def test_progress_fields_of_two_seeds(self):
        rows = [
            {"disc_loss": 0.6931, "confusion_score": None, "target_val_f1": 0.5},
            {"disc_loss": 0.25, "confusion_score": -0.0, "target_val_f1": 0.12345},
        ]
        self.assertEqual(
            results.progress_fields(rows, "target_val_f1", ["confusion"]),
            {"disc_loss": "0.693 0.250", "confusion": "- 0.000", "target_val_f1": "0.500 0.123"},
        )

    def test_non_finite_loss_of_one_seed_names_it(self):
        step_metrics = {  # (steps, seeds)
            "disc_loss": np.array([[0.7, 0.7], [0.6, np.nan], [np.nan, np.nan]], np.float32),
        }
        with self.assertRaisesRegex(
            programs.NonFiniteLossError,
            "^seed 4: non-finite discriminator loss at discriminator step 32 \\(cycle 6\\)",
        ):
            programs.check_finite(
                step_metrics,
                {"disc_steps": 30, "target_steps": 10},
                "cycle 6",
                "W (step 40)",
                seeds=[3, 4],
            )

    def test_discriminator_without_normalisation(self):
        # norm='none' (models.LogitMapDiscriminator): no batch statistics anywhere; the game runs,
        # checkpoints and evaluates as with the reference discriminator.
        workdir = pathlib.Path(self.tmp.name) / "no_norm"
        results = run_toy(workdir, **{"discriminator.norm": "none"})
        rows = read_rows(workdir)
        self.assertLen(rows, len(self.reference_rows))
        for row in rows:
            self.assertTrue(0.0 <= row["recall"] <= 1.0 and 0.0 <= row["specificity"] <= 1.0)
            self.assertTrue(math.isfinite(row["disc_loss"]))
        self.assertNotEqual(rows, self.reference_rows)
        self.assertIn("latest", results["criteria"])

    def test_reset_scheme_resets_and_differs(self):
        workdir = pathlib.Path(self.tmp.name) / "reset"
        run_toy(workdir, scheme="reset")
        rows = read_rows(workdir)
        # CT->PT resets the discriminator before every cycle: after 2 initial steps, k_d = 3, at
        # discriminator updates 2, 5, 8 (three cycles); the target map never.
        self.assertEqual([row.get("disc_resets") for row in rows[1:]], [0, 1, 2, 3])
        self.assertEqual({row.get("target_resets") for row in rows[1:]}, {0})
        self.assertEqual([r.get("disc_resets") for r in self.reference_rows[1:]], [0, 0, 0, 0])
        self.assertNotAlmostEqual(rows[-1]["disc_loss"], self.reference_rows[-1]["disc_loss"])

    def test_non_finite_loss_stops_naming_network_and_step(self):
        workdir = pathlib.Path(self.tmp.name) / "diverged"
        config = toy_config()
        # Poison the target training image that the target stream shows last in its first
        # epoch (found with the loader, as the game draws it: seed 2 * seed + 1, batches of 4).
        target_images = ToyTask().load_data(config).target["train"]["image"]
        stream = loader.train_batches(
            {"image": np.arange(len(target_images)), "mask": np.zeros((len(target_images), 0))},
            config.batch_size,
            seed=2 * config.seed + 1,
        )
        first_seen = {}
        for batch_index in range(3):  # one epoch of 12 images
            for image_index in next(stream)["image"]:
                first_seen.setdefault(int(image_index), batch_index)
        poisoned = max(first_seen, key=first_seen.get)
        self.assertEqual(first_seen[poisoned], 2)
        # Target batches 0 and 1 feed the 2 initial discriminator steps; batch 2 the first
        # discriminator step of cycle 1, i.e. discriminator step 3.
        task = PoisonedToyTask(poisoned)
        with self.assertRaises(programs.NonFiniteLossError) as raised:
            adda_train.train_and_evaluate(config, workdir, task=task)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn("discriminator loss at discriminator step 3 (cycle 1)", message)
        # The last good state (after the initial discriminator steps, step 2) is kept.
        manager = checkpoints.manager(workdir / "checkpoints" / "game")
        self.assertEqual(manager.latest_step(), 2)
        self.assertIn("step 2", message)
        self.assertFalse((workdir / "results.json").exists())

    def test_non_finite_target_loss_names_the_target_map(self):
        step_metrics = {
            "disc_loss": np.array([0.7, 0.6, 0.5], np.float32),
            "target_loss": np.array([0.9, np.inf], np.float32),
        }
        with self.assertRaisesRegex(
            programs.NonFiniteLossError, "target map loss at target map step 12 \\(cycle 6\\)"
        ):
            programs.check_finite(
                step_metrics, {"disc_steps": 30, "target_steps": 10}, "cycle 6", "W (step 40)"
            )

    def test_four_devices_give_the_loss_trajectory_of_one(self):
        output = forced_devices.run_json_script(
            _DEVICES_SCRIPT,
            [],
            num_devices=4,
            env={"JAX_COMPILATION_CACHE_DIR": _COMPILATION_CACHE.name},
        )
        self.assertEqual(output["devices"], 4)
        # Same batches, BatchNorm statistics and losses over the global batch: equal up to the
        # order of float sums.
        assert_rows_close(self, output["rows"], self.reference_rows, rtol=1e-4)
        self.assertIn("divisible by the 4 devices", output["odd_batch_error"])

    def test_two_hosts_give_the_loss_trajectory_of_one(self):
        # Two processes of two CPU devices each, joined by jax.distributed (Gloo): the mesh spans
        # four devices on two hosts. Both are killed after two phases and started again; the
        # resumed run's rows equal the one-device run's as with four local devices.
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE.name
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        workdir = pathlib.Path(self.tmp.name) / "two_hosts"

        def launch(kill_after: int) -> list[tuple[int, str, str]]:
            with socket.socket() as probe:  # a free port for the coordinator
                probe.bind(("localhost", 0))
                port = probe.getsockname()[1]
            hosts = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _HOSTS_SCRIPT,
                        str(REPO_ROOT / "tests"),
                        str(port),
                        str(process_id),
                        str(workdir),
                        str(kill_after),
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for process_id in (0, 1)
            ]
            outputs = [host.communicate(timeout=600) for host in hosts]
            return [(host.returncode, *output) for host, output in zip(hosts, outputs, strict=True)]

        for returncode, _, stderr in launch(kill_after=2):
            self.assertEqual(returncode, 3, stderr[-3000:])
        self.assertFalse((workdir / "results.json").exists())
        self.assertLen(read_rows(workdir), 3)  # before DA, initial discriminator steps, cycle 1
        for returncode, stdout, stderr in launch(kill_after=0):
            self.assertEqual(returncode, 0, stderr[-3000:])
            self.assertEqual(
                json.loads(stdout.strip().splitlines()[-1]), {"devices": 4, "hosts": 2}
            )
        # Only the first host wrote the rows; they match the one-device run's.
        assert_rows_close(self, read_rows(workdir), self.reference_rows, rtol=1e-4)
        results = json.loads((workdir / "results.json").read_text())
        self.assertEqual(results["hosts"], 2)
        self.assertEqual(set(results["criteria"]), set(self.reference["criteria"]))

    def test_workdir_of_another_config_is_refused(self):
        with self.assertRaisesRegex(ConfigError, "another config"):
            run_toy(self.reference_dir, scheme="reset")


class SeedsTest(absltest.TestCase):
    def test_vmapped_cycle_equals_one_cycle_per_seed(self):
        config = toy_config()
        task = ToyTask()
        data = task.load_data(config)
        game = game_lib.create_game(config)
        source_variables = task.source_variables(config, None, data)
        states = [
            game_lib.create_game_state(
                jax.random.PRNGKey(seed),
                game,
                source_variables,
                (IMAGE_SIZE, IMAGE_SIZE, 1),
                criteria.init(criteria.build(config)),
            )
            for seed in (0, 1)
        ]
        rng = np.random.default_rng(0)

        def batches(domain, count):
            images = getattr(data, domain)["train"]["image"]
            return np.stack(
                [images[rng.choice(len(images), 4, replace=False)] for _ in range(count)]
            )

        # Each seed its own state and its own batches: (seeds, steps, batch, ...).
        cycle_batches = [
            np.stack([batches(domain, count) for _ in states])
            for domain, count in (("source", 3), ("target", 3), ("source", 2), ("target", 2))
        ]
        stacked_states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        cycle = functools.partial(game_lib.run_cycle, game)
        vmapped, vmapped_metrics = jax.jit(jax.vmap(cycle, in_axes=(0, None, 0, 0, 0, 0)))(
            stacked_states, source_variables, *cycle_batches
        )
        single = jax.jit(cycle)
        for seed, state in enumerate(states):
            state, step_metrics = single(
                state, source_variables, *[images[seed] for images in cycle_batches]
            )
            for name, values in step_metrics.items():
                np.testing.assert_allclose(vmapped_metrics[name][seed], values, rtol=1e-4)
            np.testing.assert_allclose(
                *[
                    np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)])
                    for params in (
                        jax.tree.map(lambda leaf, seed=seed: leaf[seed], vmapped.target_params),
                        state.target_params,
                    )
                ],
                rtol=1e-4,
                atol=1e-6,
            )
            # The discriminator compared by what it computes: the bias of a conv right before a
            # BatchNorm has a zero gradient up to rounding, which Adam scales up to ~lr steps.
            seed_state = jax.tree.map(lambda leaf, seed=seed: leaf[seed], vmapped)
            probe = jnp.asarray(cycle_batches[0][seed, 0])
            logit_maps = game.map_model.apply(source_variables, probe, train=False)
            np.testing.assert_allclose(
                game_lib.apply_discriminator_eval(game, seed_state, logit_maps),
                game_lib.apply_discriminator_eval(game, state, logit_maps),
                rtol=1e-4,
                atol=1e-5,
            )
        self.assertFalse(
            np.allclose(vmapped_metrics["disc_loss"][0], vmapped_metrics["disc_loss"][1])
        )


class PhantomSegmentationTest(absltest.TestCase):
    """The sarcoma task end to end on the phantom: source run, ADDA, reuse of a source run."""

    def test_smoke_run_and_source_checkpoint_reuse(self):
        config = adda_ct_pt.get_config("smoke")
        config.progress_bar = False
        config.data.phantom_patients = 4  # CT and PT slices in every split
        config.model.depth = 2  # a small U-Net compiles faster
        config.model.base_filters = 2
        config.data.disjoint_domains = True
        config.source.num_epochs = 1
        config.target_epochs = 0.5
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp) / "trained_source"
            results = adda_train.train_and_evaluate(config, workdir)
            source_results = json.loads((workdir / "source" / "results.json").read_text())
            self.assertEqual(source_results["modality"], "CT")
            # The source map scored by the ADDA run is the segmentation run's best state.
            np.testing.assert_allclose(
                results["source_test"]["f1"], source_results["test"]["f1"], rtol=1e-5
            )
            self.assertEqual(results["pair"], "CT->PT")
            self.assertEqual(
                set(results["criteria"]) | set(results["criteria_not_reached"]),
                set(criteria.DEFAULT),
            )
            # Every evaluation times the validators together and each one (README, cost).
            validators = [c.name for c in criteria.build(config) if hasattr(c, "measure")]
            self.assertNotEmpty(validators)
            for line in (workdir / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if "validator_seconds" not in row:
                    continue
                each = [row[f"{name}_seconds"] for name in validators]
                self.assertGreaterEqual(min(each), 0.0)
                self.assertLessEqual(sum(each), row["validator_seconds"] + 1e-6)
                self.assertLessEqual(row["validator_seconds"], row["evaluation_seconds"])
            # disjoint_domains: no patient gives training images to both domains.
            data = segmentation.SegmentationTask().load_data(config)
            source_patients = set(data.source["train"]["patient_key"])
            target_patients = set(data.target["train"]["patient_key"])
            self.assertEqual(source_patients & target_patients, set())
            self.assertNotEmpty(source_patients)
            self.assertNotEmpty(target_patients)
            self.assertEqual(results["data"]["target"]["train"], len(data.target["train"]["image"]))

            config.source_checkpoint = str(workdir / "source")
            reused_dir = pathlib.Path(tmp) / "reused_source"
            reused = adda_train.train_and_evaluate(config, reused_dir)
            self.assertFalse((reused_dir / "source").exists())
            self.assertEqual(
                reused["criteria"]["initial"]["test"], results["criteria"]["initial"]["test"]
            )
            self.assertEqual(reused["source_test"], results["source_test"])

            config.source_checkpoint = str(workdir / "source")
            config.data.source_modality = "T1"
            with self.assertRaisesRegex(ConfigError, "is a CT segmentation run"):
                adda_train.validate_config(config, segmentation.SegmentationTask())
            config.data.source_modality = "CT"
            # A map trained on other inputs is refused by name, not played (a U-Net would run
            # at another image size silently; other context channels fail deep inside jax).
            for field, value in (
                ("data.image_size", 64),
                ("data.context_slices", 1),
                ("model.base_filters", 4),
            ):
                section, name = field.split(".")
                mismatched = copy.deepcopy(config)
                mismatched[section][name] = value
                with self.assertRaisesRegex(ConfigError, f"trained with {field}="):
                    adda_train.validate_config(mismatched, segmentation.SegmentationTask())

    def test_num_seeds_trains_the_source_maps_together(self):
        config = adda_ct_pt.get_config("smoke")
        config.progress_bar = False
        config.data.phantom_patients = 4
        config.model.depth = 2
        config.model.base_filters = 2
        config.source.num_epochs = 1
        config.target_epochs = 0.5
        config.num_seeds = 2
        config.seed = 3
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp) / "seeds"
            summary = adda_train.train_and_evaluate(config, workdir)
            self.assertEqual(sorted(summary["seeds"]), ["3", "4"])
            # One vmapped segmentation run trained both source maps (segment/train.py, num_seeds).
            source_config = json.loads((workdir / "source" / "config.json").read_text())
            self.assertEqual((source_config["seed"], source_config["num_seeds"]), (3, 2))
            for seed in (3, 4):
                seed_dir = workdir / f"seed_{seed}"
                seed_config = json.loads((seed_dir / "config.json").read_text())
                self.assertEqual(seed_config["seed"], seed)
                self.assertEqual(seed_config["source"]["seed"], seed)
                self.assertEqual(
                    seed_config["source_checkpoint"], str(workdir / "source" / f"seed_{seed}")
                )
                source = json.loads(
                    (workdir / "source" / f"seed_{seed}" / "results.json").read_text()
                )
                results = json.loads((seed_dir / "results.json").read_text())
                np.testing.assert_allclose(
                    results["source_test"]["f1"], source["test"]["f1"], rtol=1e-5
                )
            self.assertNotEqual(
                summary["seeds"]["3"]["source_test"], summary["seeds"]["4"]["source_test"]
            )


class DiscriminatorEvaluationTest(absltest.TestCase):
    """SPEC §4: evaluate the discriminator in a mode that agrees with its training mode."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        config = toy_config(
            **{
                "batch_size": 8,
                "disc_optimizer.learning_rate": 1e-2,
                "discriminator_l2": 0.0,
                "discriminator.input_dropout": 0.3,
            }
        )
        task = ToyTask()
        data = task.load_data(config)
        cls.game = game_lib.create_game(config)
        source_variables = task.source_variables(config, None, data)
        state = game_lib.create_game_state(
            jax.random.PRNGKey(0),
            cls.game,
            source_variables,
            (IMAGE_SIZE, IMAGE_SIZE, 1),
            criteria.init(criteria.build(config)),
        )
        rng = np.random.default_rng(0)

        def batches(domain, count):
            images = getattr(data, domain)["train"]["image"]
            return np.stack(
                [images[rng.choice(len(images), 8, replace=False)] for _ in range(count)]
            )

        # Trained with batch statistics until it separates the domains.
        train = jax.jit(functools.partial(game_lib.run_disc_steps, cls.game))
        cls.state, step_metrics = train(
            state, source_variables, batches("source", 150), batches("target", 150)
        )
        assert step_metrics["disc_cross_entropy"][-10:].mean() < 0.2, step_metrics
        model = cls.game.map_model
        cls.inputs = [
            jnp.concatenate(
                [
                    model.apply(source_variables, source_batch, train=False),
                    model.apply(cls.state.target_variables(), target_batch, train=False),
                ]
            )
            for source_batch, target_batch in zip(
                batches("source", 5), batches("target", 5), strict=True
            )
        ]

    def _apply_training_mode(self, inputs, input_dropout, rng=None):
        discriminator = self.game.discriminator.clone(input_dropout=input_dropout)
        logits, _ = discriminator.apply(
            {"params": self.state.disc_params, "batch_stats": self.state.disc_batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
            rngs=None if rng is None else {"dropout": rng},
        )
        return logits

    def test_equals_training_mode_without_dropout(self):
        for inputs in self.inputs:
            np.testing.assert_allclose(
                game_lib.apply_discriminator_eval(self.game, self.state, inputs),
                self._apply_training_mode(inputs, input_dropout=0.0),
                rtol=1e-5,
                atol=1e-5,
            )

    def test_predictions_agree_with_training_mode_on_training_batches(self):
        agreement, running_agreement = [], []
        for inputs in self.inputs:
            # Training mode's prediction: argmax of the mean probability over dropout draws.
            draws = jax.vmap(
                lambda rng, x=inputs: jax.nn.softmax(self._apply_training_mode(x, 0.3, rng))
            )(jax.random.split(jax.random.PRNGKey(7), 128))
            training_predictions = np.argmax(np.mean(draws, axis=0), axis=-1)
            eval_logits = game_lib.apply_discriminator_eval(self.game, self.state, inputs)
            agreement.append(np.mean(np.argmax(eval_logits, -1) == training_predictions))
            running_logits = self.game.discriminator.apply(
                {"params": self.state.disc_params, "batch_stats": self.state.disc_batch_stats},
                inputs,
                train=False,
            )
            running_agreement.append(np.mean(np.argmax(running_logits, -1) == training_predictions))
        self.assertGreaterEqual(np.mean(agreement), 0.95)
        # Running averages (SPEC §4's prototype failure) agree less on the same batches.
        self.assertLess(np.mean(running_agreement), np.mean(agreement))


class MixedEvalBatchesTest(absltest.TestCase):
    def test_wraps_the_shorter_set_and_counts_each_sample_once(self):
        source = np.arange(5)[:, None]
        target = np.arange(3)[:, None] + 10
        source_batches, target_batches, source_valid, target_valid = game_lib.mixed_eval_batches(
            source, target, 2
        )
        np.testing.assert_array_equal(source_batches[..., 0], [[0, 1], [2, 3], [4, 0]])
        np.testing.assert_array_equal(target_batches[..., 0], [[10, 11], [12, 10], [11, 12]])
        np.testing.assert_array_equal(source_valid, [[1, 1], [1, 1], [1, 0]])
        np.testing.assert_array_equal(target_valid, [[1, 1], [1, 0], [0, 0]])


class ResetScheduleTest(parameterized.TestCase):
    def _resets(self, config, network, num_steps):
        """The update indices before which the network's optimizer resets."""
        game = game_lib.create_game(config)
        tx = game.disc_tx if network == "discriminator" else game.target_tx
        params = jnp.zeros([1])

        def body(state, _):
            _, state = tx.update(params, state, params)
            return state, state.reset_count

        run = jax.jit(lambda state: jax.lax.scan(body, state, None, length=num_steps)[1])
        reset_counts = np.concatenate([[0], np.asarray(run(tx.init(params)))])
        return np.flatnonzero(np.diff(reset_counts)).tolist()

    @parameterized.named_parameters(
        # CT->PT: initial 100, k_d 50: disc before every disc cycle.
        ("ct_pt_disc", adda_ct_pt, "discriminator", 260, [100, 150, 200, 250]),
        ("ct_pt_target", adda_ct_pt, "target", 100, []),
        # T2->CT: the target once >= 200 target steps since the last reset, checked per cycle.
        ("t2_ct_target", adda_t2_ct, "target", 650, [200, 400, 600]),
        ("t2_ct_disc", adda_t2_ct, "discriminator", 500, []),
        # T2->PT: no initial steps; both before every cycle (k_d 100, k_t 20).
        ("t2_pt_disc", adda_t2_pt, "discriminator", 320, [100, 200, 300]),
        ("t2_pt_target", adda_t2_pt, "target", 70, [20, 40, 60]),
    )
    def test_reset_steps_of_the_pair(self, config_module, network, num_steps, expected):
        config = config_module.get_config()
        config.scheme = "reset"
        self.assertEqual(self._resets(config, network, num_steps), expected)
        config.scheme = "adda"
        self.assertEqual(self._resets(config, network, num_steps), [])


class ConfigTest(parameterized.TestCase):
    def test_pair_table(self):
        config = adda_ct_pt.get_config()
        self.assertEqual(
            (
                config.disc_optimizer.learning_rate,
                config.disc_optimizer.b1,
                config.target_optimizer.learning_rate,
                config.target_optimizer.b1,
                config.disc_steps_per_cycle,
                config.target_steps_per_cycle,
                config.initial_disc_steps,
                config.disc_optimizer.b2,
            ),
            (2e-4, 0.7, 5e-4, 0.7, 50, 20, 100, 0.999),
        )
        t1_pair = adda.get_config("CT,T1")
        self.assertEqual(t1_pair.data.target_modality, "T1")
        self.assertEqual(t1_pair.disc_steps_per_cycle, 50)  # as CT->T2
        self.assertEqual(adda.get_config("CT,T1:smoke").data.image_size, 32)

    @parameterized.parameters("ct_pt", "ct_t2", "pt_ct", "pt_t2", "t2_ct", "t2_pt")
    def test_every_pair_config_is_valid_in_both_schemes(self, pair):
        module = importlib.import_module(f"configs.adda_{pair}")
        source, target = pair.upper().split("_")
        for arg in (None, "smoke"):
            for scheme in game_lib.SCHEMES:
                config = module.get_config(arg)
                config.scheme = scheme
                self.assertEqual(
                    (config.data.source_modality, config.data.target_modality), (source, target)
                )
                adda_train.validate_config(config, segmentation.SegmentationTask())

    def test_data_fields_are_shared_with_the_source_run(self):
        config = adda_ct_pt.get_config()
        config.data.image_size = 64
        config.seed = 3
        config.model.depth = 2
        self.assertEqual(config.source.data.image_size, 64)
        self.assertEqual(config.source.seed, 3)
        self.assertEqual(config.source.model.depth, 2)
        self.assertEqual(config.source.data.modality, "CT")

    @parameterized.named_parameters(
        ("unknown_modality", {"data.target_modality": "XR"}, "unknown domain 'XR'"),
        ("same_domains", {"data.target_modality": "ct"}, "both CT"),
        ("unknown_scheme", {"scheme": "rest"}, "config.scheme 'rest' is unknown"),
        ("missing_checkpoint", {"source_checkpoint": "/no/such/run"}, "not found: /no/such/run"),
        ("too_many_devices", {"num_devices": 1000}, "num_devices 1000"),
        ("reset_when", {"reset.target.when": "sometimes"}, "reset.target.when"),
        ("disc_norm", {"discriminator.norm": "group"}, "discriminator.norm 'group'"),
    )
    def test_bad_config_fails_before_compute(self, overrides, message):
        config = adda_ct_pt.get_config("smoke")
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        with self.assertRaisesRegex(ConfigError, message):
            adda_train.validate_config(config, segmentation.SegmentationTask())

    def test_cli_reports_a_bad_config_in_one_line(self):
        with tempfile.TemporaryDirectory() as workdir:
            process = subprocess.run(
                [
                    sys.executable,
                    "main.py",
                    "--config=configs/adda_pt_ct.py:smoke",
                    f"--workdir={workdir}",
                    "--config.data.source_modality=CT",
                ],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertNotEqual(process.returncode, 0)
            last_line = process.stderr.strip().splitlines()[-1]
            self.assertIn("both CT", last_line)
            self.assertNotIn("Traceback", process.stderr)
            self.assertEqual(os.listdir(workdir), [])

    def test_disjoint_patient_groups(self):
        source, target = segmentation._disjoint_patient_groups(
            {"a", "b", "c", "d", "s"}, {"a", "b", "c", "d", "t"}, seed=0
        )
        self.assertEqual(source & target, set())
        self.assertEqual(source | target, {"a", "b", "c", "d", "s", "t"})
        self.assertIn("s", source)
        self.assertIn("t", target)
        self.assertEqual(len(source), 3)


if __name__ == "__main__":
    absltest.main()
