"""Confusion score (thesis §12, eq. 26), the discriminator's recall and specificity, and the
rolling window of evaluations it is computed over.

Every function here is pure and jittable, and the window a small NamedTuple of arrays, so the
game can carry it in its state and checkpoint it. The stopping rule built on it is the
`confusion` criterion (sarcoma_jax/adda/criteria/confusion.py).

On eq. 26 as printed: its sum runs over k = n_s - N_s .. n_s, N_s + 1 terms divided by N_s; we
take the mean over the N_s evaluations in the window, as Algorithm 2 (§12) does. §12 also writes
specificity = fp / n; that is the false-positive rate, but |fp/n - 1/2| = |tn/n - 1/2|, so the
score is the same. Algorithm 2 starts `best_value` at +inf and keeps a score only if greater,
which would never keep one; the `confusion` criterion starts at -inf. The score lies in [0, 1]:
1 when recall and specificity are both 1/2 at every evaluation (a fully confused discriminator),
0 when both are 0 or 1.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

CONFUSION_WINDOW_SIZE = 50  # N_s, evaluations in the window (SPEC §4).
CONFUSION_STOP_DELAY = 2000  # Discriminator steps before confusion stop may select a model.

SOURCE_DOMAIN_LABEL = 1  # The discriminator labels source samples 1 ...
TARGET_DOMAIN_LABEL = 0  # ... and target samples 0.


def confusion_score(recalls: jax.Array, specificities: jax.Array) -> jax.Array:
    """Eq. 26: 1 - mean_k(|recall_k - 1/2| + |specificity_k - 1/2|), float32 scalar in [0, 1].

    Args:
      recalls: (num_evaluations,) discriminator recall at each evaluation of the window.
      specificities: (num_evaluations,) discriminator specificity at the same evaluations.
    """
    recalls = jnp.asarray(recalls, jnp.float32)
    specificities = jnp.asarray(specificities, jnp.float32)
    return 1.0 - jnp.mean(jnp.abs(recalls - 0.5) + jnp.abs(specificities - 0.5))


def discriminator_recall_specificity(
    pred_source_labels: jax.Array,
    pred_target_labels: jax.Array,
    source_valid: jax.Array | None = None,
    target_valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Recall and specificity of the discriminator over one evaluation.

    Args:
      pred_source_labels: (num_source,) predicted domain of source samples, the argmax of the
        discriminator's two logits (1 = source, 0 = target).
      pred_target_labels: (num_target,) predicted domain of target samples.
      source_valid: optional (num_source,) bool, False for padding; all valid if None.
      target_valid: optional (num_target,) bool, likewise.

    Returns:
      (recall, specificity), float32 scalars: the fraction of source samples labelled source and
      the fraction of target samples labelled target (NaN if a domain has no valid sample).
    """

    def fraction_labelled(pred_labels: jax.Array, label: int, valid: jax.Array | None) -> jax.Array:
        hits = (jnp.ravel(pred_labels) == label).astype(jnp.float32)
        weights = jnp.ones_like(hits) if valid is None else jnp.ravel(valid).astype(jnp.float32)
        return jnp.sum(hits * weights) / jnp.sum(weights)

    recall = fraction_labelled(pred_source_labels, SOURCE_DOMAIN_LABEL, source_valid)
    specificity = fraction_labelled(pred_target_labels, TARGET_DOMAIN_LABEL, target_valid)
    return recall, specificity


class ConfusionWindow(NamedTuple):
    """The last N_s evaluations' recall and specificity, oldest first.

    Attributes:
      recalls: (size,) float32; the newest evaluation is last; zeros until pushed.
      specificities: (size,) float32, likewise.
      count: evaluations pushed so far (int32 scalar, saturating); the window is full once
        count >= size.
    """

    recalls: jax.Array
    specificities: jax.Array
    count: jax.Array


def init_window(size: int = CONFUSION_WINDOW_SIZE) -> ConfusionWindow:
    """An empty window of `size` evaluations."""
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    return ConfusionWindow(
        recalls=jnp.zeros([size], jnp.float32),
        specificities=jnp.zeros([size], jnp.float32),
        count=jnp.zeros([], jnp.int32),
    )


def push(window: ConfusionWindow, recall: jax.Array, specificity: jax.Array) -> ConfusionWindow:
    """Appends one evaluation, dropping the oldest."""

    def shifted(values: jax.Array, newest: jax.Array) -> jax.Array:
        return jnp.concatenate([values[1:], jnp.reshape(newest, [1]).astype(values.dtype)])

    return ConfusionWindow(
        recalls=shifted(window.recalls, recall),
        specificities=shifted(window.specificities, specificity),
        count=optax.safe_increment(window.count),
    )


def window_is_full(window: ConfusionWindow) -> jax.Array:
    """Whether the window holds `size` evaluations (bool scalar)."""
    return window.count >= window.recalls.shape[0]


def window_score(window: ConfusionWindow) -> jax.Array:
    """The confusion score over the window; NaN until the window is full."""
    score = confusion_score(window.recalls, window.specificities)
    return jnp.where(window_is_full(window), score, jnp.nan)
