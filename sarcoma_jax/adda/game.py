"""The ADDA game (thesis §10.1, §14.3, SPEC §4), pure: its state, steps, cycles and evaluation.

The game. A source map (trained on labelled source data, then frozen: BatchNorm with its running
averages) and a target map (initialised as a copy of it) feed their outputs to a discriminator that
labels source outputs 1 and target outputs 0 (`confusion.SOURCE_DOMAIN_LABEL`). The discriminator
minimises the cross-entropy over a batch of `batch_size` source plus `batch_size` target outputs
(plus `discriminator_l2` times the squared kernels); the target map minimises the cross-entropy of
the discriminator's verdict on its outputs against the *source* label (inverted labels). After
`initial_disc_steps` discriminator steps, cycles of k_d discriminator steps then k_t target steps
repeat until `target_epochs` epochs of the target training set have been used
(target steps x batch / target train size, rounded up to whole cycles). Both networks train with
`optim.momentum_reset(optax.adam(...), condition)`; scheme 'adda' never resets, scheme 'reset' uses
the pair's schedule (`config.reset`), so checkpoints of both schemes have the same layout.

Design decisions (where the thesis leaves a choice):
  * The discriminator always sees source and target outputs concatenated in one batch, in its
    discriminator steps, in the target steps and at evaluation, so its BatchNorm normalises over
    the same mixture everywhere (Tzeng et al.'s ADDA code does the same). The target loss counts
    the target half only.
  * Evaluation of the discriminator (SPEC §4's warning): dropout off, BatchNorm with the statistics
    of the evaluated batch (`discriminator_eval_bn='batch'`), and every evaluated batch is
    `batch_size` source + `batch_size` target samples like a training batch, so its predictions
    agree with training mode (tests/adda_game_test.py checks it). Running averages are an option
    ('running') for comparison.
  * The target map is applied in evaluation mode (`target_map_train_mode=False`: BatchNorm with the
    running averages it inherited from the source map), so at the start the target map is exactly
    the source map and the only thing adaptation changes is its parameters. True applies it in
    training mode (batch statistics, dropout, running averages updated by the target steps).

Evaluations: once before DA (row phase 'before_da'), after the initial discriminator steps
('initial_disc') and after every cycle ('cycle'). Each computes on the val splits: the
discriminator's recall (source val labelled source) and specificity (target val labelled target)
afresh over the whole splits, its cross-entropy, the target adversarial loss on target val, and the
target map's primary metric on target val (the oracle's signal). Every evaluation goes through the
stopping criteria (sarcoma_jax/adda/criteria), whose states are part of the game state.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from sarcoma_jax import confusion, models, optim
from sarcoma_jax.input_pipeline import ConfigError

SCHEMES = ("adda", "reset")  # plain ADDA, or momentum reset with the pair's schedule
RESET_WHEN = ("never", "cycle_start", "every", "after_at_least")


@dataclasses.dataclass(frozen=True)
class Game:
    """What does not change during a run: the networks, the optimizers, the fixed settings."""

    map_model: nn.Module
    discriminator: nn.Module
    target_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    disc_l2: float
    target_map_train_mode: bool
    disc_eval_batch_stats: bool
    # The map's module whose activations evaluate_game also returns (for label-free criteria,
    # adda/probe.py), or None.
    feature_module: str | None = None


class GameState(flax.struct.PyTreeNode):
    """Everything that changes during the game, as one pytree (checkpointed whole).

    Attributes:
      target_params, target_batch_stats: the target map's variables.
      target_opt_state: its optimizer state (`optim.MomentumResetState`, so reset counters too).
      disc_params, disc_batch_stats, disc_opt_state: the discriminator's.
      disc_steps, target_steps: updates made so far (int32 scalars).
      rng: base PRNG key; step keys are fold_in(fold_in(rng, network), steps of that network).
      criteria: each stopping criterion's state by name (criteria.init / criteria.update).
    """

    target_params: Any
    target_batch_stats: Any
    target_opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    disc_steps: jax.Array
    target_steps: jax.Array
    rng: jax.Array
    criteria: dict[str, Any]

    def target_variables(self) -> dict:
        return {"params": self.target_params, "batch_stats": self.target_batch_stats}


def reset_condition(
    when: str, steps: int, initial_steps: int, steps_per_cycle: int
) -> optim.ResetCondition:
    """The momentum-reset schedule of one network (SPEC §4's table, `config.reset.<network>`).

    Args:
      when: 'never'; 'cycle_start' (before each of its cycles, see optim.reset_at_cycle_starts);
        'every' (every `steps` of its updates); 'after_at_least' (at a cycle start once >= `steps`
        updates since the last reset).
      steps: see `when`.
      initial_steps: its updates before the first cycle (initial_disc_steps for the
        discriminator, 0 for the target map).
      steps_per_cycle: its updates per cycle (k_d or k_t).
    """
    if when == "never":
        return lambda step, last_reset_step: jnp.zeros([], bool)
    if when == "cycle_start":
        return optim.reset_at_cycle_starts(initial_steps, steps_per_cycle)
    if when == "every":
        return optim.reset_every(steps)
    if when == "after_at_least":
        return optim.reset_after_at_least(steps, initial_steps, steps_per_cycle)
    raise ConfigError(f"unknown reset schedule {when!r}; use one of {', '.join(RESET_WHEN)}")


def _adam(optimizer_config: Mapping[str, Any], should_reset) -> optax.GradientTransformation:
    return optim.momentum_reset(
        optax.adam(
            learning_rate=optimizer_config["learning_rate"],
            b1=optimizer_config["b1"],
            b2=optimizer_config["b2"],
            eps=optimizer_config["eps"],
        ),
        should_reset,
    )


def create_game(config: ml_collections.ConfigDict, feature_module: str | None = None) -> Game:
    """The networks and optimizers that `config` describes, with the scheme's reset schedules;
    `feature_module`: see Game."""
    schedules = {}
    for network, initial_steps, steps_per_cycle in (
        ("discriminator", config.initial_disc_steps, config.disc_steps_per_cycle),
        ("target", 0, config.target_steps_per_cycle),
    ):
        reset = config.reset[network]
        when = reset.when if config.scheme == "reset" else "never"
        schedules[network] = reset_condition(when, reset.steps, initial_steps, steps_per_cycle)
    return Game(
        map_model=models.create(config.model),
        discriminator=models.create(config.discriminator),
        target_tx=_adam(config.target_optimizer, schedules["target"]),
        disc_tx=_adam(config.disc_optimizer, schedules["discriminator"]),
        disc_l2=float(config.discriminator_l2),
        target_map_train_mode=bool(config.target_map_train_mode),
        disc_eval_batch_stats=config.discriminator_eval_bn == "batch",
        feature_module=feature_module,
    )


def create_game_state(
    rng: jax.Array,
    game: Game,
    source_variables: Mapping[str, Any],
    input_shape: tuple[int, ...],
    criteria_state: Mapping[str, Any],
) -> GameState:
    """The state before DA: the target map a copy of the source map, a fresh discriminator.

    Args:
      rng: PRNG key of the run.
      game: from `create_game`.
      source_variables: {'params', 'batch_stats'} of the trained source map.
      input_shape: one input's shape, e.g. (h, w, 1).
      criteria_state: the stopping criteria's initial states (`criteria.init`).

    Returns:
      The state; every leaf its own buffer (none shared with `source_variables`), so the state
      can be donated.
    """

    def build(rng, source_variables, criteria_state):
        disc_init_rng, state_rng = jax.random.split(rng)
        sample_outputs = game.map_model.apply(
            source_variables, jnp.zeros((1, *input_shape), jnp.float32), train=False
        )
        disc_variables = game.discriminator.init(
            disc_init_rng, jnp.zeros_like(sample_outputs), train=False
        )
        target_params = source_variables["params"]
        disc_params = disc_variables["params"]
        return GameState(
            target_params=target_params,
            target_batch_stats=source_variables.get("batch_stats", {}),
            target_opt_state=game.target_tx.init(target_params),
            disc_params=disc_params,
            disc_batch_stats=disc_variables.get("batch_stats", {}),
            disc_opt_state=game.disc_tx.init(disc_params),
            disc_steps=jnp.zeros([], jnp.int32),
            target_steps=jnp.zeros([], jnp.int32),
            rng=state_rng,
            criteria=dict(criteria_state),
        )

    # Compiled: eagerly, every initialiser would be compiled on its own. The target map's
    # variables are the source map's, passed through; copy them so donation cannot touch those.
    state = jax.jit(build)(rng, dict(source_variables), dict(criteria_state))
    return jax.device_put(state, may_alias=False)


def _apply_map(
    game: Game, variables: Mapping[str, Any], images: jax.Array, train: bool, rng: jax.Array
) -> tuple[jax.Array, Any]:
    """Map outputs and (in training mode) its updated batch statistics."""
    if not train:
        return game.map_model.apply(variables, images, train=False), variables["batch_stats"]
    outputs, updates = game.map_model.apply(
        variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
    )
    return outputs, updates.get("batch_stats", variables["batch_stats"])


def _apply_discriminator_train(
    game: Game, params: Any, batch_stats: Any, inputs: jax.Array, rng: jax.Array
) -> tuple[jax.Array, Any]:
    """Discriminator logits (batch, 2) in training mode and its updated batch statistics."""
    logits, updates = game.discriminator.apply(
        {"params": params, "batch_stats": batch_stats},
        inputs,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    return logits, updates.get("batch_stats", batch_stats)


def apply_discriminator_eval(game: Game, state: GameState, inputs: jax.Array) -> jax.Array:
    """Discriminator logits at evaluation: dropout off; BatchNorm with the statistics of `inputs`
    (a batch composed like a training batch) unless `discriminator_eval_bn='running'`."""
    variables = {"params": state.disc_params, "batch_stats": state.disc_batch_stats}
    if game.disc_eval_batch_stats and jax.tree.leaves(state.disc_batch_stats):
        logits, _ = game.discriminator.apply(
            variables, inputs, train=False, use_running_average=False, mutable=["batch_stats"]
        )
        return logits
    return game.discriminator.apply(variables, inputs, train=False)


def apply_with_features(
    game: Game, variables: Mapping[str, Any], images: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The map's outputs in evaluation mode and the activations of `game.feature_module` after
    its ReLU (flax's capture_intermediates), or an empty (batch, 0) array when there is none."""
    if game.feature_module is None:
        outputs = game.map_model.apply(variables, images, train=False)
        return outputs, jnp.zeros((images.shape[0], 0), outputs.dtype)
    outputs, state = game.map_model.apply(
        variables,
        images,
        train=False,
        capture_intermediates=lambda module, method: (
            module.name == game.feature_module and method == "__call__"
        ),
    )
    (captured,) = jax.tree.leaves(state["intermediates"])
    return outputs, jax.nn.relu(captured)


def _domain_labels(num_source: int, num_target: int) -> jax.Array:
    return jnp.concatenate(
        [
            jnp.full([num_source], confusion.SOURCE_DOMAIN_LABEL, jnp.int32),
            jnp.full([num_target], confusion.TARGET_DOMAIN_LABEL, jnp.int32),
        ]
    )


def _step_rng(state: GameState, network: int, steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(state.rng, network), steps))


