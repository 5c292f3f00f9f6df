"""Segmentation beyond the reference (issue 18): augmentation in the train step, the losses,
2.5D context, in runs that resume and run with seeds; the `:strong` config variants, also as the
source of an ADDA run."""

import functools
import importlib
import json
import pathlib
import shutil
import sys
import tempfile

import jax
import numpy as np
import segment_train_test as reference  # tests/: the tiny index and config of the reference runs
from absl.testing import absltest, parameterized

from configs import adda, adda_base, segment_base
from data_pipeline import index_writer
from sarcoma_jax import augment, checkpoints, input_pipeline, losses
from sarcoma_jax.adda import segmentation
from sarcoma_jax.adda import train as adda_train
from sarcoma_jax.segment import steps
from sarcoma_jax.segment import train as segment_train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

_COMPILATION_CACHE = tempfile.TemporaryDirectory()


def setUpModule():
    # The runs compile the same programs again (a resumed run, a seed's single run): JAX's
    # persistent cache turns every compile after the first into a lookup.
    jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


FLIP = augment.Augmentation(flip_prob=1.0)
SOME_OF_EVERYTHING = augment.Augmentation(
    flip_prob=0.5,
    rotation_prob=0.5,
    rotation_degrees=20.0,
    scale_prob=0.5,
    scale_range=(0.8, 1.2),
    elastic_prob=0.5,
    elastic_magnitude=0.03,
    gamma_prob=0.5,
    gamma_range=(0.7, 1.5),
    noise_prob=0.5,
    noise_std=0.05,
)


# Two compiled programs of the same math agree up to float reassociation.
ASSERT_CLOSE = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)


def strong_tiny_config(index_dir: pathlib.Path):
    """The tiny reference run (segment_train_test.tiny_config) with the `:strong` options."""
    config = reference.tiny_config(index_dir)
    config.augment.enabled = True
    config.loss = "bce_dice"
    config.data.context_slices = 1
    return config


def _latest(workdir: pathlib.Path, config) -> dict:
    """The latest checkpoint's params, BatchNorm statistics, Adam state and step, as numpy."""
    size, channels = config.data.image_size, 2 * config.data.context_slices + 1
    template = steps.create_train_state(
        jax.random.PRNGKey(0),
        steps.create_model(config.model),
        (size, size, channels),
        steps.create_optimizer(config.optimizer),
    )
    manager = checkpoints.manager(workdir / "checkpoints" / "latest")
    state, _ = checkpoints.restore(manager, template)
    manager.close()
    return jax.device_get(
        {
            "params": state.params,
            "stats": state.batch_stats,
            "opt": state.opt_state,
            "step": state.step,
        }
    )


