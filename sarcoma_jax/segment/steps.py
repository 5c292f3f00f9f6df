"""Supervised segmentation's pure parts (thesis §14.2): the model, its state, the jit-compiled
steps, BatchNorm re-estimation and evaluation of a split.

Read top to bottom as the flax examples: `create_model`, `create_train_state`, `train_step`
(optionally augmenting the batch, sarcoma_jax/augment.py; the loss from sarcoma_jax/losses.py),
`eval_step`, then what evaluation needs around them. The loop is segment/train.py.
"""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
from flax.training import train_state

from data_pipeline import loader
from sarcoma_jax import augment, losses, metrics, models, runtime

# fold_in(step key, AUGMENT_STREAM) keys a step's augmentation; the step key itself keys dropout.
AUGMENT_STREAM = 1


class TrainState(train_state.TrainState):
    """Params, Adam state and step (from flax), plus BatchNorm statistics and a base PRNG key.

    The key for step s is fold_in(rng, s), so no key needs to be carried from step to step.
    """

    batch_stats: Any
    rng: jax.Array  # uint32 (2,)


def create_model(model_config: Mapping[str, Any]) -> nn.Module:
    """The segmenter that `config.model` describes (see models.create)."""
    return models.create(model_config)


def create_optimizer(optimizer_config: Mapping[str, Any]) -> optax.GradientTransformation:
    """Adam with the modality's learning rate and betas (SPEC §4 'Source')."""
    return optax.adam(
        learning_rate=optimizer_config["learning_rate"],
        b1=optimizer_config["b1"],
        b2=optimizer_config["b2"],
        eps=optimizer_config["eps"],
    )


def _state_initializer(
    model: nn.Module, image_shape: tuple[int, int, int], optimizer: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        state = TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=optimizer,
            batch_stats=variables.get("batch_stats", {}),
            rng=state_rng,
        )
        # A strongly typed step, as a restored checkpoint has, so resuming does not recompile.
        return state.replace(step=jnp.zeros((), jnp.int32))

    return init


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """Initialises params, BatchNorm statistics and optimizer state for `image_shape` (h, w, c).

    With a stack of keys (seeds, 2), every leaf gets a leading seed axis; random numbers do not
    depend on vmap, so seed i's slice equals create_train_state(rngs[i]).
    """
    init = _state_initializer(model, image_shape, optimizer)
    if rng.ndim == 2:
        init = jax.vmap(init)
    # One jit-compiled init (eager init compiles every initializer for every shape), without XLA's
    # optimisation passes: it runs once, and they make compiling the RNG code ~10x slower.
    return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(rng)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    loss: str = "bce",
    augmentation: augment.Augmentation | None = None,
) -> tuple[TrainState, dict]:
    """One Adam step on the mean over the batch of a per-image loss (losses.LOSSES).

    Args:
      state: the train state.
      batch: image and mask.
      loss: the name of the per-image loss; 'bce' is the reference (pixel BCE summed over pixels).
      augmentation: when given, the batch is augmented first, with a key drawn from the state's
        rng and step (so a resumed run draws the same), apart from dropout's.
    """
    step_rng = jax.random.fold_in(state.rng, state.step)
    images, masks = batch["image"], batch["mask"]
    if augmentation is not None:
        images, masks = augment.augment_batch(
            jax.random.fold_in(step_rng, AUGMENT_STREAM), images, masks, augmentation
        )
    loss_per_image = losses.per_image(loss)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": step_rng},
        )
        return loss_per_image(logits, masks).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    batch_stats_at_eval: bool = False,
    loss: str = "bce",
) -> dict[str, jax.Array]:
    """Logits (batch, h, w, 1) and per-image loss (batch,) in evaluation mode.

    Args:
      state: the train state.
      batch: image and mask.
      batch_stats_at_eval: normalise with the batch's own statistics (the reference code's
        behaviour; the model must be built with eval_batch_stats=True). The default uses the
        running averages.
      loss: the per-image loss to report (as trained with; losses.LOSSES).
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if batch_stats_at_eval:
        logits, _ = state.apply_fn(variables, batch["image"], train=False, mutable=["batch_stats"])
    else:
        logits = state.apply_fn(variables, batch["image"], train=False)
    return {"logits": logits, "loss_per_image": losses.per_image(loss)(logits, batch["mask"])}


def batch_stats_step(
    state: TrainState, batch: Mapping[str, jax.Array], stats_apply_fn: Callable
) -> Any:
    """The BatchNorm statistics (mean, var per layer) of one batch in training mode.

    Args:
      state: the train state.
      batch: a training batch.
      stats_apply_fn: `apply` of a clone of the model with bn_momentum=0, so that the "running"
        statistics it writes are this batch's own.
    """
    _, updates = stats_apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": state.rng},
    )
    return updates["batch_stats"]


def recalibrate_batch_stats(
    stats_fn: Callable,
    state: TrainState,
    train_data: Mapping[str, np.ndarray],
    batch_size: int,
    num_batches: int,
    seed: int,
) -> TrainState:
    """Replaces BatchNorm's running averages by the mean statistics of fresh training batches.

    "Precise BN" (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): the exponential moving
    averages kept during training trail the weights (time constant 1 / (1 - 0.99) = 100 steps),
    and while the weights still move fast, evaluation with them can disagree completely with
    training mode (on the phantom PET: F1 0.00 with the moving averages, 0.87 after this). The
    result is still one fixed normalisation per layer, independent of the evaluated batch.

    Args:
      stats_fn: `batch_stats_step` with its stats_apply_fn bound (and jit-compiled).
      state: the state whose statistics to re-estimate.
      train_data: the training arrays.
      batch_size: the training batch size (batch statistics depend on it).
      num_batches: batches to average; 0 returns the state unchanged.
      seed: shuffle seed; the same batches every time, so runs stay deterministic.

    Returns:
      The state with the averaged per-batch means and variances as batch_stats.
    """
    if num_batches == 0:
        return state
    batches = loader.train_batches(train_data, batch_size, seed=seed, num_threads=0)
    totals = None
    for _ in range(num_batches):
        batch_stats = stats_fn(state, next(batches))
        totals = batch_stats if totals is None else jax.tree.map(jnp.add, totals, batch_stats)
    return state.replace(batch_stats=jax.tree.map(lambda total: total / num_batches, totals))


def evaluate(
    eval_fn: Callable, state: TrainState, arrays: Mapping[str, np.ndarray], batch_size: int
) -> tuple[dict[str, float], np.ndarray]:
    """SPEC §4's metrics of a split (from the logits: a pixel is tumour where its logit >= 0, i.e.
    p >= 0.5; AUC ranks the logits) plus its mean loss; also returns the logits (n, h, w, 1)."""
    outputs = runtime.predict(
        eval_fn, state, {"image": arrays["image"], "mask": arrays["mask"]}, batch_size
    )
    split_metrics = metrics.segmentation_metrics(outputs["logits"], arrays["mask"], threshold=0.0)
    split_metrics["loss"] = float(np.mean(outputs["loss_per_image"]))
    return split_metrics, outputs["logits"]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Tumour probabilities from logits, in float64 (no float32 rounding to 0 or 1)."""
    return scipy.special.expit(np.asarray(logits, np.float64))