def disc_step(
    game: Game,
    state: GameState,
    source_variables: Mapping[str, Any],
    source_images: jax.Array,
    target_images: jax.Array,
) -> tuple[GameState, dict[str, jax.Array]]:
    """One discriminator update on `batch` source and `batch` target inputs.

    Returns:
      The new state and {'disc_loss' (cross-entropy + L2 term), 'disc_cross_entropy',
      'disc_grad_norm'} (float32 scalars).
    """
    map_rng, disc_rng = _step_rng(state, 0, state.disc_steps)
    source_outputs, _ = _apply_map(game, source_variables, source_images, False, map_rng)
    target_outputs, _ = _apply_map(
        game, state.target_variables(), target_images, game.target_map_train_mode, map_rng
    )
    inputs = lax.stop_gradient(jnp.concatenate([source_outputs, target_outputs]))
    labels = _domain_labels(source_images.shape[0], target_images.shape[0])

    def loss_fn(disc_params):
        logits, batch_stats = _apply_discriminator_train(
            game, disc_params, state.disc_batch_stats, inputs, disc_rng
        )
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss = cross_entropy + game.disc_l2 * models.kernel_l2_penalty(disc_params)
        return loss, (cross_entropy, batch_stats)

    (loss, (cross_entropy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.disc_params
    )
    updates, opt_state = game.disc_tx.update(grads, state.disc_opt_state, state.disc_params)
    state = state.replace(
        disc_params=optax.apply_updates(state.disc_params, updates),
        disc_batch_stats=batch_stats,
        disc_opt_state=opt_state,
        disc_steps=state.disc_steps + 1,
    )
    return state, {
        "disc_loss": loss,
        "disc_cross_entropy": cross_entropy,
        "disc_grad_norm": optax.tree.norm(grads),
    }


def target_step(
    game: Game,
    state: GameState,
    source_variables: Mapping[str, Any],
    source_images: jax.Array,
    target_images: jax.Array,
) -> tuple[GameState, dict[str, jax.Array]]:
    """One target-map update: cross-entropy of the discriminator's verdict on the target outputs
    against the source label (inverted labels), the discriminator fixed.

    Returns:
      The new state and {'target_loss', 'target_grad_norm'} (float32 scalars).
    """
    map_rng, disc_rng = _step_rng(state, 1, state.target_steps)
    source_outputs, _ = _apply_map(game, source_variables, source_images, False, map_rng)
    source_outputs = lax.stop_gradient(source_outputs)
    num_source = source_images.shape[0]
    inverted_labels = jnp.full([target_images.shape[0]], confusion.SOURCE_DOMAIN_LABEL, jnp.int32)

    def loss_fn(target_params):
        target_outputs, batch_stats = _apply_map(
            game,
            {"params": target_params, "batch_stats": state.target_batch_stats},
            target_images,
            game.target_map_train_mode,
            map_rng,
        )
        logits, _ = _apply_discriminator_train(
            game,
            state.disc_params,
            state.disc_batch_stats,
            jnp.concatenate([source_outputs, target_outputs]),
            disc_rng,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits[num_source:], inverted_labels
        ).mean()
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.target_params)
    updates, opt_state = game.target_tx.update(grads, state.target_opt_state, state.target_params)
    state = state.replace(
        target_params=optax.apply_updates(state.target_params, updates),
        target_batch_stats=batch_stats,
        target_opt_state=opt_state,
        target_steps=state.target_steps + 1,
    )
    return state, {"target_loss": loss, "target_grad_norm": optax.tree.norm(grads)}


