"""The source-only classifier (§10.1 step 1): LeNet trained on the source digits."""

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from sarcoma_jax import models
from sarcoma_jax.digits.data import IMAGE_SIDE, Domain, LabelledImages

# LeNet trained on the source, kept at its best source-val accuracy; evaluated on the target it
# gives the "before DA" accuracy.


class ClassifierState(NamedTuple):
    """Explicit training state: LeNet params, Adam state, step count and a base PRNG key.

    The dropout key of step s is fold_in(rng, s), so no key is carried from step to step.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar
    rng: jax.Array  # uint32 (2,)


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (batch, 10) logits against (batch,) int labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def create_classifier_optimizer(
    learning_rate: float = 2e-4, b1: float = 0.5, b2: float = 0.999
) -> optax.GradientTransformation:
    """Adam of SPEC §4 for SVHN->MNIST: 2e-4, betas (0.5, 0.999)."""
    return optax.adam(learning_rate, b1=b1, b2=b2)


def init_params(rng: jax.Array, model: nn.Module) -> Any:
    return model.init(rng, jnp.zeros((1, IMAGE_SIDE, IMAGE_SIDE, 1)), train=False)["params"]


@functools.partial(jax.jit, static_argnames=("model", "optimizer"))
def init_classifier(
    rng: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation
) -> ClassifierState:
    """LeNet params for (batch, 28, 28, 1) images and a fresh optimizer state (compiled: flax's
    init op by op is slow)."""
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(init_rng, model)
    return ClassifierState(params, optimizer.init(params), jnp.zeros((), jnp.int32), state_rng)


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "weight_decay"))
def classifier_train_step(
    state: ClassifierState,
    images: jax.Array,
    labels: jax.Array,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    weight_decay: float,
) -> tuple[ClassifierState, jax.Array]:
    """One Adam step on cross-entropy + weight_decay * sum of squared kernels (Keras' l2).

    Args:
      state: the classifier state.
      images: (batch, 28, 28, 1) float32.
      labels: (batch,) int32.
      model: the LeNet module (static).
      optimizer: the optax transformation (static).
      weight_decay: the L2 weight on kernels (1e-3 in SPEC §4).

    Returns:
      The new state and the batch's total loss.
    """
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
        return classification_loss(logits, labels) + weight_decay * models.kernel_l2_penalty(params)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ClassifierState(params, opt_state, state.step + 1, state.rng), loss


def accuracy_of_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of (n, 10) logits whose argmax is the (n,) label."""
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(params: Any, images: jax.Array, model: nn.Module) -> jax.Array:
    return model.apply({"params": params}, images, train=False)


def predict_logits(
    params: Any, model: nn.Module, images: np.ndarray, batch_size: int = 500
) -> np.ndarray:
    """(n, 10) logits of (n, 28, 28, 1) images in evaluation mode (fixed-size batches)."""
    logits = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        padded = np.zeros((batch_size, *batch.shape[1:]), np.float32)
        padded[: len(batch)] = batch
        logits.append(np.asarray(_logits(params, padded, model))[: len(batch)])
    return np.concatenate(logits)


def accuracy(params: Any, model: nn.Module, data: LabelledImages) -> float:
    """Fraction of `data` that the classifier gets right."""
    return accuracy_of_logits(predict_logits(params, model, data.images), data.labels)


def batches(
    data: LabelledImages, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled full batches (the remainder is dropped)."""
    order = rng.permutation(len(data.labels))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chosen = order[start : start + batch_size]
        yield data.images[chosen], data.labels[chosen]


def train_source_classifier(
    source: Domain,
    seed: int,
    num_epochs: int,
    batch_size: int = 20,
    weight_decay: float = 1e-3,
    optimizer: optax.GradientTransformation | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
) -> tuple[Any, list[dict[str, float]]]:
    """Trains LeNet on source['train']; keeps the epoch with the best source['val'] accuracy.

    Returns:
      (params of the best epoch, per-epoch history [{'epoch', 'loss', 'val_accuracy'}]).
    """
    model = model or models.LeNetEncoder()
    optimizer = optimizer or create_classifier_optimizer()
    state = init_classifier(jax.random.PRNGKey(seed), model, optimizer)
    order_rng = np.random.default_rng(seed)
    best_params, best_accuracy, history = state.params, -1.0, []
    for epoch in tqdm.trange(num_epochs, desc="source", disable=not progress):
        losses = []
        for images, labels in batches(source["train"], batch_size, order_rng):
            state, loss = classifier_train_step(
                state, images, labels, model, optimizer, weight_decay
            )
            losses.append(loss)
        val_accuracy = accuracy(state.params, model, source["val"])
        history.append(
            {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": val_accuracy}
        )
        if val_accuracy > best_accuracy:
            best_params, best_accuracy = state.params, val_accuracy
    return best_params, history
