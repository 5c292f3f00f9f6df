"""The game's functions jit-compiled for a run: over the device mesh, and over a seed axis.

Performance (issue 6): a cycle runs as one compiled call (`game.run_cycle`: `lax.scan` over the
stacked k_d and k_t batches, the state donated); `fused_cycles=False` runs one call per step with
the same numbers, and is what `fused_cycles=None` (the default) picks on CPU, where XLA runs
convolution gradients inside a loop 7x slower (jax#12868; benchmarks/README.md). Batches are
sharded over the run's mesh (`runtime`), so BatchNorm statistics and losses are over the global
batch. With seeds (`config.num_seeds` > 1) every state, step, cycle, evaluation and criterion update
is mapped over a leading seed axis (`seed_map`: jax.vmap, or on CPU one traced copy per seed).
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sarcoma_jax import runtime, seed_map
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda import game as game_lib


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; `str(e)` is one line naming the network, the step and the kept
    checkpoint."""


class Programs(NamedTuple):
    """The run's jit-compiled functions, with their shardings.

    With seeds (`with_seeds`), states, source variables and step inputs have a seed axis: a step's
    batch is (seeds, batch, ...), a phase's (steps, seeds, batch, ...), and per-step metrics come
    back (steps, seeds); val batches and `predict` (one seed's variables) have none.
    """

    disc_steps: Callable
    cycle: Callable
    disc_step: Callable
    target_step: Callable
    evaluate: Callable
    predict: Callable
    criteria: Callable
    replicated: NamedSharding
    batched: NamedSharding  # one step's images
    stacked: NamedSharding  # a phase's images
    val_stacked: NamedSharding  # mixed_eval_batches
    examples: NamedSharding  # `predict`'s images


def update_criteria(
    criteria: Sequence[criteria_lib.Criterion],
    state: game_lib.GameState,
    row: Mapping[str, Any],
) -> tuple[game_lib.GameState, dict[str, criteria_lib.Selection]]:
    """One evaluation's row through every criterion (`criteria_lib.update`), in the game state."""
    states, selections = criteria_lib.update(criteria, state.criteria, row)
    return state.replace(criteria=states), selections


