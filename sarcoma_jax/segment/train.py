"""Supervised segmentation's loop (thesis §14.2): train a U-Net on one modality, keep the best val
F1, score it on test.

`train_and_evaluate(config, workdir)` writes into workdir:
  config.json, provenance.json   what ran (config, seed, versions, git commit)
  checkpoints/latest, /best      orbax; latest resumes a killed run exactly, best is the
                                 best-val-F1 state that the test numbers come from
  metrics.jsonl                  one line per epoch (train loss, val loss and metrics)
  results.json                   {"test": {...}, "val": {...}, "best_epoch": ...,
                                  "baseline_threshold": {...}, "test_per_image": {...}}
  training_curves.png, segmentation_examples.png (thesis Figure 15-2)
  augmented_examples.png         with config.augment.enabled: what the augmentation does

Options beyond the thesis' reference (off in its configs; the `:strong` variants set them):
`config.augment` (augment.py, applied inside the jit-compiled train step), `config.loss`
(losses.py; train and val losses are that loss) and `config.data.context_slices` (2.5D input,
data_pipeline/context.py; figures and the threshold baseline use the centre slice).

Seeds: `config.num_seeds` > 1 trains seeds config.seed, config.seed + 1, ... in one compiled step:
the state and the batches get a leading seed axis and `train_step` is mapped over it (`seed_map`:
jax.vmap, or on CPU one traced copy per seed; `config.vmap_seeds`). Each seed keeps its own
initialisation, data order, BatchNorm re-estimation, best checkpoint, metrics and results in
workdir/seed_<s>/, laid out like a single run (and equal to one up to float reassociation);
workdir/checkpoints/latest holds the stacked state, and workdir/results.json lists the seeds.
Either kind of run, killed and started again in its workdir, resumes from checkpoints/latest and
ends with the same parameters and results as an uninterrupted run.

Devices: the batch is split over `runtime.make_mesh(config)` (parameters replicated).
"""

import functools
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipeline import context, loader
from sarcoma_jax import (
    augment,
    baseline,
    checkpoints,
    figures,
    input_pipeline,
    losses,
    metrics,
    models,
    runtime,
    seed_map,
)
from sarcoma_jax import workdir as workdir_lib
from sarcoma_jax.segment import steps

# Config fields in which a resumed run may differ from the run it continues: they do not change
# the steps taken (num_epochs only says how many; raising it continues a finished run).
RESUMABLE_CONFIG_CHANGES = (
    "progress_bar",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_epochs",
)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks everything that can be checked without data or compute.

    Raises:
      ConfigError: with a one-line message saying what to change.
    """
    error = input_pipeline.ConfigError
    model_config = config.model
    if model_config.name != "unet":
        raise error(f"config.model.name {model_config.name!r}: segmentation needs 'unet'")
    if model_config.depth < 1:
        raise error(f"config.model.depth must be >= 1, got {model_config.depth}")
    for field, allowed in (
        ("downsampling", models.DOWNSAMPLING),
        ("upsampling", models.UPSAMPLING),
        ("compute_dtype", models.COMPUTE_DTYPES),
    ):
        value = model_config.get(field, allowed[0])
        if value not in allowed:
            raise error(f"config.model.{field} {value!r}; use one of {', '.join(allowed)}")
    num_seeds = config.get("num_seeds", 1)
    if not isinstance(num_seeds, int) or num_seeds < 1:
        raise error(f"config.num_seeds must be an integer >= 1, got {num_seeds!r}")
    if jax.process_count() > 1:
        raise error("segmentation runs on one host; train it there and pass it to the others")
    input_pipeline.validate_data_config(config.data, size_divisor=2**model_config.depth)
    for name in ("batch_size", "eval_batch_size", "num_epochs"):
        if config[name] < 1:
            raise error(f"config.{name} must be >= 1, got {config[name]}")
    if config.get("num_devices", 0) < 0:
        raise error(f"config.num_devices must be >= 0, got {config.num_devices}")
    runtime.check_batch_split(config, len(runtime.mesh_devices(config)))
    if config.bn_recalibration_batches < 0:
        raise error(
            f"config.bn_recalibration_batches must be >= 0, got {config.bn_recalibration_batches}"
        )
    if not config.optimizer.learning_rate > 0:
        raise error(
            f"config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}"
        )
    loss = config.get("loss", "bce")
    if loss not in losses.LOSSES:
        raise error(f"config.loss {loss!r} is unknown; use one of {', '.join(losses.LOSSES)}")
    try:
        augment.Augmentation.from_config(config.get("augment"))
    except ValueError as augment_error:
        raise error(str(augment_error)) from None


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed of a `num_seeds` run: `seed` set, `num_seeds` 1."""
    single = config.copy_and_resolve_references()
    single.seed = seed
    single.num_seeds = 1
    return single


