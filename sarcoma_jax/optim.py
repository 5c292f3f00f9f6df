"""Momentum reset (thesis §11): an optax wrapper that restarts an optimizer's moments; schedules."""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax import lax

# Optax states that are not moment estimates, and what a reset does with each (when
# `reset_schedule=False`): `None` keeps the whole state; a field name keeps every field but that
# one, which holds a wrapped transformation's state and is walked in turn. Everything not listed
# here (Adam's mu, nu and bias-correction count, SGD's trace, ...) is moment state and restarts.
_KEPT_STATES: tuple[tuple[type, str | None], ...] = (
    # Learning-rate schedules: the step counter of `optax.adam(learning_rate=schedule)` & co.
    (optax.ScaleByScheduleState, None),
    (optax.contrib.ReduceLROnPlateauState, None),
    # `inject_hyperparams`: its schedule counter and the current (possibly user-set) values.
    (optax.InjectStatefulHyperparamsState, "inner_state"),
    (optax.InjectHyperparamsState, "inner_state"),
    # Bookkeeping of wrappers: gradient accumulation, skipped non-finite steps, step conditions.
    (optax.MultiStepsState, "inner_opt_state"),
    (optax.ApplyIfFiniteState, "inner_state"),
    (optax.transforms.ConditionallyTransformState, "inner_state"),
    (optax.transforms.ConditionallyMaskState, "inner_state"),
)


class ResetCondition(Protocol):
    """When to reset: `(step, last_reset_step) -> bool` scalar, traceable under jit."""

    def __call__(self, step: jax.Array, last_reset_step: jax.Array) -> jax.Array | bool:
        """Says whether to reset before the update with index `step`.

        Args:
          step: number of updates applied so far, i.e. the index of the update about to be
            made (int32 scalar).
          last_reset_step: `step` at the last reset; 0 before any (a fresh state counts as
            reset at step 0) (int32 scalar).
        """


class MomentumResetState(NamedTuple):
    """State of `momentum_reset`.

    Attributes:
      inner_state: state of the wrapped transformation.
      count: number of updates applied so far, i.e. the index of the next update (int32 scalar,
        saturating).
      last_reset_step: `count` when the last reset happened; 0 before any reset (int32 scalar).
      reset_count: number of resets so far (int32 scalar, saturating).
    """

    inner_state: optax.OptState
    count: jax.Array
    last_reset_step: jax.Array
    reset_count: jax.Array


def _as_reset_condition(
    should_reset: ResetCondition | Callable[[jax.Array], jax.Array | bool],
) -> ResetCondition:
    """Accepts `should_reset(step)` as well as `should_reset(step, last_reset_step)`."""
    try:
        inspect.signature(should_reset).bind(0, 0)
    except (TypeError, ValueError):  # One parameter, or no signature to inspect (a builtin).
        return lambda step, last_reset_step: should_reset(step)
    return should_reset


def _reinitialise_moments(current_state: Any, fresh_state: Any) -> Any:
    """`fresh_state` where it holds moments, `current_state` where `_KEPT_STATES` says so."""

    def is_kept_state(node: Any) -> bool:
        return any(isinstance(node, state_type) for state_type, _ in _KEPT_STATES)

    def choose(current_node: Any, fresh_node: Any) -> Any:
        for state_type, inner_field in _KEPT_STATES:
            if isinstance(current_node, state_type):
                if inner_field is None:
                    return current_node
                inner_state = _reinitialise_moments(
                    getattr(current_node, inner_field), getattr(fresh_node, inner_field)
                )
                return current_node._replace(**{inner_field: inner_state})
        return fresh_node

    return jax.tree.map(choose, current_state, fresh_state, is_leaf=is_kept_state)