def compile_programs(
    game: game_lib.Game,
    criteria: Sequence[criteria_lib.Criterion],
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    with_seeds: bool,
) -> Programs:
    """The run's programs: `game`'s steps, phases, evaluation and prediction, and the update of
    `criteria`, placed on `mesh` (with a seed axis when `with_seeds`)."""
    seed_axis = (None,) if with_seeds else ()
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P(*seed_axis, runtime.BATCH_AXIS))
    stacked = NamedSharding(mesh, P(None, *seed_axis, runtime.BATCH_AXIS))
    val_stacked = NamedSharding(mesh, P(None, runtime.BATCH_AXIS))
    examples = NamedSharding(mesh, P(runtime.BATCH_AXIS))
    state_and_metrics = (replicated, replicated)

    num_seeds = config.get("num_seeds", 1)

    def over_seeds(function, in_axes, out_axes=0):
        if not with_seeds:
            return function
        return seed_map.seed_map(
            function, in_axes, out_axes, num_seeds=num_seeds, vmap=seed_map.use_vmap(config)
        )

    # Phases: stacked images (steps, seeds, batch, ...) in, metrics (steps, seeds) out, as the
    # step-by-step path gives them.
    phase_axes = {"in_axes": (0, 0, 1, 1, 1, 1), "out_axes": (0, 1)}
    return Programs(
        disc_steps=jax.jit(
            over_seeds(functools.partial(game_lib.run_disc_steps, game), (0, 0, 1, 1), (0, 1)),
            in_shardings=(replicated, replicated, stacked, stacked),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        cycle=jax.jit(
            over_seeds(functools.partial(game_lib.run_cycle, game), **phase_axes),
            in_shardings=(replicated, replicated, stacked, stacked, stacked, stacked),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        disc_step=jax.jit(
            over_seeds(functools.partial(game_lib.disc_step, game), (0, 0, 0, 0)),
            in_shardings=(replicated, replicated, batched, batched),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        target_step=jax.jit(
            over_seeds(functools.partial(game_lib.target_step, game), (0, 0, 0, 0)),
            in_shardings=(replicated, replicated, batched, batched),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        # Outputs the host reads are replicated, so that every host holds all of them.
        evaluate=jax.jit(
            over_seeds(
                functools.partial(game_lib.evaluate_game, game), (0, 0, None, None, None, None)
            ),
            in_shardings=(
                replicated,
                replicated,
                val_stacked,
                val_stacked,
                val_stacked,
                val_stacked,
            ),
            out_shardings=replicated,
        ),
        predict=jax.jit(
            lambda variables, images: game.map_model.apply(variables, images, train=False),
            in_shardings=(replicated, examples),
            out_shardings=replicated,
        ),
        criteria=jax.jit(
            over_seeds(functools.partial(update_criteria, tuple(criteria)), (0, 0)),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        ),
        replicated=replicated,
        batched=batched,
        stacked=stacked,
        val_stacked=val_stacked,
        examples=examples,
    )


def fused_cycles(config: ml_collections.ConfigDict) -> bool:
    """config.fused_cycles, with None read as: fused unless the devices are CPUs."""
    if config.get("fused_cycles") is not None:
        return bool(config.fused_cycles)
    return jax.default_backend() != "cpu"


def play(
    compiled: Programs,
    fused: bool,
    state: game_lib.GameState,
    source_variables: Any,
    batches: tuple[np.ndarray, ...],
) -> tuple[game_lib.GameState, dict[str, np.ndarray]]:
    """Runs a phase (disc batches only, or disc then target batches) fused or step by step.

    Returns:
      The new state and per-step metrics as host arrays.
    """
    if fused:
        function = compiled.cycle if len(batches) == 4 else compiled.disc_steps
        batches = [runtime.global_input(images, compiled.stacked) for images in batches]
        state, step_metrics = function(state, source_variables, *batches)
        return state, jax.device_get(step_metrics)
    collected: dict[str, list] = {}
    pairs = [(compiled.disc_step, batches[0], batches[1])]
    if len(batches) == 4:
        pairs.append((compiled.target_step, batches[2], batches[3]))
    for step_fn, source_images, target_images in pairs:
        for source_batch, target_batch in zip(source_images, target_images, strict=True):
            source_batch = runtime.global_input(source_batch, compiled.batched)
            target_batch = runtime.global_input(target_batch, compiled.batched)
            state, one_step = step_fn(state, source_variables, source_batch, target_batch)
            for name, value in one_step.items():
                collected.setdefault(name, []).append(value)
    return state, {name: np.stack(jax.device_get(values)) for name, values in collected.items()}


def check_finite(
    step_metrics: Mapping[str, np.ndarray],
    state_before: Mapping[str, int],
    phase: str,
    game_checkpoint: str,
    seeds: list[int] | None = None,
) -> None:
    """Raises NonFiniteLossError at the first step with a non-finite loss or gradient.

    The discriminator steps of a phase come before its target steps, so they are checked first.
    `seeds`: the seeds of a num_seeds run, whose metrics are (steps, seeds); the message names the
    seeds that failed.
    """
    for prefix, network, counter in (
        ("disc", "discriminator", "disc_steps"),
        ("target", "target map", "target_steps"),
    ):
        first_bad = []  # (step index, order, what, seeds): the loss is named when both fail
        for order, (quantity, what) in enumerate((("loss", "loss"), ("grad_norm", "gradient"))):
            values = step_metrics.get(f"{prefix}_{quantity}")
            if values is None:
                continue
            finite = np.isfinite(np.asarray(values)).reshape(len(values), -1)
            bad = np.flatnonzero(~finite.all(axis=1))
            if len(bad):
                failed = np.flatnonzero(~finite[bad[0]])
                first_bad.append((int(bad[0]), order, what, failed.tolist()))
        if first_bad:
            index, _, what, failed = min(first_bad)
            which = (
                f"seed {', '.join(str(seeds[i]) for i in failed)}: " if seeds is not None else ""
            )
            raise NonFiniteLossError(
                f"{which}non-finite {network} {what} at {network} step "
                f"{state_before[counter] + index + 1} ({phase}); stopped, the last good state is "
                f"kept in {game_checkpoint}"
            )
