"""Tests for sarcoma_jax.adda.criteria: each criterion's rule on hand-made rows, the registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from configs import adda_ct_pt
from sarcoma_jax.adda import criteria
from sarcoma_jax.adda.criteria import base, best_loss, confusion, highest_peak, initial, latest
from sarcoma_jax.input_pipeline import ConfigError


def row(step, before_da=False, **values):
    """An evaluation row as the loop passes it (jax scalars); `values` override the defaults."""
    defaults = {
        "step": step,
        "disc_steps": step,
        "target_steps": 0,
        "before_da": before_da,
        "recall": 0.5,
        "specificity": 0.5,
        "soft_recall": 0.5,
        "soft_specificity": 0.5,
        "disc_loss": 0.7,
        "target_adversarial_loss": 0.7,
        "target_val_metric": 0.3,
    }
    defaults.update(values)
    return {
        "step": jnp.int32(defaults["step"]),
        "disc_steps": jnp.int32(defaults["disc_steps"]),
        "target_steps": jnp.int32(defaults["target_steps"]),
        "before_da": jnp.bool_(defaults["before_da"]),
        **{
            key: jnp.float32(value)
            for key, value in defaults.items()
            if key not in ("step", "disc_steps", "target_steps", "before_da")
        },
    }


def run(criterion, rows):
    """Every row through `criterion` (jit-compiled); returns the final state, the is_best flags
    and the scores."""
    update = jax.jit(criterion.update)
    state, flags, scores = criterion.init(), [], []
    for one_row in rows:
        state, selection = update(state, one_row)
        flags.append(bool(selection.is_best))
        scores.append(float(selection.score))
    return state, flags, scores


@dataclasses.dataclass(frozen=True)
class LowestDiscLoss:
    """A criterion defined in a test file alone: the evaluation with the lowest discriminator
    cross-entropy after the start. Used by adda_train_test through config.criteria."""

    name: str = "lowest_disc_loss"
    label: str = "lowest discriminator loss"
    oracle: bool = False

    @classmethod
    def from_config(cls, config):
        del config
        return cls()

    def init(self):
        return base.init_best()

    def measure(self, probe):
        """Checks what a label-free criterion may see: target val images, no target labels."""
        for name, value in vars(probe).items():
            if name != "source_val":  # labelled source data is allowed
                assert not (isinstance(value, dict) and "mask" in value), name
        assert isinstance(probe.target_val_images, np.ndarray)
        assert not any(key.startswith("target_val") for key in probe.evaluation)
        return {"lowest_disc_loss_checked": 1.0}

    def update(self, state, evaluation):
        assert "target_val_metric" not in evaluation, "a label-free criterion saw target labels"
        assert "lowest_disc_loss_checked" in evaluation  # its measured column reaches it
        score = -evaluation["disc_loss"]
        state, is_best = base.keep_best(state, score, ~evaluation["before_da"], evaluation["step"])
        return state, base.Selection(is_best, score)


class ConfusionStopTest(absltest.TestCase):
    def test_waits_for_delay_and_full_window(self):
        criterion = confusion.ConfusionStop(window_size=2, delay=2000)
        rows = [
            row(0, before_da=True, recall=1.0, specificity=1.0),  # never enters the window
            row(1000),  # window 1 of 2: not full
            row(2000),  # full, but needs more than 2000 discriminator steps
            row(2001),
        ]
        state, flags, scores = run(criterion, rows)
        self.assertEqual(flags, [False, False, False, True])
        self.assertTrue(np.isnan(scores[0]) and np.isnan(scores[1]))
        self.assertAlmostEqual(scores[3], 1.0)
        self.assertEqual(int(state.best.step), 2001)
        self.assertEqual(int(state.window.count), 3)  # the before-DA row was not pushed

    def test_keeps_highest_and_ties_go_to_the_later(self):
        criterion = confusion.ConfusionStop(window_size=2, delay=0)
        # Windows: (1.0, 0.5)/(0.5, 0.0) -> 0.5; (0.75, 0.5)/(0.5, 0.75) -> 0.75; all 1 -> 0.0;
        # (0.5, 0.5)/(0.25, 0.75) -> 0.75, a tie: the later wins.
        recalls = [1.0, 0.5, 0.75, 0.5, 1.0, 1.0, 0.5, 0.5]
        specificities = [0.5, 0.0, 0.5, 0.75, 1.0, 1.0, 0.25, 0.75]
        rows = [
            row(step + 1, recall=r, specificity=s)
            for step, (r, s) in enumerate(zip(recalls, specificities, strict=True))
        ]
        state, flags, scores = run(criterion, rows)
        np.testing.assert_allclose(scores[1::2], [0.5, 0.75, 0.0, 0.75])
        self.assertEqual(flags[1::2], [True, True, False, True])
        self.assertEqual(int(state.best.step), 8)


class OtherCriteriaTest(absltest.TestCase):
    def test_best_loss_after_min_target_steps_ties_later(self):
        evaluations = [  # (target adversarial loss, target steps)
            (0.01, 40),  # Too early: ignored although lowest.
            (0.7, 50),
            (0.9, 70),
            (0.3, 90),
            (0.3, 110),  # Tie: the later wins.
            (float("nan"), 130),  # Never the best.
        ]
        rows = [
            row(step + 1, target_adversarial_loss=loss, target_steps=target_steps)
            for step, (loss, target_steps) in enumerate(evaluations)
        ]
        state, flags, scores = run(best_loss.BestLoss(min_target_steps=50), rows)
        self.assertEqual(flags, [False, True, False, True, True, False])
        self.assertEqual(int(state.step), 5)
        self.assertAlmostEqual(scores[3], -0.3, places=6)  # higher is better: the negative loss

    def test_highest_peak_ties_later_and_never_picks_the_source_map(self):
        f1s = [0.9, 0.2, 0.1, 0.4, 0.4, 0.3]
        rows = [row(step, before_da=step == 0, target_val_metric=f1) for step, f1 in enumerate(f1s)]
        state, flags, _ = run(highest_peak.HighestPeak(), rows)
        self.assertEqual(flags, [False, True, False, True, True, False])
        self.assertEqual(int(state.step), 4)

    def test_initial_is_the_before_da_evaluation_and_latest_the_last(self):
        rows = [row(0, before_da=True), row(4), row(10), row(16)]
        _, initial_flags, _ = run(initial.Initial(), rows)
        latest_state, latest_flags, latest_scores = run(latest.Latest(), rows)
        self.assertEqual(initial_flags, [True, False, False, False])
        self.assertEqual(latest_flags, [False, True, True, True])
        self.assertEqual(int(latest_state.step), 16)
        self.assertEqual(latest_scores, [0.0, 4.0, 10.0, 16.0])


class RegistryTest(absltest.TestCase):
    def test_default_is_the_thesis_five_and_the_validators(self):
        config = adda_ct_pt.get_config("smoke")
        built = criteria.build(config)
        self.assertEqual(
            [c.name for c in built][:5],
            ["initial", "highest_peak", "confusion", "latest", "best_loss"],
        )
        self.assertEqual(list(criteria.THESIS_CRITERIA), [c.name for c in built][:5])
        self.assertEqual(
            {c.name for c in built[5:]},
            {"soft_confusion", "entropy", "im", "snd", "dev", "consistency", "source_val"},
        )
        self.assertEqual([c.name for c in built if c.oracle], ["highest_peak"])
        confusion_stop = built[2]
        self.assertEqual(
            (confusion_stop.window_size, confusion_stop.delay),
            (config.confusion_window, config.confusion_delay),
        )
        self.assertIn(criteria.BEFORE_DA, criteria.REGISTRY)
        self.assertIn(criteria.RECOMMENDED, criteria.REGISTRY)

    def test_import_path_and_bad_names(self):
        config = adda_ct_pt.get_config("smoke")
        config.criteria = ("latest", "criteria_test:LowestDiscLoss")
        self.assertEqual([c.name for c in criteria.build(config)], ["latest", "lowest_disc_loss"])
        for names, message in (
            (("no_such",), "unknown"),
            (("no_module:Thing",), "cannot be imported"),
            (("latest", "latest"), "more than once"),
        ):
            config.criteria = names
            with self.assertRaisesRegex(ConfigError, message):
                criteria.build(config)

    def test_only_oracles_receive_target_labels(self):
        seen = {}

        @dataclasses.dataclass(frozen=True)
        class Spy:
            name: str
            oracle: bool
            label: str = "spy"

            def init(self):
                return base.init_best()

            def update(self, state, evaluation):
                seen[self.name] = set(evaluation)
                return state, base.Selection(jnp.bool_(False), jnp.float32(0.0))

        spies = [Spy("blind", oracle=False), Spy("oracle", oracle=True)]
        jax.jit(lambda states, r: criteria.update(spies, states, r))(criteria.init(spies), row(3))
        self.assertNotIn("target_val_metric", seen["blind"])
        self.assertEqual(seen["blind"], set(row(3)) - set(criteria.LABEL_COLUMNS))
        self.assertIn("target_val_metric", seen["oracle"])


if __name__ == "__main__":
    absltest.main()
