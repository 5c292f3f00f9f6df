"""Tests for sarcoma_jax.losses against values computed by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from sarcoma_jax import losses

# One 2x2 image: logits and truth.
LOGITS = np.array([[0.0, 2.0], [-1.0, 0.0]], np.float32).reshape(1, 2, 2, 1)
MASK = np.array([[1, 0], [0, 1]], np.uint8).reshape(1, 2, 2, 1)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# By hand: BCE of a pixel is log(1 + e^-x) where the truth is 1 and log(1 + e^x) where it is 0.
HAND_BCE_SUM = math.log(2) + math.log(1 + math.e**2) + math.log(1 + math.e**-1) + math.log(2)
# Soft Dice: p = sigmoid(logits) = (1/2, s(2), s(-1), 1/2); sum(p t) = 1, sum(t) = 2.
_SUM_P = 0.5 + _sigmoid(2.0) + _sigmoid(-1.0) + 0.5
HAND_DICE_LOSS = 1 - (2 * 1.0 + losses.DICE_SMOOTH) / (_SUM_P + 2.0 + losses.DICE_SMOOTH)


class LossesTest(absltest.TestCase):
    def test_bce_is_summed_over_pixels(self):
        self.assertAlmostEqual(HAND_BCE_SUM, 3.8264841, places=6)  # the figures, once, by hand
        got = losses.per_image("bce")(jnp.asarray(LOGITS), jnp.asarray(MASK))
        self.assertEqual(got.shape, (1,))
        self.assertAlmostEqual(float(got[0]), HAND_BCE_SUM, places=5)

    def test_dice_is_one_minus_soft_dice(self):
        self.assertAlmostEqual(HAND_DICE_LOSS, 0.5180407, places=6)
        got = losses.per_image("dice")(jnp.asarray(LOGITS), jnp.asarray(MASK))
        self.assertAlmostEqual(float(got[0]), HAND_DICE_LOSS, places=6)

    def test_bce_dice_is_mean_pixel_bce_plus_dice(self):
        got = losses.per_image("bce_dice")(jnp.asarray(LOGITS), jnp.asarray(MASK))
        self.assertAlmostEqual(float(got[0]), HAND_BCE_SUM / 4 + HAND_DICE_LOSS, places=6)

    def test_one_value_per_image(self):
        # Image 2: empty truth, confidently empty prediction: Dice 1 (loss ~0), as F1 counts it.
        logits = np.concatenate([LOGITS, np.full_like(LOGITS, -30.0)])
        masks = np.concatenate([MASK, np.zeros_like(MASK)])
        for name in losses.LOSSES:
            got = np.asarray(losses.per_image(name)(jnp.asarray(logits), jnp.asarray(masks)))
            self.assertEqual(got.shape, (2,), name)
            single = losses.per_image(name)(jnp.asarray(LOGITS), jnp.asarray(MASK))
            self.assertAlmostEqual(got[0], float(single[0]), places=6, msg=name)
            self.assertLess(got[1], 1e-6, name)

    def test_perfect_prediction_has_dice_loss_near_zero_and_gradients_are_finite(self):
        masks = jnp.asarray(MASK)
        confident = jnp.where(masks > 0, 30.0, -30.0)
        self.assertLess(float(losses.per_image("dice")(confident, masks)[0]), 1e-6)
        for name in losses.LOSSES:
            grad = jax.grad(lambda x, n=name: losses.per_image(n)(x, masks).sum())(
                jnp.asarray(LOGITS)
            )
            self.assertTrue(np.all(np.isfinite(grad)), name)
            # Raising a tumour pixel's logit lowers every loss.
            self.assertLess(float(grad[0, 0, 0, 0]), 0.0, name)

    def test_unknown_name(self):
        with self.assertRaisesRegex(ValueError, "unknown loss 'focal'; use one of bce, dice"):
            losses.per_image("focal")


if __name__ == "__main__":
    absltest.main()
