"""The ADDA loop: python main.py --config=configs/adda_ct_pt.py --workdir=W.

Plays the game (adda/game.py) of `config` through its phases: an evaluation of the source map
before DA, the initial discriminator steps, then cycles of k_d discriminator and k_t target steps,
each followed by an evaluation on the val splits that every stopping criterion (adda/criteria)
judges; each criterion's pick is checkpointed when it changes, and at the end scored on target test
and val (adda/results.py).

Outputs in workdir:
  config.json, provenance.json     what ran
  source/                          the source segmentation run (when not given a checkpoint)
  checkpoints/game/                the full game state for resuming (latest only)
  checkpoints/<criterion>/         target map variables of each stopping criterion's pick
  metrics.jsonl                    one row per evaluation: phase, cycle, step (= disc_steps +
                                   target_steps), disc_steps, target_steps, disc_loss, recall,
                                   specificity, target_adversarial_loss, target_val_<metric>
                                   (val split), <criterion>_score for each criterion (NaN ->
                                   null), <disc|target>_<loss|grad_norm>_train (means over the
                                   phase's steps), disc_resets, target_resets, seconds
  results.json                     {"criteria": {name: {"step", "test", "val", ...}},
                                    "source_test": ..., "source_val": ..., "scheme", "pair", ...}
With `config.num_seeds` > 1 the seeds config.seed, config.seed + 1, ... play together in one
program (adda/programs.py): checkpoints/game holds the stacked state, source/ the seeds' source
runs (one num_seeds segmentation run), seed_<s>/ each seed's config, provenance, metrics.jsonl,
checkpoints/<criterion>/ and results.json (laid out like a single run; equal to one up to float
reassociation), and results.json lists the seeds.

A run killed and started again with the same workdir resumes from checkpoints/game (the criteria's
states, reset counters, rng and data position are all in it) and ends with the same results as an
uninterrupted run. A NaN or inf loss stops the run with `NonFiniteLossError` naming the network and
step; checkpoints/game keeps the last good state. On several hosts only the first writes files.
"""

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import threadpoolctl
import tqdm
from absl import logging

from data_pipeline import loader
from data_pipeline.vocabulary import SPLITS
from sarcoma_jax import checkpoints, models, runtime, seed_map
from sarcoma_jax import workdir as workdir_lib
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda import game as game_lib
from sarcoma_jax.adda import probe as probe_lib
from sarcoma_jax.adda import programs, results
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.input_pipeline import ConfigError
from sarcoma_jax.segment import train as segment_train

DISCRIMINATOR_EVAL_BN = ("batch", "running")
# Config fields that do not change results; a resumed run may differ from the original in these.
COSMETIC_CONFIG_KEYS = ("progress_bar", "distributed")
NonFiniteLossError = programs.NonFiniteLossError
# A metrics row's columns that say where the evaluation is, not what it measured.
ROW_COUNTERS = ("phase", "cycle", "step", "disc_steps", "target_steps")


