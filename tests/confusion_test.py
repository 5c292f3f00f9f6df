"""Tests for sarcoma_jax.confusion: eq. 26, recall and specificity, the rolling window."""

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


if __name__ == "__main__":
    absltest.main()
