"""Supervised segmentation (thesis §14.2): train a U-Net on one modality, keep the best val F1.

Read top to bottom: the model, the state, the jit-compiled steps, evaluation, then the loop
`train_and_evaluate(config, workdir)`, which writes into workdir:
  config.json, provenance.json   what ran (config, seed, versions, git commit)
  checkpoints/latest, /best      orbax; latest resumes a killed run exactly, best is the
                                 best-val-F1 state that the test numbers come from
  metrics.jsonl                  one line per epoch (train loss, val loss and metrics)
  results.json                   {"test": {...}, "val": {...}, "best_epoch": ...,
                                  "baseline_threshold": {...}}
  training_curves.png, segmentation_examples.png (thesis Figure 15-2)

Devices: the batch is split over a 1-D `jax.sharding.Mesh` of the first `config.num_devices` local
devices (0: all; parameters replicated), so BatchNorm statistics and the loss are over the global
batch and the steps compute what one device computes, up to the order of float sums.
"""

import functools
import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipeline import loader
from sarcoma_jax import baseline, figures, input_pipeline, metrics, models, provenance, seed_map

# Config fields in which a resumed run may differ from the run it continues: they do not change
# the steps taken (num_epochs only says how many; raising it continues a finished run).
RESUMABLE_CONFIG_CHANGES = (
    "progress_bar",
    "log_every_steps",
    "checkpoint_every_steps",
    "num_epochs",
)
BATCH_AXIS = "batch"


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


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """Initialises params, BatchNorm statistics and optimizer state for `image_shape` (h, w, c)."""
    init = _state_initializer(model, image_shape, optimizer)
    # One jit-compiled init (eager init compiles every initializer for every shape), without XLA's
    # optimisation passes: it runs once, and they make compiling the RNG code ~10x slower.
    return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(rng)


def create_train_states(
    rngs: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, int, int],
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """`create_train_state` for a stack of keys (seeds, 2): every leaf gets a leading seed axis.

    Random numbers do not depend on vmap, so seed i's slice equals create_train_state(rngs[i]).
    """
    init = jax.vmap(_state_initializer(model, image_shape, optimizer))
    return jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})(rngs)


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


def pixel_bce_per_image(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Sigmoid binary cross-entropy summed over pixels: (batch, h, w, 1) -> (batch,)."""
    losses = optax.sigmoid_binary_cross_entropy(logits, masks.astype(logits.dtype))
    return losses.reshape(losses.shape[0], -1).sum(axis=1)


def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
    """One Adam step on the pixel BCE (summed over pixels, mean over the batch)."""
    step_rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": step_rng},
        )
        return pixel_bce_per_image(logits, batch["mask"]).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state, step_metrics


def eval_step(
    state: TrainState, batch: Mapping[str, jax.Array], batch_stats_at_eval: bool = False
) -> dict[str, jax.Array]:
    """Probabilities (batch, h, w, 1) and per-image loss (batch,) in evaluation mode.

    Args:
      state: the train state.
      batch: image and mask.
      batch_stats_at_eval: normalise with the batch's own statistics (the reference code's
        behaviour; the model must be built with eval_batch_stats=True). The default uses the
        running averages.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if batch_stats_at_eval:
        logits, _ = state.apply_fn(variables, batch["image"], train=False, mutable=["batch_stats"])
    else:
        logits = state.apply_fn(variables, batch["image"], train=False)
    return {
        "probs": jax.nn.sigmoid(logits),
        "loss_per_image": pixel_bce_per_image(logits, batch["mask"]),
    }


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


def _pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Pads a short last batch with zero images up to batch_size, so eval keeps one shape."""
    num_real = batch["image"].shape[0]
    return {
        key: np.concatenate(
            [value, np.zeros((batch_size - num_real, *value.shape[1:]), value.dtype)]
        )
        for key, value in batch.items()
    }


def predict(
    eval_fn: Callable, state: TrainState, arrays: Mapping[str, np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Runs eval_fn over a split in order.

    Every batch has `batch_size` examples (the last is padded, its padding dropped afterwards), so
    eval_fn compiles once. With batch statistics at evaluation the padding would enter the
    statistics of the last batch; the default (running averages) is unaffected.

    Returns:
      probs float32 (n, h, w, 1) and loss_per_image float32 (n,).
    """
    probs, losses = [], []
    for batch in loader.eval_batches(arrays, batch_size):
        num_real = batch["image"].shape[0]
        outputs = jax.device_get(eval_fn(state, _pad_batch(batch, batch_size)))
        probs.append(outputs["probs"][:num_real])
        losses.append(outputs["loss_per_image"][:num_real])
    return np.concatenate(probs), np.concatenate(losses)