def run_disc_steps(
    game: Game,
    state: GameState,
    source_variables: Mapping[str, Any],
    source_images: jax.Array,
    target_images: jax.Array,
) -> tuple[GameState, dict[str, jax.Array]]:
    """`disc_step` over stacked batches (steps, batch, ...), one compiled loop; metrics (steps,)."""

    def body(carry, images):
        return disc_step(game, carry, source_variables, *images)

    return lax.scan(body, state, (source_images, target_images))


def run_cycle(
    game: Game,
    state: GameState,
    source_variables: Mapping[str, Any],
    disc_source_images: jax.Array,
    disc_target_images: jax.Array,
    map_source_images: jax.Array,
    map_target_images: jax.Array,
) -> tuple[GameState, dict[str, jax.Array]]:
    """One cycle as one compiled call: k_d discriminator steps on the stacked (k_d, batch, ...)
    images, then k_t target steps on the stacked (k_t, batch, ...) images.

    Returns:
      The new state and per-step metrics: disc_* (k_d,), target_* (k_t,).
    """
    state, disc_metrics = run_disc_steps(
        game, state, source_variables, disc_source_images, disc_target_images
    )

    def body(carry, images):
        return target_step(game, carry, source_variables, *images)

    state, target_metrics = lax.scan(body, state, (map_source_images, map_target_images))
    return state, {**disc_metrics, **target_metrics}