class TrainStepTest(absltest.TestCase):
    """steps.train_step with augmentation and a loss, against the plain step on prepared data."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        config = reference.tiny_config(pathlib.Path("."))
        rng = np.random.default_rng(0)
        cls.batch = {
            "image": rng.uniform(0.0, 1.0, (2, 16, 16, 3)).astype(np.float32),
            "mask": (rng.uniform(size=(2, 16, 16, 1)) > 0.7).astype(np.uint8),
        }
        cls.state = steps.create_train_state(
            jax.random.PRNGKey(3),
            steps.create_model(config.model),
            (16, 16, 3),
            steps.create_optimizer(config.optimizer),
        )
        cls.state = cls.state.replace(step=cls.state.step + 7)  # keys depend on the step

    def _step(self, batch, **options):
        state, step_metrics = jax.jit(functools.partial(steps.train_step, **options))(
            self.state, batch
        )
        return jax.device_get((state.params, state.batch_stats, step_metrics["loss"]))

    def test_flip_equals_the_step_on_the_mirrored_batch(self):
        mirrored = {key: value[:, :, ::-1] for key, value in self.batch.items()}
        got = self._step(self.batch, augmentation=FLIP)
        expected = self._step(mirrored)
        jax.tree.map(ASSERT_CLOSE, got, expected)
        self.assertNotAlmostEqual(float(got[2]), float(self._step(self.batch)[2]), places=3)

    def test_augmentation_key_comes_from_the_state_rng_and_step(self):
        key = jax.random.fold_in(
            jax.random.fold_in(self.state.rng, self.state.step), steps.AUGMENT_STREAM
        )
        images, masks = jax.jit(
            functools.partial(augment.augment_batch, augmentation=SOME_OF_EVERYTHING)
        )(key, self.batch["image"], self.batch["mask"])
        got = self._step(self.batch, augmentation=SOME_OF_EVERYTHING, loss="bce_dice")
        augmented = {"image": np.asarray(images), "mask": np.asarray(masks)}
        jax.tree.map(ASSERT_CLOSE, got, self._step(augmented, loss="bce_dice"))

    def test_the_step_minimises_the_named_loss(self):
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        logits, _ = self.state.apply_fn(
            variables, self.batch["image"], train=True, mutable=["batch_stats"]
        )
        for name in ("dice", "bce_dice"):  # 'bce', the default, in segment_train_test
            expected = np.mean(losses.per_image(name)(logits, self.batch["mask"]))
            got = float(self._step(self.batch, loss=name)[2])
            self.assertAlmostEqual(got, float(expected), delta=1e-5 * max(1.0, abs(got)), msg=name)


class StrongRunTest(absltest.TestCase):
    """A run with augmentation, bce_dice and one context slice each side, and its resumption."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="segment_strong_test_"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        reference.write_tiny_index(cls.tmp / "index")
        cls.config = strong_tiny_config(cls.tmp / "index")
        cls.full_dir = cls.tmp / "full"
        cls.full_results = segment_train.train_and_evaluate(cls.config, cls.full_dir)

    def test_outputs(self):
        for name in ("augmented_examples.png", "segmentation_examples.png", "results.json"):
            self.assertTrue((self.full_dir / name).is_file(), name)
        # Three input channels (a slice and its two neighbours) into the first convolution.
        kernel = _latest(self.full_dir, self.config)["params"]["enc0_conv0"]["kernel"]
        self.assertEqual(kernel.shape[2], 3)
        # Train and val losses are bce_dice: mean pixel BCE + (1 - soft Dice), O(1), not sums.
        rows = [json.loads(line) for line in (self.full_dir / "metrics.jsonl").open()]
        for row in rows:
            self.assertBetween(row["train_loss"], 0.0, 3.0)
            self.assertBetween(row["val_loss"], 0.0, 3.0)

    def test_resume_after_interruption_equals_uninterrupted(self):
        workdir = self.tmp / "interrupted"
        with self.assertRaises(reference.Interrupted):
            segment_train.train_and_evaluate(
                self.config, workdir, step_hook=reference._interrupt_after(9)
            )
        resumed = segment_train.train_and_evaluate(self.config, workdir)
        jax.tree.map(
            np.testing.assert_array_equal,
            _latest(self.full_dir, self.config),
            _latest(workdir, self.config),
        )
        self.assertEqual(resumed["test"], self.full_results["test"])
        self.assertEqual(
            (workdir / "metrics.jsonl").read_text(), (self.full_dir / "metrics.jsonl").read_text()
        )

    def test_augmentation_changes_the_run(self):
        config = strong_tiny_config(self.tmp / "index")
        config.augment.enabled = False
        plain = segment_train.train_and_evaluate(config, self.tmp / "not_augmented")
        self.assertNotEqual(plain["val"], self.full_results["val"])
        self.assertFalse((self.tmp / "not_augmented" / "augmented_examples.png").exists())


class StrongSeedsTest(absltest.TestCase):
    def test_each_seed_equals_its_single_run(self):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="segment_strong_seeds_test_"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        reference.write_tiny_index(tmp / "index")
        config = strong_tiny_config(tmp / "index")
        config.num_seeds = 2
        summary = segment_train.train_and_evaluate(config, tmp / "seeds")
        # Seed 1 (the second slice of the seed axis) against its single run.
        single = segment_train.train_and_evaluate(segment_train.seed_config(config, 1), tmp / "one")
        got = summary["seeds"]["1"]
        self.assertEqual(got["best_epoch"], single["best_epoch"])
        for split in ("val", "test"):
            for name, value in single[split].items():
                self.assertAlmostEqual(got[split][name], value, delta=1e-4 * max(1, abs(value)))
        for seed in (0, 1):
            self.assertTrue((tmp / "seeds" / f"seed_{seed}" / "augmented_examples.png").is_file())
        # Each seed draws its own augmentations (and init and order): the runs differ.
        self.assertNotEqual(summary["seeds"]["0"]["val"], summary["seeds"]["1"]["val"])


def write_two_modality_index(out_dir: pathlib.Path, num_patients: int = 4) -> None:
    """CT and PT series of 6 slices per patient, bright discs in slices 1-4 (PT brighter still)."""
    rng = np.random.default_rng(1)
    pixels = reference.IMAGE_PIXELS
    rows, cols = np.mgrid[:pixels, :pixels]
    with index_writer.IndexWriter(out_dir, split_scheme="patient", seed=0) as writer:
        for patient in range(num_patients):
            patient_key = f"P{patient:02d}"
            writer.add_patient(patient_key)
            for modality, contrast in (("CT", 200.0), ("PT", 5.0)):
                series_key = f"{patient_key}_{modality}"
                writer.add_series(
                    series_key=series_key,
                    patient_key=patient_key,
                    study_uid=f"1.2.{patient}",
                    series_uid=f"1.2.{patient}.{modality}",
                    modality=modality,
                    sequence=None,
                    description=modality,
                    frame_of_reference_uid=f"1.2.{patient}.0",
                    rows=pixels,
                    cols=pixels,
                    pixel_spacing=(1.0, 1.0),
                    slice_spacing=2.0,
                    orientation=(1, 0, 0, 0, 1, 0),
                    n_slices=6,
                    units="HU" if modality == "CT" else "SUV",
                )
                for slice_index in range(6):
                    mask = np.zeros((pixels, pixels), bool)
                    if 1 <= slice_index <= 4:
                        centre = rng.integers(6, pixels - 6, size=2)
                        mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 9
                    image = rng.normal(0.0, contrast / 10, mask.shape) + contrast * mask
                    writer.add_slice(
                        series_key=series_key,
                        slice_index=slice_index,
                        position_mm=2.0 * slice_index,
                        sop_instance_uid=None,
                        image=image.astype(np.float32),
                        mask=mask,
                    )