def evaluate(
    eval_fn: Callable, state: TrainState, arrays: Mapping[str, np.ndarray], batch_size: int
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of SPEC §4 plus the mean loss over a split; also returns the probabilities."""
    probs, losses = predict(eval_fn, state, arrays, batch_size)
    split_metrics = metrics.segmentation_metrics(probs, arrays["mask"])
    split_metrics["loss"] = float(np.mean(losses))
    return split_metrics, probs


def mesh_devices(config: ml_collections.ConfigDict) -> list:
    """The first `config.num_devices` local devices (0 or unset: all of them).

    Raises:
      ConfigError: more devices asked for than there are.
    """
    devices = jax.local_devices()
    num_devices = config.get("num_devices", 0)
    if num_devices:
        if num_devices > len(devices):
            raise input_pipeline.ConfigError(
                f"config.num_devices {num_devices} but only {len(devices)} local devices"
            )
        devices = devices[:num_devices]
    return devices


def check_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError unless config.batch_size and eval_batch_size split evenly over
    `num_devices` devices."""
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % num_devices:
            raise input_pipeline.ConfigError(
                f"config.{name} {config[name]} must be divisible by the {num_devices} devices "
                "the batch is split over (or set config.num_devices)"
            )


class Shardings(NamedTuple):
    """Where the state and the batches go: `replicated` (state, parameters) and `batched`
    (batches split along their batch axis; with seeds, the axis after the seed axis)."""

    replicated: NamedSharding
    batched: NamedSharding


def shardings(config: ml_collections.ConfigDict, seed_axis: bool = False) -> Shardings:
    """The run's shardings over a 1-D mesh of `mesh_devices(config)`; `seed_axis`: batches
    carry a leading seed axis (num_seeds runs)."""
    mesh = Mesh(np.asarray(mesh_devices(config)), (BATCH_AXIS,))
    batched = P(None, BATCH_AXIS) if seed_axis else P(BATCH_AXIS)
    return Shardings(NamedSharding(mesh, P()), NamedSharding(mesh, batched))


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
    if model_config.downsampling not in models.DOWNSAMPLING:
        raise error(
            f"config.model.downsampling {model_config.downsampling!r}; "
            f"use one of {', '.join(models.DOWNSAMPLING)}"
        )
    if model_config.upsampling not in models.UPSAMPLING:
        raise error(
            f"config.model.upsampling {model_config.upsampling!r}; "
            f"use one of {', '.join(models.UPSAMPLING)}"
        )
    if model_config.get("compute_dtype", "float32") not in models.COMPUTE_DTYPES:
        raise error(
            f"config.model.compute_dtype {model_config.compute_dtype!r}; "
            f"use one of {', '.join(models.COMPUTE_DTYPES)}"
        )
    if config.get("num_seeds", 1) < 1:
        raise error(f"config.num_seeds must be >= 1, got {config.num_seeds}")
    input_pipeline.validate_data_config(config.data, size_divisor=2**model_config.depth)
    for name in ("batch_size", "eval_batch_size", "num_epochs"):
        if config[name] < 1:
            raise error(f"config.{name} must be >= 1, got {config[name]}")
    if config.get("num_devices", 0) < 0:
        raise error(f"config.num_devices must be >= 0, got {config.num_devices}")
    check_batch_split(config, len(mesh_devices(config)))
    if config.bn_recalibration_batches < 0:
        raise error(
            f"config.bn_recalibration_batches must be >= 0, got {config.bn_recalibration_batches}"
        )
    if not config.optimizer.learning_rate > 0:
        raise error(
            f"config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}"
        )


def write_config(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    ignored_keys: Sequence[str] = RESUMABLE_CONFIG_CHANGES,
) -> None:
    """Writes config.json, refusing a workdir that holds a run of another config.

    Args:
      config: the run's config.
      workdir: the run's folder.
      ignored_keys: top-level fields a resumed run may change (budgets, logging).

    Raises:
      ConfigError: the workdir's config.json differs in another field.
    """
    config_dict = json.loads(config.to_json())
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())

        def comparable(values: Mapping[str, Any]) -> dict:
            return {key: value for key, value in values.items() if key not in ignored_keys}

        if comparable(previous) != comparable(config_dict):
            raise input_pipeline.ConfigError(
                f"{workdir} holds a run with another config (see its config.json); "
                "use a new --workdir to start a different run"
            )
    path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    # Synchronous saves: a run killed right after a save must find it complete; states are small.
    # A save cut short by a kill leaves a temporary folder, removed when the manager opens.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _save(manager: ocp.CheckpointManager, state: TrainState, loop_state: Mapping) -> None:
    """Saves state and a JSON loop state at the state's step (replacing a save of that step, which a
    resumed run makes again when it was killed between two saves of one step)."""
    if int(state.step) in manager.all_steps():
        manager.delete(int(state.step))
    manager.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            loop=ocp.args.JsonSave(dict(loop_state)),
        ),
    )