def validate_config(config: ml_collections.ConfigDict, task: task_lib.Task | None = None) -> None:
    """Checks everything that can be checked without data or compute (task: default
    `task.get_task(config.task)`).

    Raises:
      ConfigError: one line saying what to change.
    """
    if config.scheme not in game_lib.SCHEMES:
        raise ConfigError(f"config.scheme {config.scheme!r} is unknown; use 'adda' or 'reset'")
    for name in (
        "batch_size",
        "eval_batch_size",
        "disc_steps_per_cycle",
        "target_steps_per_cycle",
        "checkpoint_every_cycles",
    ):
        if config[name] < 1:
            raise ConfigError(f"config.{name} must be >= 1, got {config[name]}")
    for name in ("initial_disc_steps", "confusion_delay", "best_loss_min_target_steps"):
        if config[name] < 0:
            raise ConfigError(f"config.{name} must be >= 0, got {config[name]}")
    if config.confusion_window < 1:
        raise ConfigError(f"config.confusion_window must be >= 1, got {config.confusion_window}")
    if not config.target_epochs > 0:
        raise ConfigError(f"config.target_epochs must be > 0, got {config.target_epochs}")
    for network in ("discriminator", "target"):
        reset = config.reset[network]
        if reset.when not in game_lib.RESET_WHEN:
            raise ConfigError(
                f"config.reset.{network}.when {reset.when!r} is unknown; "
                f"use one of {', '.join(game_lib.RESET_WHEN)}"
            )
        if reset.when in ("every", "after_at_least") and reset.steps < 1:
            raise ConfigError(f"config.reset.{network}.steps must be >= 1, got {reset.steps}")
    for optimizer in ("disc_optimizer", "target_optimizer"):
        if not config[optimizer].learning_rate > 0:
            raise ConfigError(f"config.{optimizer}.learning_rate must be > 0")
    if config.discriminator_eval_bn not in DISCRIMINATOR_EVAL_BN:
        raise ConfigError(
            f"config.discriminator_eval_bn {config.discriminator_eval_bn!r}; use 'batch' or "
            "'running'"
        )
    for name in ("model", "discriminator"):
        if config[name].name not in models.MODELS:
            raise ConfigError(
                f"config.{name}.name {config[name].name!r} is unknown; "
                f"use one of {', '.join(sorted(models.MODELS))}"
            )
    norm = config.discriminator.get("norm", "batch")
    if norm not in models.DISCRIMINATOR_NORMS:
        raise ConfigError(
            f"config.discriminator.norm {norm!r}; use one of "
            f"{', '.join(models.DISCRIMINATOR_NORMS)}"
        )
    num_seeds = config.get("num_seeds", 1)
    if not isinstance(num_seeds, int) or num_seeds < 1:
        raise ConfigError(f"config.num_seeds must be an integer >= 1, got {num_seeds!r}")
    if num_seeds > 1 and jax.process_count() > 1:
        raise ConfigError(
            "config.num_seeds > 1 runs on one host; on several hosts run one seed per job"
        )
    criteria_lib.build(config)
    runtime.check_batch_split(config, len(runtime.mesh_devices(config)))
    (task if task is not None else task_lib.get_task(config.task)).validate_config(config)


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed of a `num_seeds` run: `seed` set (and the source run's, which shares
    it), `num_seeds` 1; what a single run of that seed is given."""
    single = segment_train.seed_config(config, seed)
    if isinstance(single.get("source"), ml_collections.ConfigDict) and "seed" in single.source:
        single.source.seed = seed
    return single


def _images_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # loader.train_batches gathers 'image' and 'mask'; the game needs images only, so an empty
    # mask per example keeps the loader generic over tasks whose labels are not masks.
    images = arrays["image"]
    return {"image": images, "mask": np.zeros((images.shape[0], 0), np.uint8)}


def _next_images(stream, num_batches: int) -> np.ndarray:
    """(num_batches, batch, ...) images from a train_batches stream."""
    return np.stack([next(stream)["image"] for _ in range(num_batches)])


def _number_of_cycles(config: ml_collections.ConfigDict, num_target_train: int) -> int:
    target_steps = math.ceil(config.target_epochs * num_target_train / config.batch_size)
    return max(1, math.ceil(target_steps / config.target_steps_per_cycle))


@dataclasses.dataclass
class _SeedRun:
    """The host side of one seed of the game: its config and folder, its data streams, its
    criteria's checkpoints and its metrics. A single run is one, in the run's workdir."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    source_stream: Any
    target_stream: Any
    managers: dict[str, Any]
    writer: workdir_lib.MetricsWriter | None = None

    @property
    def seed(self) -> int:
        return self.config.seed


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    task: task_lib.Task | None = None,
    cycle_hook: Callable[[int], None] | None = None,
) -> dict:
    """Plays the ADDA game of `config`, then scores every stopping criterion on target test/val.

    Args:
      config: see configs/adda_base.py.
      workdir: output folder (created); an existing one of the same config is resumed.
      task: the Task; default `task.get_task(config.task)`.
      cycle_hook: called with the number of completed phases (the initial discriminator steps
        count as one) after each phase and its checkpointing; tests use it to interrupt a run.

    Returns:
      The results written to results.json (with seeds: the summary listing them).

    Raises:
      ConfigError: a config that cannot run (before any compute).
      NonFiniteLossError: a loss became NaN or inf.
    """
    task = task if task is not None else task_lib.get_task(config.task)
    validate_config(config, task)
    criteria = criteria_lib.build(config)
    workdir = pathlib.Path(workdir)
    primary = runtime.is_primary()  # on several hosts only the first writes files (orbax: all save)
    workdir_lib.start(config, workdir, COSMETIC_CONFIG_KEYS, primary)
    start_time = time.time()
    num_seeds = config.get("num_seeds", 1)
    with_seeds = num_seeds > 1
    if with_seeds:
        seed_configs = [seed_config(config, config.seed + i) for i in range(num_seeds)]
        seed_dirs = [workdir / f"seed_{single.seed}" for single in seed_configs]
    else:
        seed_configs, seed_dirs = [config], [workdir]

    data = task.load_data(config)
    counts = {
        domain: {split: int(arrays[split]["image"].shape[0]) for split in SPLITS}
        for domain, arrays in (("source", data.source), ("target", data.target))
    }
    logging.info("data (examples per split): %s", counts)
    input_shape = tuple(data.target["train"]["image"].shape[1:])
    measuring = [c for c in criteria if hasattr(c, "measure")]
    # Label-free criteria read the target map's features: the evaluation returns them.
    game = game_lib.create_game(config, task.feature_module if measuring else None)
    if with_seeds:
        if hasattr(task, "prepare_seeds"):  # optional in the Task protocol
            seed_configs = task.prepare_seeds(config, workdir, seed_configs)
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True):
            workdir_lib.start(single, seed_dir, COSMETIC_CONFIG_KEYS, primary)
    all_source_variables = [
        dict(task.source_variables(single, seed_dir, data))
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True)
    ]
    for variables in all_source_variables:
        game_lib.check_source_fits(game, variables, input_shape)

    mesh = runtime.make_mesh(config)
    compiled = programs.compile_programs(game, criteria, config, mesh, with_seeds)
    fused = programs.fused_cycles(config)
    states = [  # on this host's default device, then placed like the rest
        game_lib.create_game_state(
            jax.random.PRNGKey(single.seed),
            game,
            variables,
            input_shape,
            criteria_lib.init(criteria),
        )
        for single, variables in zip(seed_configs, all_source_variables, strict=True)
    ]
    state = runtime.put(seed_map.stack(states) if with_seeds else states[0], compiled.replicated)
    source_variables = runtime.put(
        seed_map.stack(all_source_variables) if with_seeds else all_source_variables[0],
        compiled.replicated,
    )
    del states, all_source_variables

    def take(tree: Any, i: int) -> Any:
        """Seed i's part of a (possibly stacked) pytree."""
        return seed_map.take(tree, i) if with_seeds else tree

    def seed_int(value: Any, i: int) -> int:
        return int(np.ravel(jax.device_get(value))[i])

    def per_seed(values: list) -> Any:
        """One value per seed as the compiled functions take it: stacked on axis 1 for phase
        images (steps, seeds, ...) and on axis 0 for scalars; the value itself for one run."""
        if not with_seeds:
            return values[0]
        if np.ndim(values[0]) == 0:
            return np.asarray(values)
        return np.stack(values, axis=1)

    val_batches = runtime.put(
        game_lib.mixed_eval_batches(
            data.source["val"]["image"], data.target["val"]["image"], config.batch_size
        ),
        compiled.val_stacked,
    )
    num_target_val = data.target["val"]["image"].shape[0]
    metric_name = f"target_val_{task.primary_metric}"
    game_columns = (
        "disc_loss",
        "recall",
        "specificity",
        "soft_recall",
        "soft_specificity",
        "target_adversarial_loss",
    )
    # Seconds of the evaluation, of all validators, and of each (the first validator to need a
    # pass the probe shares, e.g. over source val, pays for it).
    timing_columns = (
        "validator_seconds",
        "evaluation_seconds",
        *(f"{criterion.name}_seconds" for criterion in measuring or ()),
    )

    probe_programs = probe_lib.compile_probe_programs(game, compiled) if measuring else None

    def evaluate(state: game_lib.GameState) -> list[dict[str, Any]]:
        """Each seed's evaluation on the val splits, with the columns its criteria measure
        (adda/probe.py) and the seconds they took."""
        start = time.time()
        outputs = jax.device_get(compiled.evaluate(state, source_variables, *val_batches))
        evaluations = []
        for i in range(num_seeds):
            seed_outputs = take(outputs, i)
            target_outputs, target_features = (
                values.reshape(-1, *values.shape[2:])[:num_target_val]
                for values in (seed_outputs["target_outputs"], seed_outputs["target_features"])
            )
            task_metrics = task.evaluate(target_outputs, data.target["val"])
            evaluation = {name: float(seed_outputs[name]) for name in game_columns}
            measure_start = time.time()
            if measuring:
                probe = probe_lib.Probe(
                    task=task,
                    programs=probe_programs,
                    variables=take(state, i).target_variables(),
                    target_val_images=data.target["val"]["image"],
                    target_val_outputs=target_outputs,
                    target_val_features=target_features,
                    source_val=data.source["val"],
                    evaluation=evaluation,
                    batch_size=config.eval_batch_size,
                    sharding=compiled,
                    seed=seed_configs[i].seed,
                )
                # The validators' numpy/scikit-learn work is on small matrices (a 16-feature
                # logistic regression, 1024 x 1024 similarities), which BLAS threads slow down
                # several-fold next to XLA's own threads: one thread (README, validators' cost).
                with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
                    for criterion in measuring:
                        tick = time.time()
                        evaluation.update(criterion.measure(probe))
                        evaluation[f"{criterion.name}_seconds"] = time.time() - tick
            evaluation[metric_name] = float(task_metrics[task.primary_metric])
            evaluation["validator_seconds"] = time.time() - measure_start
            evaluations.append(evaluation)
        for evaluation in evaluations:  # the whole evaluation's wall time, all seeds
            evaluation["evaluation_seconds"] = time.time() - start
        return evaluations

    def counters(state: game_lib.GameState) -> dict[str, int]:
        # Every seed takes the same steps.
        disc_steps, target_steps = seed_int(state.disc_steps, 0), seed_int(state.target_steps, 0)
        return {
            "step": disc_steps + target_steps,
            "disc_steps": disc_steps,
            "target_steps": target_steps,
        }

    def judge(state: game_lib.GameState, evaluations: list[dict], before_da: bool):
        """The evaluations through the criteria; returns the state and per seed {name:
        (is_best, score)}."""
        measured = [key for key in evaluations[0] if key not in (metric_name, *timing_columns)]
        row = {
            **{key: np.int32(value) for key, value in counters(state).items()},
            "before_da": np.bool_(before_da),
            **{name: np.float32([e[name] for e in evaluations]) for name in measured},
            "target_val_metric": np.float32([e[metric_name] for e in evaluations]),
        }
        row = {
            key: per_seed(list(np.broadcast_to(value, (num_seeds,)))) for key, value in row.items()
        }
        state, selections = compiled.criteria(state, row)
        selections = jax.device_get(selections)
        return state, [
            {
                name: (bool(np.ravel(s.is_best)[i]), float(np.ravel(s.score)[i]))
                for name, s in selections.items()
            }
            for i in range(num_seeds)
        ]

    game_manager = checkpoints.manager(workdir / "checkpoints" / "game")
    runs = [
        _SeedRun(
            config=single,
            workdir=seed_dir,
            source_stream=loader.train_batches(
                _images_only(data.source["train"]), config.batch_size, seed=2 * single.seed
            ),
            target_stream=loader.train_batches(
                _images_only(data.target["train"]), config.batch_size, seed=2 * single.seed + 1
            ),
            managers={
                criterion.name: checkpoints.manager(seed_dir / "checkpoints" / criterion.name)
                for criterion in criteria
            },
        )
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True)
    ]
    num_cycles = _number_of_cycles(config, counts["target"]["train"])
    phases = (["initial_disc"] if config.initial_disc_steps else []) + ["cycle"] * num_cycles

    def record(
        i: int, seed_state: game_lib.GameState, row: dict, picks: Mapping[str, tuple]
    ) -> None:
        """Writes seed i's row with every criterion's score; saves the picks it made."""
        row = {**row, **{f"{name}_score": score for name, (_, score) in picks.items()}}
        row = runs[i].writer.write(row)
        for name, (is_best, _) in picks.items():
            if is_best:
                checkpoints.save(
                    runs[i].managers[name], row["step"], seed_state.target_variables(), row
                )

    def save_game(state: game_lib.GameState, completed_phases: int) -> None:
        streams = {
            "source_stream": [run.source_stream.get_state() for run in runs],
            "target_stream": [run.target_stream.get_state() for run in runs],
        }
        checkpoints.save(
            game_manager,
            counters(state)["step"],
            state,
            {"completed_phases": completed_phases, **streams},
        )

    if game_manager.latest_step() is not None:
        state, meta = checkpoints.restore(game_manager, state)
        state = runtime.put(state, compiled.replicated)
        completed_phases = meta["completed_phases"]
        for i, run in enumerate(runs):
            for key in ("source_stream", "target_stream"):
                getattr(run, key).set_state(meta[key][i])
            run.writer = workdir_lib.MetricsWriter(
                run.workdir / workdir_lib.METRICS_FILE, game_manager.latest_step(), primary
            )
        logging.info("resumed after %d phases in %s", completed_phases, workdir)
    else:
        for run in runs:
            run.writer = workdir_lib.MetricsWriter(
                run.workdir / workdir_lib.METRICS_FILE, None, primary
            )
        evaluations = evaluate(state)
        state, picks = judge(state, evaluations, before_da=True)
        for i, evaluation in enumerate(evaluations):
            row = {"phase": "before_da", "cycle": 0, **counters(state), **evaluation}
            record(i, take(state, i), row, picks[i])
        completed_phases = 0
        save_game(state, completed_phases)

    progress_names = [c.name for c in criteria if getattr(c, "show_in_progress", True)]
    progress = tqdm.tqdm(
        total=len(phases),
        initial=completed_phases,
        desc=f"adda {config.scheme}" + (f" x {num_seeds} seeds" if with_seeds else ""),
        unit="cycle",
        disable=not (config.progress_bar and primary),
    )
    k_d, k_t = config.disc_steps_per_cycle, config.target_steps_per_cycle
    while completed_phases < len(phases):
        phase = phases[completed_phases]
        cycle = completed_phases + (0 if config.initial_disc_steps else 1)
        if phase == "initial_disc":
            draws = [("source_stream", config.initial_disc_steps)]
            draws.append(("target_stream", config.initial_disc_steps))
        else:
            draws = [("source_stream", k_d), ("target_stream", k_d)]
            draws += [("source_stream", k_t), ("target_stream", k_t)]
        batches = tuple(
            per_seed([_next_images(getattr(run, stream), count) for run in runs])
            for stream, count in draws
        )
        before = counters(state)
        phase_start = time.time()
        state, step_metrics = programs.play(compiled, fused, state, source_variables, batches)
        programs.check_finite(
            step_metrics,
            before,
            f"{phase} {cycle}" if phase == "cycle" else phase,
            f"{workdir / 'checkpoints' / 'game'} (step {game_manager.latest_step()})",
            seeds=[run.seed for run in runs] if with_seeds else None,
        )
        evaluations = evaluate(state)
        state, picks = judge(state, evaluations, before_da=False)
        for i, evaluation in enumerate(evaluations):
            row = {
                "phase": phase,
                "cycle": cycle,
                **counters(state),
                **evaluation,
                **{
                    f"{name}_train": float(np.mean(values if not with_seeds else values[:, i]))
                    for name, values in step_metrics.items()
                    if name in ("disc_loss", "disc_grad_norm", "target_loss", "target_grad_norm")
                },
                "disc_resets": seed_int(state.disc_opt_state.reset_count, i),
                "target_resets": seed_int(state.target_opt_state.reset_count, i),
                "seconds": time.time() - phase_start,  # the phase's steps and evaluation
            }
            record(i, take(state, i), row, picks[i])
        completed_phases += 1
        if completed_phases % config.checkpoint_every_cycles == 0 or completed_phases == len(
            phases
        ):
            save_game(state, completed_phases)
        progress.update(1)
        progress.set_postfix(
            cycle=cycle,
            **results.progress_fields(
                [run.writer.rows[-1] for run in runs], metric_name, progress_names
            ),
        )
        if cycle_hook is not None:
            cycle_hook(completed_phases)
    progress.close()
    train_seconds = time.time() - start_time

    def score(variables: Any, arrays: Mapping) -> dict:
        return results.score_maps(
            task, compiled.predict, variables, arrays, config.eval_batch_size, compiled.examples
        )

    # What each pick was chosen on: the evaluation's columns and the criteria's scores.
    bookkeeping = {*ROW_COUNTERS, "disc_resets", "target_resets", "seconds", *timing_columns}
    columns = [
        key
        for key in runs[0].writer.rows[-1]
        if key not in bookkeeping and not key.endswith("_train")
    ]
    all_results = []
    for i, run in enumerate(runs):
        criteria_results, not_reached = results.score_criteria(
            criteria,
            run.managers,
            take(state, i).target_variables(),
            lambda variables: runtime.put(variables, compiled.replicated),
            lambda variables: score(variables, data.target),
            columns,
        )
        source_scores = score(take(source_variables, i), data.source)
        seed_results = {
            "pair": results.pair_name(config),
            "scheme": config.scheme,
            "seed": run.seed,
            "primary_metric": task.primary_metric,
            "criteria": criteria_results,
            "criteria_not_reached": not_reached,
            "source_test": source_scores["test"],
            "source_val": source_scores["val"],
            "data": counts,
            "cycles": num_cycles,
            "disc_steps": seed_int(state.disc_steps, i),
            "target_steps": seed_int(state.target_steps, i),
            "devices": len(mesh.devices.ravel()),
            "hosts": jax.process_count(),
            "wall_time_s": train_seconds,
        }
        if with_seeds:
            seed_results["num_seeds_together"] = num_seeds  # trained in one program with others
        all_results.append(seed_results)
        if primary:
            workdir_lib.write_results(
                run.workdir, seed_results, {"data": counts, "wall_time_s": train_seconds}
            )
            workdir_lib.report_line(
                results.summary_line(seed_results, run.workdir), config.progress_bar
            )
    for manager in [game_manager, *(m for run in runs for m in run.managers.values())]:
        manager.close()
    if not with_seeds:
        return all_results[0]
    summary = {
        "pair": results.pair_name(config),
        "scheme": config.scheme,
        "num_seeds": num_seeds,
        "seeds": {
            str(seed_results["seed"]): {
                "source_test": seed_results["source_test"],
                "criteria": {
                    name: {"test": scored["test"], "val": scored["val"], "step": scored["step"]}
                    for name, scored in seed_results["criteria"].items()
                },
            }
            for seed_results in all_results
        },
        "seed_workdirs": [run.workdir.name for run in runs],
        "devices": len(mesh.devices.ravel()),
        "hosts": jax.process_count(),
        "wall_time_s": train_seconds,
    }
    if primary:
        workdir_lib.write_results(workdir, summary, {"data": counts, "wall_time_s": train_seconds})
    return summary