def _load_splits(config: ml_collections.ConfigDict, index, records) -> tuple[dict, dict]:
    """The preprocessed splits, and their slice and patient counts."""
    splits = input_pipeline.load_splits(
        records,
        config.data.image_size,
        context_slices=config.data.get("context_slices", 0),
        index=index,
    )
    counts = {
        split: {
            "slices": int(arrays["image"].shape[0]),
            "patients": int(np.unique(arrays["patient_key"]).size),
        }
        for split, arrays in splits.items()
    }
    return splits, counts


def _eval_functions(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    replicated: NamedSharding,
    batched: NamedSharding,
) -> tuple[Callable, Callable]:
    """The jit-compiled evaluation step and BatchNorm-statistics step (one seed's state)."""
    eval_fn = jax.jit(
        functools.partial(
            steps.eval_step,
            batch_stats_at_eval=config.model.eval_batch_stats,
            loss=config.get("loss", "bce"),
        ),
        in_shardings=(replicated, batched),
    )
    stats_fn = jax.jit(
        functools.partial(
            steps.batch_stats_step, stats_apply_fn=model.clone(bn_momentum=0.0).apply
        ),
        in_shardings=(replicated, batched),
        out_shardings=replicated,
    )
    return eval_fn, stats_fn


def _example_indices(masks: np.ndarray, count: int) -> np.ndarray:
    """`count` slices spread over the split, in stored order (deterministic)."""
    return np.unique(np.linspace(0, masks.shape[0] - 1, min(count, masks.shape[0])).astype(int))