def _restore(manager: ocp.CheckpointManager, template: TrainState) -> tuple[TrainState, dict]:
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(template)
    )
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), loop=ocp.args.JsonRestore()
        ),
    )
    # Through the host: restored arrays are committed to a device, fresh ones are not, and jit would
    # compile its steps again for the difference.
    state_dict = jax.tree.map(jnp.asarray, jax.device_get(restored.state))
    return flax.serialization.from_state_dict(template, state_dict), restored.loop


def _example_indices(masks: np.ndarray, count: int) -> np.ndarray:
    """`count` slices spread over the split, in stored order (deterministic)."""
    return np.unique(np.linspace(0, masks.shape[0] - 1, min(count, masks.shape[0])).astype(int))


def report_line(message: str, show: bool) -> None:
    """Logs a line, and shows it under the progress bar when there is one."""
    logging.info(message)
    if show:
        tqdm.tqdm.write(message)


def _write_metrics_jsonl(path: pathlib.Path, history: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in history))


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
      The results dict written to results.json.

    Raises:
      ConfigError: a config that cannot run (before any training compute).
    """
    validate_config(config)
    workdir = pathlib.Path(workdir)
    if config.get("num_seeds", 1) > 1:
        return _train_seeds(config, workdir)
    records = _open_run(config, workdir)

    splits, counts = _load_splits(config, records)
    train_data = splits["train"]
    logging.info("data (tumour slices / patients): %s", counts)

    model = create_model(config.model)
    placement = shardings(config)
    state = create_train_state(
        jax.random.PRNGKey(config.seed),
        model,
        train_data["image"].shape[1:],
        create_optimizer(config.optimizer),
    )
    state = jax.device_put(state, placement.replicated)
    train_fn = jax.jit(
        train_step,
        in_shardings=(placement.replicated, placement.batched),
        out_shardings=(placement.replicated, placement.replicated),
        donate_argnums=0,
    )
    eval_fn, stats_fn = _eval_functions(config, model, placement)

    latest_manager = _checkpoint_manager(workdir / "checkpoints" / "latest")
    best_manager = _checkpoint_manager(workdir / "checkpoints" / "best")
    train_iterator = loader.train_batches(train_data, config.batch_size, seed=config.seed)
    loop_state = {
        "epoch_loss_sum": 0.0,
        "epoch_grad_norm_sum": 0.0,
        "best_val_f1": -1.0,
        "best_epoch": None,
        "history": [],
        "train_seconds": 0.0,  # wall time of the training loop, summed over interrupted runs
    }
    if latest_manager.latest_step() is not None:
        state, loop_state = _restore(latest_manager, state)
        state = jax.device_put(state, placement.replicated)
        train_iterator.set_state(loop_state.pop("train_iterator"))
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    history = loop_state["history"]
    _write_metrics_jsonl(workdir / "metrics.jsonl", history)

    steps_per_epoch = math.ceil(train_data["image"].shape[0] / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    step = int(state.step)
    loss_sum = jnp.asarray(loop_state["epoch_loss_sum"], jnp.float32)
    grad_norm_sum = jnp.asarray(loop_state["epoch_grad_norm_sum"], jnp.float32)
    val_f1_text = f"{history[-1]['val_f1']:.3f}" if history else "-"
    progress = tqdm.tqdm(
        total=total_steps,
        initial=step,
        desc=f"segment {config.data.modality}",
        disable=not config.progress_bar,
    )

    loop_start_time = time.time()
    while step < total_steps:
        state, step_metrics = train_fn(state, next(train_iterator))
        loss_sum = loss_sum + step_metrics["loss"]
        grad_norm_sum = grad_norm_sum + step_metrics["grad_norm"]
        step += 1
        progress.update(1)
        if step % config.log_every_steps == 0:
            progress.set_postfix(loss=f"{float(step_metrics['loss']):.1f}", val_f1=val_f1_text)

        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            eval_state, val_metrics, row = _validate_epoch(
                config,
                eval_fn,
                stats_fn,
                state,
                splits,
                config.seed,
                {
                    "epoch": epoch,
                    "step": step,
                    "train_loss": float(loss_sum) / steps_per_epoch,
                    "train_grad_norm": float(grad_norm_sum) / steps_per_epoch,
                },
                history,
                workdir / "metrics.jsonl",
            )
            loss_sum = jnp.zeros((), jnp.float32)
            grad_norm_sum = jnp.zeros((), jnp.float32)
            val_f1_text = f"{val_metrics['f1']:.3f}"
            progress.set_postfix(loss=f"{row['train_loss']:.1f}", val_f1=val_f1_text)
            report_line(
                f"epoch {epoch}: train loss {row['train_loss']:.1f}, val loss "
                f"{val_metrics['loss']:.1f}, val F1 {val_metrics['f1']:.3f}, "
                f"AUC {val_metrics['auc']:.3f}",
                config.progress_bar,
            )
            if val_metrics["f1"] > loop_state["best_val_f1"]:
                loop_state["best_val_f1"] = val_metrics["f1"]
                loop_state["best_epoch"] = epoch
                _save(best_manager, eval_state, {"epoch": epoch, "val": val_metrics})
        if step % steps_per_epoch == 0 or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        ):
            loop_state["epoch_loss_sum"] = float(loss_sum)
            loop_state["epoch_grad_norm_sum"] = float(grad_norm_sum)
            loop_state["train_seconds"] += time.time() - loop_start_time
            loop_start_time = time.time()
            _save(
                latest_manager,
                state,
                {**loop_state, "train_iterator": train_iterator.get_state()},
            )
        if step_hook is not None:
            step_hook(step)
    progress.close()
    train_seconds = loop_state["train_seconds"] + time.time() - loop_start_time

    latest_manager.close()
    results = _finish(
        config,
        workdir,
        state,
        best_manager,
        eval_fn,
        splits,
        counts,
        total_steps,
        history,
        train_seconds,
    )
    return results


def _open_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list:
    """Opens the data (one-line errors before anything is written), then starts the workdir:
    config.json (refusing another config's workdir) and provenance.json. Returns the records."""
    index = input_pipeline.open_index(config.data, progress=config.progress_bar)
    records = input_pipeline.query_splits(
        index, config.data.modality, tumour_only=config.data.tumour_only
    )
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(config, workdir)
    provenance.write(workdir / "provenance.json", provenance.collect(config, config.seed))
    return records


def _eval_functions(
    config: ml_collections.ConfigDict, model: nn.Module, placement: Shardings
) -> tuple[Callable, Callable]:
    """The jit-compiled evaluation step and BatchNorm-statistics step of `model` (one seed's
    state, batches split over the devices)."""
    in_shardings = (placement.replicated, placement.batched)
    eval_fn = jax.jit(
        functools.partial(eval_step, batch_stats_at_eval=config.model.eval_batch_stats),
        in_shardings=in_shardings,
    )
    stats_fn = jax.jit(
        functools.partial(batch_stats_step, stats_apply_fn=model.clone(bn_momentum=0.0).apply),
        in_shardings=in_shardings,
        out_shardings=placement.replicated,
    )
    return eval_fn, stats_fn


def _validate_epoch(
    config: ml_collections.ConfigDict,
    eval_fn: Callable,
    stats_fn: Callable,
    state: TrainState,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    seed: int,
    train_row: Mapping[str, Any],
    history: list[dict],
    metrics_path: pathlib.Path,
) -> tuple[TrainState, dict[str, float], dict]:
    """End of an epoch: re-estimates BatchNorm, scores val, appends the row to history and to
    metrics.jsonl. Returns the evaluated state, the val metrics and the row."""
    recalibration_batches = 0 if config.model.eval_batch_stats else config.bn_recalibration_batches
    eval_state = recalibrate_batch_stats(
        stats_fn, state, splits["train"], config.batch_size, recalibration_batches, seed
    )
    val_metrics, _ = evaluate(eval_fn, eval_state, splits["val"], config.eval_batch_size)
    row = {**train_row, **{f"val_{name}": value for name, value in val_metrics.items()}}
    history.append(row)
    with open(metrics_path, "a") as metrics_file:
        metrics_file.write(json.dumps(row) + "\n")
    return eval_state, val_metrics, row


def _finish(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    state: TrainState,
    best_manager: ocp.CheckpointManager,
    eval_fn: Callable,
    splits: Mapping[str, Mapping[str, np.ndarray]],
    counts: Mapping[str, Any],
    total_steps: int,
    history: list[dict],
    train_seconds: float,
) -> dict:
    """Scores a finished run's best state on val and test; writes results.json and figures."""
    train_data, val_data, test_data = splits["train"], splits["val"], splits["test"]
    best_state, best_loop = _restore(best_manager, state)
    best_state = jax.device_put(best_state, jax.tree.leaves(state)[0].sharding)
    val_metrics, _ = evaluate(eval_fn, best_state, val_data, config.eval_batch_size)
    test_metrics, test_probs = evaluate(eval_fn, best_state, test_data, config.eval_batch_size)
    threshold_rule = baseline.fit_intensity_threshold(
        train_data["image"], train_data["mask"], config.baseline_num_thresholds
    )
    test_f1_per_image = metrics.dice_per_image(test_probs >= 0.5, test_data["mask"] > 0)
    results = {
        "modality": config.data.modality,
        "seed": config.seed,
        "best_epoch": best_loop["epoch"],
        "best_step": int(best_state.step),
        "val": val_metrics,
        "test": test_metrics,
        "baseline_threshold": {
            **threshold_rule.to_dict(),
            "val": threshold_rule.evaluate(val_data["image"], val_data["mask"]),
            "test": threshold_rule.evaluate(test_data["image"], test_data["mask"]),
        },
        "test_per_image": {
            "patient_key": test_data["patient_key"].tolist(),
            "f1": test_f1_per_image.tolist(),
        },
        "data": counts,
        "epochs": config.num_epochs,
        "steps": total_steps,
        "devices": len(mesh_devices(config)),
        "train_wall_time_s": train_seconds,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    figures.plot_training_curves(history, workdir / "training_curves.png")
    shown = _example_indices(test_data["mask"], config.num_example_slices)
    figures.plot_segmentation_examples(
        test_data["image"][shown],
        test_data["mask"][shown],
        test_probs[shown],
        workdir / "segmentation_examples.png",
        titles=[
            f"{test_data['patient_key'][i]} #{i}  F1 {test_f1_per_image[i]:.2f}" for i in shown
        ],
    )
    provenance.add(
        workdir / "provenance.json", {"data": counts, "train_wall_time_s": train_seconds}
    )
    best_manager.close()
    report_line(
        f"best epoch {results['best_epoch']}: test F1 {test_metrics['f1']:.3f}, accuracy "
        f"{test_metrics['accuracy']:.3f}, AUC {test_metrics['auc']:.3f}; intensity threshold: test "
        f"F1 {results['baseline_threshold']['test']['f1']:.3f}; see {workdir / 'results.json'}",
        config.progress_bar,
    )
    return results


def _load_splits(config: ml_collections.ConfigDict, records) -> tuple[dict, dict]:
    """The preprocessed splits, and their slice and patient counts."""
    splits = input_pipeline.load_splits(records, config.data.image_size)
    counts = {
        split: {
            "slices": int(arrays["image"].shape[0]),
            "patients": int(np.unique(arrays["patient_key"]).size),
        }
        for split, arrays in splits.items()
    }
    return splits, counts


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed of a `num_seeds` run: `seed` set, `num_seeds` 1."""
    single = config.copy_and_resolve_references()
    single.seed = seed
    single.num_seeds = 1
    return single


def _train_seeds(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """`config.num_seeds` seeds (config.seed, config.seed + 1, ...) in one compiled train step.

    The train state and the batches get a leading seed axis and `train_step` is mapped over it
    (`seed_map`: jax.vmap, or on CPU one traced copy per seed; `config.vmap_seeds`), so one
    jit-compiled call trains every seed; each seed keeps its own initialisation, data order,
    BatchNorm re-estimation, best-val-F1 checkpoint and results, in `workdir/seed_<s>/`, laid out
    like a single run (and equal to one up to float reassociation; tests/train_segment_test.py).
    `workdir/results.json` lists the seeds' test metrics. A killed run starts again from scratch
    (only single-seed runs keep a resumable checkpoint).
    """
    seeds = [config.seed + i for i in range(config.num_seeds)]
    records = _open_run(config, workdir)
    seed_configs = [seed_config(config, seed) for seed in seeds]
    seed_dirs = [workdir / f"seed_{seed}" for seed in seeds]
    for single, seed_dir in zip(seed_configs, seed_dirs, strict=True):
        seed_dir.mkdir(exist_ok=True)
        write_config(single, seed_dir)
        provenance.write(seed_dir / "provenance.json", provenance.collect(single, single.seed))
        shutil.rmtree(seed_dir / "checkpoints", ignore_errors=True)  # an interrupted attempt

    splits, counts = _load_splits(config, records)
    train_data = splits["train"]
    model = create_model(config.model)
    placement = shardings(config, seed_axis=True)
    states = create_train_states(
        jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]),
        model,
        train_data["image"].shape[1:],
        create_optimizer(config.optimizer),
    )
    states = jax.device_put(states, placement.replicated)
    train_fn = jax.jit(
        seed_map.seed_map(train_step, (0, 0), num_seeds=len(seeds), vmap=seed_map.use_vmap(config)),
        in_shardings=(placement.replicated, placement.batched),
        out_shardings=(placement.replicated, placement.replicated),
        donate_argnums=0,
    )
    eval_fn, stats_fn = _eval_functions(config, model, shardings(config))
    iterators = [loader.train_batches(train_data, config.batch_size, seed=seed) for seed in seeds]
    best_managers = [_checkpoint_manager(d / "checkpoints" / "best") for d in seed_dirs]
    histories: list[list[dict]] = [[] for _ in seeds]
    best_val_f1 = [-1.0] * len(seeds)
    for seed_dir in seed_dirs:
        _write_metrics_jsonl(seed_dir / "metrics.jsonl", [])

    steps_per_epoch = math.ceil(train_data["image"].shape[0] / config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    loss_sums = jnp.zeros(len(seeds), jnp.float32)
    grad_norm_sums = jnp.zeros(len(seeds), jnp.float32)
    progress = tqdm.tqdm(
        total=total_steps,
        desc=f"segment {config.data.modality} x {len(seeds)} seeds",
        disable=not config.progress_bar,
    )
    start = time.time()
    for step in range(1, total_steps + 1):
        batches = [next(iterator) for iterator in iterators]
        stacked = {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}
        states, step_metrics = train_fn(states, stacked)
        loss_sums = loss_sums + step_metrics["loss"]
        grad_norm_sums = grad_norm_sums + step_metrics["grad_norm"]
        progress.update(1)
        if step % steps_per_epoch:
            continue
        epoch = step // steps_per_epoch
        # Divided in float64, as a single run divides its float(sum): the rows are the same.
        epoch_losses = np.asarray(loss_sums, np.float64) / steps_per_epoch
        epoch_grad_norms = np.asarray(grad_norm_sums, np.float64) / steps_per_epoch
        for i, seed in enumerate(seeds):
            state = seed_map.take(states, i)
            eval_state, val_metrics, _ = _validate_epoch(
                config,
                eval_fn,
                stats_fn,
                state,
                splits,
                seed,
                {
                    "epoch": epoch,
                    "step": step,
                    "train_loss": float(epoch_losses[i]),
                    "train_grad_norm": float(epoch_grad_norms[i]),
                },
                histories[i],
                seed_dirs[i] / "metrics.jsonl",
            )
            if val_metrics["f1"] > best_val_f1[i]:
                best_val_f1[i] = val_metrics["f1"]
                _save(best_managers[i], eval_state, {"epoch": epoch, "val": val_metrics})
        loss_sums = jnp.zeros_like(loss_sums)
        grad_norm_sums = jnp.zeros_like(grad_norm_sums)
        progress.set_postfix(val_f1=" ".join(f"{row[-1]['val_f1']:.2f}" for row in histories))
    progress.close()
    train_seconds = time.time() - start

    template = seed_map.take(states, 0)
    per_seed = {}
    for i, seed in enumerate(seeds):
        results = _finish(
            seed_configs[i],
            seed_dirs[i],
            template,
            best_managers[i],
            eval_fn,
            splits,
            counts,
            total_steps,
            histories[i],
            train_seconds,
        )
        per_seed[str(seed)] = {key: results[key] for key in ("best_epoch", "val", "test")}
    summary = {
        "modality": config.data.modality,
        "num_seeds": len(seeds),
        "seeds": per_seed,
        "devices": len(mesh_devices(config)),
        "train_wall_time_s": train_seconds,
        "seed_workdirs": [d.name for d in seed_dirs],
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    provenance.add(
        workdir / "provenance.json", {"data": counts, "train_wall_time_s": train_seconds}
    )
    return summary