def momentum_reset(
    inner: optax.GradientTransformation,
    should_reset: ResetCondition | Callable[[jax.Array], jax.Array | bool],
    reset_schedule: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Re-initialises the moment state of `inner` whenever `should_reset` says so.

    Before each update, `should_reset(step)` (or `should_reset(step, last_reset_step)`, see
    `ResetCondition`; chosen once from its signature) is evaluated under trace with `step` the
    number of updates applied so far. When true, the moment state of `inner` is replaced by
    `inner.init(params)` before this update is computed, so from then on the optimizer behaves
    exactly like a freshly initialised one started from the current parameters (for Adam: mu, nu
    and the bias-correction count all restart, as TF1's re-initialisation of the Adam slots did;
    zeroing mu and nu but keeping the count would make the next step ~15x too large at b1 = 0.5).
    The reset itself does not touch the parameters.

    What counts as moment state: every part of the inner state except the optax states listed
    in `_KEPT_STATES` - learning-rate schedule counters (`ScaleByScheduleState`, the count,
    hyperparameters and schedule states of `inject_hyperparams`, `reduce_on_plateau`) and the
    bookkeeping of wrappers (`MultiSteps`' accumulated gradients and counters, `apply_if_finite`
    and `conditionally_*` counters), which keep their values, while the states they wrap are
    walked in turn. With `reset_schedule=True` the whole inner state is re-initialised instead.

    Wrapped by `optax.MultiSteps`, `step` counts applied (accumulated) updates; wrapping it,
    `step` counts calls. It also works inside `optax.inject_hyperparams`.

    Args:
      inner: the transformation whose moments are reset, e.g. `optax.adam(1e-3, b1=0.5)`.
      should_reset: the condition, e.g. `reset_every(100)`; must return a boolean scalar.
      reset_schedule: also restart learning-rate schedules and wrapper bookkeeping.

    Returns:
      The wrapped transformation, with state `MomentumResetState`. Its `update` needs `params`
      (a reset calls `inner.init(params)`) and forwards extra arguments to `inner`.
    """
    inner = optax.with_extra_args_support(inner)
    reset_condition = _as_reset_condition(should_reset)

    def init_fn(params: optax.Params) -> MomentumResetState:
        zero = jnp.zeros([], jnp.int32)
        return MomentumResetState(
            inner_state=inner.init(params), count=zero, last_reset_step=zero, reset_count=zero
        )

    def update_fn(
        updates: optax.Updates,
        state: MomentumResetState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MomentumResetState]:
        if params is None:
            raise ValueError(
                "momentum_reset needs params in update(updates, state, params): a reset "
                "re-initialises the inner state with inner.init(params)."
            )
        reset = jnp.asarray(reset_condition(state.count, state.last_reset_step), dtype=bool)
        if reset.shape:
            raise ValueError(f"should_reset must return a scalar, got shape {reset.shape}.")

        def reinitialise(inner_state: optax.OptState) -> optax.OptState:
            fresh_state = inner.init(params)
            if not reset_schedule:
                fresh_state = _reinitialise_moments(inner_state, fresh_state)
            # lax.cond needs identical dtypes in both branches; optax keeps them stable anyway.
            return jax.tree.map(
                lambda fresh, current: jnp.asarray(fresh, dtype=jnp.result_type(current)),
                fresh_state,
                inner_state,
            )

        inner_state = lax.cond(reset, reinitialise, lambda s: s, state.inner_state)
        updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        return updates, MomentumResetState(
            inner_state=inner_state,
            count=optax.safe_increment(state.count),
            last_reset_step=jnp.where(reset, state.count, state.last_reset_step),
            reset_count=jnp.where(
                reset, optax.safe_increment(state.reset_count), state.reset_count
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def reset_every(num_steps: int) -> ResetCondition:
    """Resets before updates num_steps, 2 * num_steps, ... (never at 0: a fresh state needs none).

    SVHN->MNIST resets the discriminator every 100 of its steps: `reset_every(100)`.
    """
    _check_positive(num_steps=num_steps)

    def should_reset(step: jax.Array, last_reset_step: jax.Array) -> jax.Array:
        del last_reset_step
        return (step > 0) & (step % num_steps == 0)

    return should_reset


def _at_cycle_start(step: jax.Array, initial_steps: int, steps_per_cycle: int) -> jax.Array:
    steps_into_cycles = step - initial_steps
    return (steps_into_cycles >= 0) & (steps_into_cycles % steps_per_cycle == 0)


def reset_at_cycle_starts(initial_steps: int, steps_per_cycle: int) -> ResetCondition:
    """Resets before the first update of every cycle, for an optimizer that takes `initial_steps`
    updates and then `steps_per_cycle` per cycle, i.e. before updates
    initial_steps + c * steps_per_cycle, c = 0, 1, ... (update 0 excepted: it needs no reset).

    In the ADDA game (initial discriminator steps, then cycles of k_d discriminator and k_t target
    steps), "reset the discriminator before every cycle" is `reset_at_cycle_starts(
    initial_disc_steps, k_d)` - its first reset comes right after the initial steps, before the
    first cycle, as the words say - and "reset the target map before every cycle" is
    `reset_at_cycle_starts(0, k_t)`: resets at k_t, 2 k_t, ...
    """
    _check_positive(steps_per_cycle=steps_per_cycle)
    if initial_steps < 0:
        raise ValueError(f"initial_steps must be >= 0, got {initial_steps!r}.")

    def should_reset(step: jax.Array, last_reset_step: jax.Array) -> jax.Array:
        del last_reset_step
        return (step > 0) & _at_cycle_start(step, initial_steps, steps_per_cycle)

    return should_reset


def reset_after_at_least(
    min_steps: int, initial_steps: int = 0, steps_per_cycle: int = 1
) -> ResetCondition:
    """Resets once >= `min_steps` updates have been applied since the last reset.

    The check is made at cycle starts only (see `reset_at_cycle_starts`; with the default
    `steps_per_cycle=1`, before every update, which is `reset_every(min_steps)`). T2->CT resets the
    target map "once >= 200 target steps since the last reset", checked before each of its cycles
    of k_t steps: `reset_after_at_least(200, 0, k_t)` - with k_t = 20 that is at 200, 400, ...;
    with k_t = 30 at 210, 420, ...
    """
    _check_positive(min_steps=min_steps, steps_per_cycle=steps_per_cycle)
    if initial_steps < 0:
        raise ValueError(f"initial_steps must be >= 0, got {initial_steps!r}.")

    def should_reset(step: jax.Array, last_reset_step: jax.Array) -> jax.Array:
        return _at_cycle_start(step, initial_steps, steps_per_cycle) & (
            step - last_reset_step >= min_steps
        )

    return should_reset