class AddaStrongSourceTest(absltest.TestCase):
    def test_adda_trains_a_strong_source_and_plays_on_its_context_channels(self):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="adda_strong_test_"))
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        write_two_modality_index(tmp / "index")
        config = adda_base.get_config("strong,smoke", "CT", "PT")
        config.data.context_slices = 1  # an option beside ':strong'
        config.data.source = "index"
        config.data.path = str(tmp / "index")
        config.data.image_size = 16
        config.model.depth = 2
        config.model.base_filters = 2
        config.source.batch_size = config.batch_size = 2
        config.source.eval_batch_size = config.eval_batch_size = 4
        config.source.num_epochs = 1
        config.discriminator.blocks = ((2,), (2,))
        config.initial_disc_steps = 1
        config.disc_steps_per_cycle = 2
        config.target_steps_per_cycle = 1
        config.target_epochs = 0.5
        config.progress_bar = False
        results = adda_train.train_and_evaluate(config, tmp / "run")
        source_config = json.loads((tmp / "run" / "source" / "config.json").read_text())
        self.assertEqual(source_config["loss"], "bce_dice")
        self.assertTrue(source_config["augment"]["enabled"])
        self.assertEqual(source_config["data"]["context_slices"], 1)
        self.assertTrue((tmp / "run" / "source" / "augmented_examples.png").is_file())
        self.assertContainsSubset({"initial", "latest"}, results["criteria"])
        # The game played the source map on the three-channel target slices.
        variables = checkpoints.restore_variables(
            checkpoints.resolve_state_dir(tmp / "run" / "source")
        )
        self.assertEqual(variables["params"]["enc0_conv0"]["kernel"].shape[2], 3)


class ConfigVariantsTest(parameterized.TestCase):
    @parameterized.parameters("ct", "pt", "t1", "t2")
    def test_strong_variant_of_every_segmentation_config(self, modality):
        module = importlib.import_module(f"configs.segment_{modality}")
        reference_config = module.get_config()
        self.assertEqual(
            (reference_config.augment.enabled, reference_config.loss),
            (False, "bce"),
        )
        self.assertEqual(reference_config.data.context_slices, 0)
        strong = module.get_config("strong")
        self.assertEqual(
            (
                strong.augment.enabled,
                strong.loss,
                strong.data.context_slices,
                strong.data.image_size,
            ),
            (True, "bce_dice", 0, 128),
        )
        self.assertEqual(strong.data.modality, reference_config.data.modality)
        segment_train.validate_config(strong)
        for arg in ("strong,smoke", "smoke, strong"):
            both = module.get_config(arg)
            self.assertEqual(
                (both.loss, both.data.image_size, both.num_epochs), ("bce_dice", 32, 2)
            )
        with self.assertRaisesRegex(ValueError, "unknown config variant 'strng'"):
            module.get_config("strng,smoke")

    def test_adda_source_takes_the_variant(self):
        config = adda.get_config("CT,T1:strong")
        self.assertEqual((config.source.loss, config.source.augment.enabled), ("bce_dice", True))
        self.assertEqual(config.data.context_slices, 0)
        config.data.context_slices = 2  # shared with the source run, as every data field
        self.assertEqual(config.source.data.context_slices, 2)
        smoke = adda.get_config("PT,CT:strong,smoke")
        self.assertEqual((smoke.source.loss, smoke.data.image_size), ("bce_dice", 32))
        self.assertEqual(adda.get_config("PT,CT:smoke").source.loss, "bce")
        for pair in ("ct_pt", "pt_t2", "t2_ct"):
            module = importlib.import_module(f"configs.adda_{pair}")
            adda_train.validate_config(module.get_config("strong"), segmentation.SegmentationTask())

    def test_bad_options_are_config_errors(self):
        config = segment_base.get_config("strong")
        config.loss = "focal"
        with self.assertRaisesRegex(input_pipeline.ConfigError, "config.loss 'focal' is unknown"):
            segment_train.validate_config(config)
        config = segment_base.get_config("strong")
        config.augment.rotation_prob = 2.0
        with self.assertRaisesRegex(input_pipeline.ConfigError, "config.augment.rotation_prob"):
            segment_train.validate_config(config)
        config = segment_base.get_config()
        config.augment.rotation_prob = 2.0  # checked even when off, so a later switch-on runs
        with self.assertRaisesRegex(input_pipeline.ConfigError, "config.augment.rotation_prob"):
            segment_train.validate_config(config)


if __name__ == "__main__":
    absltest.main()
