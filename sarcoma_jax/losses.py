"""Segmentation losses per image (`config.loss`): the reference pixel BCE, soft Dice, and both.

Each maps logits and masks (batch, h, w, 1) to one loss per image (batch,); the training loss is
their mean over the batch, and evaluation reports the same per-image losses, so train and val
losses in metrics.jsonl are one quantity.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Added to numerator and denominator of the soft Dice, as nnU-Net's SoftDiceLoss (smooth=1e-5):
# an image with empty truth and an empty prediction scores Dice 1 (loss 0), as the F1 metric does,
# and the value is well defined; small enough not to bias the Dice of a small tumour.
DICE_SMOOTH = 1e-5


def pixel_bce_per_image(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Sigmoid binary cross-entropy summed over pixels: (batch, h, w, 1) -> (batch,)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype))
    return losses.reshape(losses.shape[0], -1).sum(axis=1)


def soft_dice_loss_per_image(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """1 - soft Dice of each image: 1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), p = sigmoid."""
    probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    truth = masks.astype(jnp.float32).reshape(masks.shape[0], -1)
    overlap = (probs * truth).sum(axis=1)
    dice = (2.0 * overlap + DICE_SMOOTH) / (probs.sum(axis=1) + truth.sum(axis=1) + DICE_SMOOTH)
    return 1.0 - dice


def bce_dice_per_image(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """nnU-Net's default: pixel BCE *averaged* over pixels plus the soft Dice loss.

    The mean, not the reference's sum, so that both terms are O(1) and weigh alike at any image
    size (summed, the BCE of a 128x128 image is ~10^3 times the Dice term, which would vanish).
    """
    num_pixels = logits.size // logits.shape[0]
    return pixel_bce_per_image(logits, masks) / num_pixels + soft_dice_loss_per_image(logits, masks)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "bce": pixel_bce_per_image,  # the reference (thesis §14.2)
    "dice": soft_dice_loss_per_image,
    "bce_dice": bce_dice_per_image,
}

LABELS = {
    "bce": "BCE summed over pixels",
    "dice": "1 - soft Dice",
    "bce_dice": "mean pixel BCE + 1 - soft Dice",
}


def per_image(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-image loss called `name` (a key of LOSSES); ValueError for another name."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
    return LOSSES[name]
