"""Tests for sarcoma_jax.confusion: eq. 26, the rolling window and the stopping criteria's state."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from sarcoma_jax import confusion


def _window_of(recalls, specificities):
    window = confusion.init_window(len(recalls))
    for recall, specificity in zip(recalls, specificities, strict=True):
        window = confusion.push(window, recall, specificity)
    return window


class ConfusionScoreTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("example", [1.0, 0.5], [0.5, 0.0], 0.5),  # 1 - mean(0.5 + 0, 0 + 0.5)
        ("fully_confused", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 1.0),
        ("perfect_discriminator", [1.0, 1.0], [1.0, 1.0], 0.0),
        ("all_labelled_source", [1.0], [0.0], 0.0),
        ("one_evaluation", [0.75], [0.4], 0.65),  # 1 - (0.25 + 0.1)
    )
    def test_hand_computed(self, recalls, specificities, expected):
        score = confusion.confusion_score(jnp.array(recalls), jnp.array(specificities))
        self.assertAlmostEqual(float(score), expected, places=6)

    def test_matches_float64_numpy_under_jit(self):
        rng = np.random.default_rng(0)
        recalls, specificities = rng.uniform(size=50), rng.uniform(size=50)
        expected = 1 - np.mean(np.abs(recalls - 0.5) + np.abs(specificities - 0.5))
        score = jax.jit(confusion.confusion_score)(recalls, specificities)
        np.testing.assert_allclose(score, expected, rtol=1e-6)

    def test_false_positive_rate_gives_the_same_score(self):
        """§12 writes specificity = fp/n; |fp/n - 1/2| = |tn/n - 1/2| makes that immaterial."""
        recalls, specificities = jnp.array([0.9, 0.3]), jnp.array([0.2, 0.65])
        np.testing.assert_allclose(
            confusion.confusion_score(recalls, 1.0 - specificities),
            confusion.confusion_score(recalls, specificities),
            rtol=1e-6,
        )


class RecallSpecificityTest(absltest.TestCase):
    def test_hand_computed(self):
        recall, specificity = confusion.discriminator_recall_specificity(
            jnp.array([1, 1, 0, 1]), jnp.array([0, 1])
        )
        self.assertAlmostEqual(float(recall), 0.75)  # 3 of 4 source samples labelled source.
        self.assertAlmostEqual(float(specificity), 0.5)  # 1 of 2 target samples labelled target.

    def test_from_logits_with_padding_under_jit(self):
        source_logits = jnp.array([[0.0, 2.0], [3.0, 1.0], [0.0, 1.0], [9.0, 0.0]])
        target_logits = jnp.array([[2.0, 0.0], [2.0, 0.0], [0.0, 5.0]])

        @jax.jit
        def evaluate(source_logits, target_logits):
            return confusion.discriminator_recall_specificity(
                jnp.argmax(source_logits, axis=-1),
                jnp.argmax(target_logits, axis=-1),
                source_valid=jnp.array([True, True, True, False]),  # Last row is padding.
                target_valid=jnp.array([True, True, True]),
            )

        recall, specificity = evaluate(source_logits, target_logits)
        self.assertAlmostEqual(float(recall), 2 / 3, places=6)
        self.assertAlmostEqual(float(specificity), 2 / 3, places=6)


class WindowTest(absltest.TestCase):
    def test_rolls_over_oldest_first(self):
        window = _window_of([0.1, 0.2, 0.3], [0.9, 0.8, 0.7])
        window = jax.jit(confusion.push)(window, 0.4, 0.6)
        window = jax.jit(confusion.push)(window, 0.5, 0.5)
        np.testing.assert_allclose(window.recalls, [0.3, 0.4, 0.5], rtol=1e-6)
        np.testing.assert_allclose(window.specificities, [0.7, 0.6, 0.5], rtol=1e-6)
        self.assertEqual(int(window.count), 5)
        # 1 - mean(0.2 + 0.2, 0.1 + 0.1, 0 + 0), by hand.
        self.assertAlmostEqual(float(confusion.window_score(window)), 0.8, places=6)

    def test_score_is_nan_until_full(self):
        window = confusion.init_window(3)
        for _ in range(2):
            window = confusion.push(window, 0.5, 0.5)
            self.assertFalse(bool(confusion.window_is_full(window)))
            self.assertTrue(np.isnan(float(jax.jit(confusion.window_score)(window))))
        window = confusion.push(window, 0.5, 0.5)
        self.assertTrue(bool(confusion.window_is_full(window)))
        self.assertAlmostEqual(float(confusion.window_score(window)), 1.0)

    def test_default_size_and_dtypes(self):
        window = confusion.init_window()
        self.assertEqual(window.recalls.shape, (50,))
        self.assertEqual(window.recalls.dtype, jnp.float32)
        self.assertEqual(window.count.dtype, jnp.int32)


class ConfusionStopTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.update = jax.jit(confusion.update_confusion_stop, static_argnames="delay")

    def test_waits_for_delay_and_full_window(self):
        full = _window_of([0.5, 0.5], [0.5, 0.5])
        state = confusion.init_confusion_stop()
        state, is_new_best = self.update(state, 2000, full, 7)  # Needs more than 2000 steps.
        self.assertFalse(bool(is_new_best))
        self.assertEqual(int(state.best_step), -1)
        not_full = confusion.push(confusion.init_window(2), 0.5, 0.5)
        state, is_new_best = self.update(state, 5000, not_full, 8)
        self.assertFalse(bool(is_new_best))
        state, is_new_best = self.update(state, 2001, full, 9)
        self.assertTrue(bool(is_new_best))
        self.assertEqual(int(state.best_step), 9)
        self.assertAlmostEqual(float(state.best_score), 1.0)

    def test_keeps_highest_and_ties_go_to_the_later(self):
        state = confusion.init_confusion_stop()
        windows = [
            _window_of([1.0, 0.5], [0.5, 0.0]),  # 0.5
            _window_of([0.75, 0.5], [0.5, 0.75]),  # 0.75
            _window_of([1.0, 1.0], [1.0, 1.0]),  # 0.0
            _window_of([0.5, 0.5], [0.25, 0.75]),  # 0.75, a tie: the later wins.
        ]
        new_best_flags = []
        for step, window in enumerate(windows):
            state, is_new_best = self.update(state, 3000, window, step, delay=2000)
            new_best_flags.append(bool(is_new_best))
        self.assertEqual(new_best_flags, [True, True, False, True])
        self.assertEqual(int(state.best_step), 3)
        self.assertAlmostEqual(float(state.best_score), 0.75)

    def test_custom_delay(self):
        state = confusion.init_confusion_stop()
        state, is_new_best = self.update(state, 11, _window_of([0.5], [0.5]), 1, delay=10)
        self.assertTrue(bool(is_new_best))


class OtherCriteriaTest(absltest.TestCase):
    def test_best_loss_after_min_target_steps_ties_later(self):
        update = jax.jit(confusion.update_best_loss)
        state = confusion.init_best_loss()
        evaluations = [  # (target adversarial loss, target steps)
            (0.01, 40),  # Too early: ignored although lowest.
            (0.7, 50),
            (0.9, 70),
            (0.3, 90),
            (0.3, 110),  # Tie: the later wins.
            (float("nan"), 130),  # Never the best.
        ]
        flags = []
        for step, (loss, target_steps) in enumerate(evaluations):
            state, is_new_best = update(state, loss, target_steps, step)
            flags.append(bool(is_new_best))
        self.assertEqual(flags, [False, True, False, True, True, False])
        self.assertEqual(int(state.best_step), 4)
        self.assertAlmostEqual(float(state.best_loss), 0.3, places=6)

    def test_highest_peak_ties_later(self):
        update = jax.jit(confusion.update_highest_peak)
        state = confusion.init_highest_peak()
        flags = []
        for step, f1 in enumerate([0.2, 0.1, 0.4, 0.4, 0.3]):
            state, is_new_best = update(state, f1, step)
            flags.append(bool(is_new_best))
        self.assertEqual(flags, [True, False, True, True, False])
        self.assertEqual(int(state.best_step), 3)
        self.assertAlmostEqual(float(state.best_f1), 0.4, places=6)


if __name__ == "__main__":
    absltest.main()