def evaluate_game(
    game: Game,
    state: GameState,
    source_variables: Mapping[str, Any],
    source_images: jax.Array,
    target_images: jax.Array,
    source_valid: jax.Array,
    target_valid: jax.Array,
) -> dict[str, jax.Array]:
    """Both maps and the discriminator in evaluation mode over the val splits.

    Args:
      source_images, target_images: (num_batches, batch, ...) val inputs; batch i of each forms one
        discriminator batch, as in training (`mixed_eval_batches`).
      source_valid, target_valid: (num_batches, batch) bool, True at the first occurrence of each
        val sample; only those count.

    Returns:
      target_outputs (num_batches, batch, ...): the target map's outputs;
      target_features (num_batches, batch, ..., channels): its activations of
        `game.feature_module` (an empty (num_batches, batch, 0) array when that is None);
      recall, specificity: the discriminator's, over the whole val splits (float32 scalars);
      soft_recall, soft_specificity: the mean probability it gives source val samples of being
        source, and target val samples of being target;
      disc_loss: its cross-entropy against the true domains, mean over both splits' samples;
      target_adversarial_loss: the target loss (target outputs vs the source label), mean over
        target val.
    """

    def one_batch(images):
        source_batch, target_batch = images
        source_outputs = game.map_model.apply(source_variables, source_batch, train=False)
        target_outputs, target_features = apply_with_features(
            game, state.target_variables(), target_batch
        )
        logits = apply_discriminator_eval(
            game, state, jnp.concatenate([source_outputs, target_outputs])
        )
        num_source, num_target = source_batch.shape[0], target_batch.shape[0]
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
            logits, _domain_labels(num_source, num_target)
        )
        adversarial = optax.softmax_cross_entropy_with_integer_labels(
            logits[num_source:],
            jnp.full([num_target], confusion.SOURCE_DOMAIN_LABEL, jnp.int32),
        )
        source_probability = jax.nn.softmax(logits, axis=-1)[:, confusion.SOURCE_DOMAIN_LABEL]
        return (
            target_outputs,
            target_features,
            jnp.argmax(logits, axis=-1),
            source_probability,
            cross_entropy,
            adversarial,
        )

    (
        target_outputs,
        target_features,
        predictions,
        source_probability,
        cross_entropy,
        adversarial,
    ) = lax.map(one_batch, (source_images, target_images))
    num_source = source_images.shape[1]
    recall, specificity = confusion.discriminator_recall_specificity(
        predictions[:, :num_source], predictions[:, num_source:], source_valid, target_valid
    )

    def valid_mean(values, valid):
        return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.sum(valid)

    valid = jnp.concatenate([source_valid, target_valid], axis=1)
    return {
        "target_outputs": target_outputs,
        "target_features": target_features,
        "recall": recall,
        "specificity": specificity,
        # The same from the discriminator's probabilities instead of its argmax verdicts.
        "soft_recall": valid_mean(source_probability[:, :num_source], source_valid),
        "soft_specificity": valid_mean(1.0 - source_probability[:, num_source:], target_valid),
        "disc_loss": jnp.sum(jnp.where(valid, cross_entropy, 0.0)) / jnp.sum(valid),
        "target_adversarial_loss": jnp.sum(jnp.where(target_valid, adversarial, 0.0))
        / jnp.sum(target_valid),
    }


def mixed_eval_batches(
    source_images: np.ndarray, target_images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs the two val sets into discriminator batches of batch_size + batch_size.

    The shorter set wraps around to fill its batches; every sample is counted once (`valid`).

    Returns:
      source (num_batches, batch_size, ...), target (num_batches, batch_size, ...), and the
      (num_batches, batch_size) bool masks of the first occurrences of each source / target
      sample.
    """
    num_source, num_target = source_images.shape[0], target_images.shape[0]
    num_batches = max(math.ceil(num_source / batch_size), math.ceil(num_target / batch_size))
    positions = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
    return (
        source_images[positions % num_source],
        target_images[positions % num_target],
        positions < num_source,
        positions < num_target,
    )


def check_source_fits(game: Game, source_variables: Mapping, input_shape: tuple) -> None:
    expected = jax.eval_shape(
        lambda: game.map_model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), False)
    )
    for collection in ("params", "batch_stats"):
        want = jax.tree.map(lambda x: x.shape, dict(expected.get(collection, {})))
        got = jax.tree.map(np.shape, dict(source_variables.get(collection, {})))
        if want != got:
            raise ConfigError(
                f"the source map's {collection} do not fit config.model (a checkpoint of another "
                "architecture?); use the model config the source was trained with"
            )