def _plot_augmented_examples(
    config: ml_collections.ConfigDict,
    augmentation: augment.Augmentation,
    train_data: Mapping[str, np.ndarray],
    seed: int,
    workdir: pathlib.Path,
    num_draws: int = 4,
) -> None:
    """augmented_examples.png: training slices and `num_draws` augmentations of each, as the
    train step draws them (sarcoma_jax/augment.py), from a key of the seed (the same every time)."""
    shown = _example_indices(train_data["mask"], config.num_example_slices)
    images = np.repeat(train_data["image"][shown], num_draws, axis=0)
    masks = np.repeat(train_data["mask"][shown], num_draws, axis=0)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), steps.AUGMENT_STREAM)
    augmented = jax.jit(functools.partial(augment.augment_batch, augmentation=augmentation))(
        key, images, masks
    )
    augmented_images, augmented_masks = (
        np.asarray(array).reshape(len(shown), num_draws, *array.shape[1:]) for array in augmented
    )
    figures.plot_augmented_examples(
        context.centre_channel(train_data["image"][shown]),
        train_data["mask"][shown],
        context.centre_channel(augmented_images),
        augmented_masks,
        workdir / "augmented_examples.png",
        titles=[f"{train_data['patient_key'][i]} #{i}" for i in shown],
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    step_hook: Callable[[int], None] | None = None,
) -> dict:
    """Trains, validating every epoch, then scores the best-val-F1 state on val and test.

    Started again with the same workdir, it resumes from the latest checkpoint and ends with the
    same parameters and results as an uninterrupted run.

    Args:
      config: see configs/segment_base.py.
      workdir: output folder (created).
      step_hook: called with the step number after every train step and its checkpointing
        (tests use it to interrupt a run).

    Returns:
      The results written to results.json (with seeds: the summary listing them).

    Raises:
      ConfigError: a config that cannot run (before any training compute).
    """
    validate_config(config)
    workdir = pathlib.Path(workdir)
    seeds = [config.seed + i for i in range(config.get("num_seeds", 1))]
    with_seeds = len(seeds) > 1
    # The data first: a one-line error before anything is written.
    index = input_pipeline.open_index(config.data, progress=config.progress_bar)
    records = input_pipeline.query_splits(
        index,
        config.data.modality,
        tumour_only=config.data.tumour_only,
        fold_splits=input_pipeline.patient_splits(index, config.data),
    )
    workdir_lib.start(config, workdir, RESUMABLE_CONFIG_CHANGES)
    if with_seeds:
        seed_configs = [seed_config(config, seed) for seed in seeds]
        seed_dirs = [workdir / f"seed_{seed}" for seed in seeds]
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True):
            workdir_lib.start(single, seed_dir, RESUMABLE_CONFIG_CHANGES)
    else:
        seed_configs, seed_dirs = [config], [workdir]

    splits, counts = _load_splits(config, index, records)
    train_data = splits["train"]
    logging.info("data (tumour slices / patients): %s", counts)

    model = steps.create_model(config.model)
    mesh = runtime.make_mesh(config)
    replicated = NamedSharding(mesh, P())
    one_seed_batched = NamedSharding(mesh, P(runtime.BATCH_AXIS))
    batched = NamedSharding(mesh, P(None, runtime.BATCH_AXIS)) if with_seeds else one_seed_batched
    keys = [jax.random.PRNGKey(seed) for seed in seeds]
    state = steps.create_train_state(
        jnp.stack(keys) if with_seeds else keys[0],
        model,
        train_data["image"].shape[1:],
        steps.create_optimizer(config.optimizer),
    )
    state = jax.device_put(state, replicated)
    augmentation = augment.Augmentation.from_config(config.get("augment"))
    if augmentation is not None:
        for seed, seed_dir in zip(seeds, seed_dirs, strict=True):
            _plot_augmented_examples(config, augmentation, train_data, seed, seed_dir)
    step_fn = functools.partial(
        steps.train_step, loss=config.get("loss", "bce"), augmentation=augmentation
    )
    if with_seeds:
        step_fn = seed_map.seed_map(
            step_fn, (0, 0), num_seeds=len(seeds), vmap=seed_map.use_vmap(config)
        )
    train_fn = jax.jit(
        step_fn,
        in_shardings=(replicated, batched),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn, stats_fn = _eval_functions(config, model, replicated, one_seed_batched)

    def take(tree: Any, i: int) -> Any:
        return seed_map.take(tree, i) if with_seeds else tree

    latest_manager = checkpoints.manager(workdir / "checkpoints" / "latest")
    best_managers = [checkpoints.manager(d / "checkpoints" / "best") for d in seed_dirs]
    iterators = [loader.train_batches(train_data, config.batch_size, seed=s) for s in seeds]
    loop_state = {
        "epoch_loss_sum": [0.0] * len(seeds),
        "epoch_grad_norm_sum": [0.0] * len(seeds),
        "best_val_f1": [-1.0] * len(seeds),
        "best_epoch": [None] * len(seeds),
        "train_seconds": 0.0,  # wall time of the training loop, summed over interrupted runs
    }
    resume_step = None
    if latest_manager.latest_step() is not None:
        state, meta = checkpoints.restore(latest_manager, state)
        state = jax.device_put(state, replicated)
        for iterator, iterator_state in zip(iterators, meta.pop("iterators"), strict=True):
            iterator.set_state(iterator_state)
        loop_state = meta
        resume_step = latest_manager.latest_step()
        logging.info("resumed from step %d in %s", resume_step, workdir)
    writers = [
        workdir_lib.MetricsWriter(d / workdir_lib.METRICS_FILE, resume_step) for d in seed_dirs
    ]

    steps_per_epoch = math.ceil(train_data["image"].shape[0] / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    step = resume_step or 0
    loss_sums = jnp.asarray(loop_state["epoch_loss_sum"], jnp.float32)
    grad_norm_sums = jnp.asarray(loop_state["epoch_grad_norm_sum"], jnp.float32)

    def val_f1_text() -> str:
        return " ".join(f"{w.rows[-1]['val_f1']:.3f}" if w.rows else "-" for w in writers)

    progress = tqdm.tqdm(
        total=total_steps,
        initial=step,
        desc=f"segment {config.data.modality}" + (f" x {len(seeds)} seeds" if with_seeds else ""),
        disable=not config.progress_bar,
    )
    loop_start_time = time.time()
    while step < total_steps:
        batches = [next(iterator) for iterator in iterators]
        if with_seeds:
            batch = {key: np.stack([b[key] for b in batches]) for key in batches[0]}
        else:
            batch = batches[0]
        state, step_metrics = train_fn(state, batch)
        loss_sums = loss_sums + step_metrics["loss"]
        grad_norm_sums = grad_norm_sums + step_metrics["grad_norm"]
        step += 1
        progress.update(1)
        if step % config.log_every_steps == 0:
            losses = np.atleast_1d(jax.device_get(step_metrics["loss"]))
            progress.set_postfix(loss=" ".join(f"{x:.1f}" for x in losses), val_f1=val_f1_text())

        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            # Divided in float64, the sums as float32 as they were accumulated.
            epoch_losses = np.asarray(loss_sums, np.float64) / steps_per_epoch
            epoch_grad_norms = np.asarray(grad_norm_sums, np.float64) / steps_per_epoch
            for i, seed in enumerate(seeds):
                seed_state = take(state, i)
                recalibration = (
                    0 if config.model.eval_batch_stats else config.bn_recalibration_batches
                )
                eval_state = steps.recalibrate_batch_stats(
                    stats_fn, seed_state, train_data, config.batch_size, recalibration, seed
                )
                val_metrics, _ = steps.evaluate(
                    eval_fn, eval_state, splits["val"], config.eval_batch_size
                )
                row = writers[i].write(
                    {
                        "epoch": epoch,
                        "step": step,
                        "train_loss": float(epoch_losses[i]),
                        "train_grad_norm": float(epoch_grad_norms[i]),
                        **{f"val_{name}": value for name, value in val_metrics.items()},
                    }
                )
                workdir_lib.report_line(
                    f"{f'seed {seed} ' if with_seeds else ''}epoch {epoch}: train loss "
                    f"{row['train_loss']:.1f}, val loss {val_metrics['loss']:.1f}, val F1 "
                    f"{val_metrics['f1']:.3f}, AUC {val_metrics['auc']:.3f}",
                    config.progress_bar,
                )
                if val_metrics["f1"] > loop_state["best_val_f1"][i]:
                    loop_state["best_val_f1"][i] = val_metrics["f1"]
                    loop_state["best_epoch"][i] = epoch
                    checkpoints.save(
                        best_managers[i], step, eval_state, {"epoch": epoch, "val": val_metrics}
                    )
            loss_sums = jnp.zeros_like(loss_sums)
            grad_norm_sums = jnp.zeros_like(grad_norm_sums)
            progress.set_postfix(val_f1=val_f1_text())
        if step % steps_per_epoch == 0 or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        ):
            loop_state["epoch_loss_sum"] = np.asarray(loss_sums, np.float64).tolist()
            loop_state["epoch_grad_norm_sum"] = np.asarray(grad_norm_sums, np.float64).tolist()
            loop_state["train_seconds"] += time.time() - loop_start_time
            loop_start_time = time.time()
            checkpoints.save(
                latest_manager,
                step,
                state,
                {**loop_state, "iterators": [iterator.get_state() for iterator in iterators]},
            )
        if step_hook is not None:
            step_hook(step)
    progress.close()
    train_seconds = loop_state["train_seconds"] + time.time() - loop_start_time
    latest_manager.close()

    all_results = [
        _finish(
            seed_configs[i],
            seed_dirs[i],
            take(state, i),
            best_managers[i],
            eval_fn,
            splits,
            counts,
            total_steps,
            writers[i].rows,
            train_seconds,
            label=f"seed {seeds[i]}: " if with_seeds else "",
        )
        for i in range(len(seeds))
    ]
    if not with_seeds:
        return all_results[0]
    summary = {
        "modality": config.data.modality,
        "num_seeds": len(seeds),
        "seeds": {
            str(seed): {key: results[key] for key in ("best_epoch", "val", "test")}
            for seed, results in zip(seeds, all_results, strict=True)
        },
        "devices": len(mesh.devices.ravel()),
        "train_wall_time_s": train_seconds,
        "seed_workdirs": [d.name for d in seed_dirs],
    }
    workdir_lib.write_results(
        workdir, summary, {"data": counts, "train_wall_time_s": train_seconds}
    )
    return summary


def _finish(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    state: steps.TrainState,
    best_manager,
    eval_fn: Callable,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, Any],
    total_steps: int,
    history: list[dict],
    train_seconds: float,
    label: str = "",
) -> dict:
    """Scores a finished run's best state on val and test; writes results.json and figures;
    prints a line (starting with `label`)."""
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]
    best_state, best_meta = checkpoints.restore(best_manager, state)
    best_state = jax.device_put(best_state, jax.tree.leaves(state)[0].sharding)
    best_manager.close()
    val_metrics, _ = steps.evaluate(eval_fn, best_state, val_data, config.eval_batch_size)
    test_metrics, test_logits = steps.evaluate(
        eval_fn, best_state, test_data, config.eval_batch_size
    )
    # The threshold baseline looks at the slice itself (the centre channel under 2.5D context).
    train_images, val_images, test_images = (
        context.centre_channel(split["image"]) for split in (train_data, val_data, test_data)
    )
    threshold_rule = baseline.fit_intensity_threshold(
        train_images, train_data["mask"], config.baseline_num_thresholds
    )
    test_f1_per_image = metrics.dice_per_image(test_logits >= 0.0, test_data["mask"] > 0)
    results = {
        "modality": config.data.modality,
        "seed": config.seed,
        "best_epoch": best_meta["epoch"],
        "best_step": int(best_state.step),
        "val": val_metrics,
        "test": test_metrics,
        "baseline_threshold": {
            **threshold_rule.to_dict(),
            "val": threshold_rule.evaluate(val_images, val_data["mask"]),
            "test": threshold_rule.evaluate(test_images, test_data["mask"]),
            "test_per_image": {
                "patient_key": test_data["patient_key"].tolist(),
                "f1": threshold_rule.dice_per_image(test_images, test_data["mask"]).tolist(),
            },
        },
        "test_per_image": {
            "patient_key": test_data["patient_key"].tolist(),
            "f1": test_f1_per_image.tolist(),
        },
        "data": counts,
        "epochs": config.num_epochs,
        "steps": total_steps,
        "devices": len(runtime.mesh_devices(config)),
        "train_wall_time_s": train_seconds,
    }
    workdir_lib.write_results(
        workdir, results, {"data": counts, "train_wall_time_s": train_seconds}
    )
    figures.plot_training_curves(
        history, workdir / "training_curves.png", losses.LABELS[config.get("loss", "bce")]
    )
    shown = _example_indices(test_data["mask"], config.num_example_slices)
    figures.plot_segmentation_examples(
        test_images[shown],
        test_data["mask"][shown],
        steps.probabilities(test_logits[shown]),
        workdir / "segmentation_examples.png",
        titles=[
            f"{test_data['patient_key'][i]} #{i}  F1 {test_f1_per_image[i]:.2f}" for i in shown
        ],
    )
    workdir_lib.report_line(
        f"{label}best epoch {results['best_epoch']}: test F1 {test_metrics['f1']:.3f}, accuracy "
        f"{test_metrics['accuracy']:.3f}, AUC {test_metrics['auc']:.3f}; intensity threshold: test "
        f"F1 {results['baseline_threshold']['test']['f1']:.3f}; see {workdir / 'results.json'}",
        config.progress_bar,
    )
    return results
