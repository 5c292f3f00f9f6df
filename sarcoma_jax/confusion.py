"""Confusion score (thesis §12, eq. 26), its rolling window, and the stopping criteria's state.

Every function here is pure and jittable, and every state a small NamedTuple of arrays, so the
ADDA loop can carry them in its train state and checkpoint them.

On eq. 26 as printed: its sum runs over k = n_s - N_s .. n_s, N_s + 1 terms divided by N_s; we
take the mean over the N_s evaluations in the window, as Algorithm 2 (§12) does. §12 also writes
specificity = fp / n; that is the false-positive rate, but |fp/n - 1/2| = |tn/n - 1/2|, so the
score is the same. Algorithm 2 starts `best_value` at +inf and keeps a score only if greater, which
would never keep one; `ConfusionStop` starts at -inf. The score lies in [0, 1]: 1 when recall and
specificity are both 1/2 at every evaluation (a fully confused discriminator), 0 when both are
0 or 1.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

CONFUSION_WINDOW_SIZE = 50  # N_s, evaluations in the window (SPEC §4).
CONFUSION_STOP_DELAY = 2000  # Discriminator steps before confusion stop may select a model.
BEST_LOSS_MIN_TARGET_STEPS = 50  # Target steps before best-loss stop may select a model.

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


def _improves(
    best_value: jax.Array, value: jax.Array, eligible: jax.Array, higher_is_better: bool
) -> jax.Array:
    """Whether `value` becomes the new best: eligible and at least as good (ties: the later)."""
    at_least_as_good = value >= best_value if higher_is_better else value <= best_value
    return jnp.asarray(eligible, bool) & at_least_as_good  # NaN compares False: never the best.


class ConfusionStop(NamedTuple):
    """Confusion stop: the evaluation with the highest window confusion score.

    Attributes:
      best_score: float32 scalar, -inf until an evaluation qualifies.
      best_step: int32 scalar, the caller's step of that evaluation, -1 until one qualifies.
    """

    best_score: jax.Array
    best_step: jax.Array


def init_confusion_stop() -> ConfusionStop:
    """Confusion stop before any evaluation."""
    return ConfusionStop(
        best_score=jnp.array(-jnp.inf, jnp.float32), best_step=jnp.array(-1, jnp.int32)
    )


def update_confusion_stop(
    state: ConfusionStop,
    disc_steps: jax.Array,
    window: ConfusionWindow,
    step: jax.Array,
    delay: int = CONFUSION_STOP_DELAY,
) -> tuple[ConfusionStop, jax.Array]:
    """Scores the window after an evaluation (push this evaluation first).

    Args:
      state: the criterion so far.
      disc_steps: discriminator steps taken so far; only evaluations with more than `delay`
        qualify.
      window: the confusion window including this evaluation; it must be full to qualify.
      step: what to record for this evaluation (e.g. target steps so far).
      delay: discriminator steps to wait (SPEC: 2000).

    Returns:
      (new state, is_new_best): on True the caller saves this evaluation's model.
    """
    score = window_score(window)
    eligible = (disc_steps > delay) & window_is_full(window)
    is_new_best = _improves(state.best_score, score, eligible, higher_is_better=True)
    return ConfusionStop(
        best_score=jnp.where(is_new_best, score, state.best_score),
        best_step=jnp.where(is_new_best, step, state.best_step).astype(jnp.int32),
    ), is_new_best


class BestLoss(NamedTuple):
    """Best-loss stop: the lowest target adversarial loss on target val.

    Attributes:
      best_loss: float32 scalar, +inf until an evaluation qualifies.
      best_step: int32 scalar, the caller's step of that evaluation, -1 until one qualifies.
    """

    best_loss: jax.Array
    best_step: jax.Array


def init_best_loss() -> BestLoss:
    """Best-loss stop before any evaluation."""
    return BestLoss(best_loss=jnp.array(jnp.inf, jnp.float32), best_step=jnp.array(-1, jnp.int32))


def update_best_loss(
    state: BestLoss,
    target_adversarial_loss: jax.Array,
    target_steps: jax.Array,
    step: jax.Array,
    min_target_steps: int = BEST_LOSS_MIN_TARGET_STEPS,
) -> tuple[BestLoss, jax.Array]:
    """Keeps the lowest loss among evaluations with >= `min_target_steps` target steps (ties: the
    later). Returns (new state, is_new_best)."""
    loss = jnp.asarray(target_adversarial_loss, jnp.float32)
    eligible = target_steps >= min_target_steps
    is_new_best = _improves(state.best_loss, loss, eligible, higher_is_better=False)
    return BestLoss(
        best_loss=jnp.where(is_new_best, loss, state.best_loss),
        best_step=jnp.where(is_new_best, step, state.best_step).astype(jnp.int32),
    ), is_new_best


class HighestPeak(NamedTuple):
    """Highest-peak stop (the oracle, uses target labels): the best target-val F1.

    Attributes:
      best_f1: float32 scalar, -inf until the first evaluation.
      best_step: int32 scalar, the caller's step of that evaluation, -1 before the first.
    """

    best_f1: jax.Array
    best_step: jax.Array


def init_highest_peak() -> HighestPeak:
    """Highest-peak stop before any evaluation."""
    return HighestPeak(best_f1=jnp.array(-jnp.inf, jnp.float32), best_step=jnp.array(-1, jnp.int32))


def update_highest_peak(
    state: HighestPeak, target_val_f1: jax.Array, step: jax.Array
) -> tuple[HighestPeak, jax.Array]:
    """Keeps the highest target-val F1 (ties: the later). Returns (new state, is_new_best)."""
    f1 = jnp.asarray(target_val_f1, jnp.float32)
    is_new_best = _improves(state.best_f1, f1, True, higher_is_better=True)
    return HighestPeak(
        best_f1=jnp.where(is_new_best, f1, state.best_f1),
        best_step=jnp.where(is_new_best, step, state.best_step).astype(jnp.int32),
    ), is_new_best
