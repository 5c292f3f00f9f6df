"""ADDA (thesis §10.1, §14.3, SPEC §4): the generic adversarial game, momentum reset, stop criteria.

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
    agree with training mode (tests/train_adda_test.py checks it). Running averages are an option
    ('running') for comparison.
  * The target map is applied in evaluation mode (`target_map_train_mode=False`: BatchNorm with the
    running averages it inherited from the source map), so at the start the target map is exactly
    the source map and the only thing adaptation changes is its parameters. True applies it in
    training mode (batch statistics, dropout, running averages updated by the target steps).

Evaluations: once before DA (row phase 'before_da'), after the initial discriminator steps
('initial_disc') and after every cycle ('cycle'). Each computes on the val splits: the
discriminator's recall (source val labelled source) and specificity (target val labelled target)
afresh over the whole splits, its cross-entropy, the target adversarial loss on target val, and the
target map's primary metric on target val (the oracle's signal). All but 'before_da' feed the
rolling confusion window (`confusion.push`). Stopping criteria, all from one run, each checkpointed
when it improves: `initial` (before DA), `confusion` (highest window score once the discriminator
has taken more than `confusion_delay` steps and the window is full), `best_loss` (lowest target
adversarial loss on target val after >= `best_loss_min_target_steps` target steps), `latest`, and
`highest_peak` (best target val metric; an ORACLE that uses target labels, a ceiling only).

The Task protocol. Everything problem-specific sits behind a small object (see `Task`); the game
builds the maps from `config.model` and the discriminator from `config.discriminator`
(`models.create`). `SegmentationTask` is the sarcoma one; another task plugs in by setting
`config.task` to 'package.module:Factory' (a callable returning a Task, e.g. a class) or by
passing `task=` to `train_and_evaluate`. A Task has:
  primary_metric: str                    name of the metric selection and the oracle use ('f1')
  validate_config(config) -> None        raise input_pipeline.ConfigError (one line) before compute
  load_data(config) -> DomainData        source and target arrays per split ('train', 'val',
                                         'test'); each a dict with 'image' (n, ...) float32 and
                                         whatever labels `evaluate` needs; the same scaling for
                                         both domains
  source_variables(config, workdir, data) -> {'params': ..., 'batch_stats': ...}
                                         the trained source map (load config.source_checkpoint or
                                         train it, e.g. into workdir / 'source'); 'batch_stats'
                                         may be {}
  evaluate(outputs, arrays) -> dict[str, float]
                                         metrics of map outputs (n, ...) (logits, in the order of
                                         arrays) against arrays' labels; must contain
                                         primary_metric
  per_image(outputs, arrays) -> dict[str, list]   (optional) per-example test metrics, written
                                         as criteria[name]['test_per_image'] (box plots)
  prepare_seeds(config, workdir, seed_configs) -> seed_configs
                                         (optional) before a `num_seeds` run reads its source
                                         maps: e.g. train them all at once (SegmentationTask)

Performance (issue 6): a cycle runs as one compiled call (`run_cycle`: `lax.scan` over the stacked
k_d and k_t batches, the state donated); `fused_cycles=False` runs one call per step with the same
numbers, and is what `fused_cycles=None` (the default) picks on CPU, where XLA runs convolution
gradients inside a loop 7x slower (jax#12868; benchmarks/README.md). Batches are sharded over a
1-D `jax.sharding.Mesh` of the local devices (axis 'batch', parameters replicated; `num_devices`,
0 = all), so BatchNorm statistics and losses are over the global batch. Several hosts
(`config.distributed`, main.initialize_distributed): the mesh spans every device of every host;
each host loads the same data and draws the same batches, and hands its own devices their part
(`_put`); only the first host writes files (checkpoints are saved by all, as orbax requires).
The whole game state is one pytree (`GameState`), so `config.num_seeds` > 1 plays the game of
several seeds (config.seed, config.seed + 1, ...) in one program: the states are stacked and
every step, cycle, evaluation and criterion update is mapped over the seed axis (`seed_map`:
jax.vmap, or on CPU one traced copy per seed, `config.vmap_seeds`); each seed has
its own data order, source map, metrics, criterion checkpoints and results in workdir/seed_<s>/
(laid out like a single run; equal to one up to float reassociation), and workdir/results.json
lists them.

Outputs in workdir:
  config.json, provenance.json     what ran
  source/                          the source segmentation run (when not given a checkpoint)
  checkpoints/game/                the full game state for resuming (latest only)
  checkpoints/<criterion>/         target map variables of each stopping criterion
  metrics.jsonl                    one row per evaluation: phase, cycle, step (= disc_steps +
                                   target_steps), disc_steps, target_steps, disc_loss, recall,
                                   specificity, target_adversarial_loss, target_val_<metric>
                                   (val split); confusion_score (NaN -> null until the window
                                   is full), <disc|target>_<loss|grad_norm>_train (means over
                                   the phase's steps), disc_resets, target_resets, seconds
  results.json                     {"criteria": {name: {"step", "test", "val", ...}},
                                    "source_test": ..., "source_val": ..., "scheme", "pair", ...}
With num_seeds > 1: checkpoints/game holds the stacked state, source/ the seeds' source runs
(one num_seeds segmentation run), seed_<s>/ each seed's config, provenance, metrics.jsonl,
checkpoints/<criterion>/ and results.json, and results.json lists the seeds.
A run killed and started again with the same workdir resumes from checkpoints/game (the confusion
window, criteria, reset counters, rng and data position are all in it) and ends with the same
results as an uninterrupted run. A NaN or inf loss stops the run with `NonFiniteLossError` naming
the network and step; checkpoints/game keeps the last good state.
"""

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.special
import tqdm
from absl import logging
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipeline import datasets, loader
from data_pipeline.vocabulary import SPLITS
from sarcoma_jax import (
    confusion,
    input_pipeline,
    metrics,
    models,
    optim,
    provenance,
    seed_map,
    train_segment,
)

SCHEMES = ("adda", "reset")
CRITERIA = ("initial", "confusion", "best_loss", "latest", "highest_peak")
RESET_WHEN = ("never", "cycle_start", "every", "after_at_least")
DISCRIMINATOR_EVAL_BN = ("batch", "running")
BATCH_AXIS = "batch"
# Config fields that do not change results; a resumed run may differ from the original in these.
COSMETIC_CONFIG_KEYS = ("progress_bar", "distributed")  # no effect on the numbers

ConfigError = input_pipeline.ConfigError


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; `str(e)` is one line naming the network, the step and the kept
    checkpoint."""


class DomainData(NamedTuple):
    """Arrays of both domains: `source[split]` and `target[split]` for split in SPLITS.

    Each is a dict with 'image' (n, ...) float32 and the labels `Task.evaluate` reads.
    """

    source: Mapping[str, Mapping[str, np.ndarray]]
    target: Mapping[str, Mapping[str, np.ndarray]]


class Task(Protocol):
    """The problem-specific part of the game; see the module docstring."""

    primary_metric: str

    def validate_config(self, config: ml_collections.ConfigDict) -> None: ...

    def load_data(self, config: ml_collections.ConfigDict) -> DomainData: ...

    def source_variables(
        self, config: ml_collections.ConfigDict, workdir: pathlib.Path, data: DomainData
    ) -> dict: ...

    def evaluate(
        self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]
    ) -> dict[str, float]: ...


# ---------------------------------------------------------------------------------------------
# The sarcoma task: segmentation maps between modalities.


def _canonical_domain(config_field: str, value: str) -> str:
    try:
        return datasets.canonical_domain(value)
    except datasets.DatasetError as error:
        raise ConfigError(f"config.data.{config_field}: {error}") from None


def resolve_segmentation_checkpoint(path: str | pathlib.Path) -> pathlib.Path:
    """The 'state' folder of a segmentation run's checkpoint (sarcoma_jax.train_segment).

    Args:
      path: the run's workdir (its checkpoints/best is used), a checkpoint folder such as
        W/checkpoints/best (its newest step), one step folder in it, or that step's 'state'.

    Raises:
      ConfigError: nothing there, or no checkpoint in it.
    """
    root = pathlib.Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"source checkpoint not found: {path} (config.source_checkpoint)")
    if root.name == "state" and root.is_dir():
        return root
    for folder in (root / "checkpoints" / "best", root):
        if (folder / "state").is_dir():
            return folder / "state"
        if folder.is_dir():
            steps = [
                int(child.name)
                for child in folder.iterdir()
                if child.name.isdigit() and (child / "state").is_dir()
            ]
            if steps:
                return folder / str(max(steps)) / "state"
    raise ConfigError(
        f"no segmentation checkpoint in {path} (config.source_checkpoint): expected a workdir "
        "with checkpoints/best, a checkpoint folder, or one of its steps"
    )


def _segmentation_run_modality(state_dir: pathlib.Path) -> str | None:
    """The modality in the config.json of the run a checkpoint belongs to, if it can be found."""
    for folder in state_dir.parents:
        config_path = folder / "config.json"
        if config_path.is_file():
            modality = json.loads(config_path.read_text()).get("data", {}).get("modality")
            return None if modality is None else datasets.canonical_domain(modality)
    return None


def _disjoint_patient_groups(
    source_patients: set[str], target_patients: set[str], seed: int
) -> tuple[set[str], set[str]]:
    """Splits training patients so that no patient gives images to both domains.

    Patients with images of both domains are ranked by sha256(seed:key) (as data_pipeline's
    splits are) and dealt alternately to the source and the target; the others stay where they
    are.
    """
    shared = sorted(
        source_patients & target_patients,
        key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(),
    )
    to_source = set(shared[0::2])
    to_target = set(shared[1::2])
    return (source_patients - to_target), (target_patients - to_source)


class SegmentationTask:
    """Tumour segmentation, one modality to another (the thesis' experiments).

    Config: `config.data.source_modality` / `target_modality` and the data fields of
    configs/segment_base.py; `config.model` a U-Net; `config.source` the segmentation config that
    trains the source map into workdir/source (train_segment), unless `config.source_checkpoint`
    names a segmentation run to reuse. `config.data.disjoint_domains`: source and target training
    images from disjoint patients.
    """

    primary_metric = "f1"

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        source = _canonical_domain("source_modality", config.data.source_modality)
        target = _canonical_domain("target_modality", config.data.target_modality)
        if source == target:
            raise ConfigError(
                f"config.data.source_modality and target_modality are both {source}; "
                "adaptation needs two different domains"
            )
        if config.model.name != "unet":
            raise ConfigError(f"config.model.name {config.model.name!r}: segmentation needs 'unet'")
        if config.model.get("eval_batch_stats"):
            raise ConfigError(
                "config.model.eval_batch_stats: the ADDA game applies the maps with their running "
                "averages; train the source with eval_batch_stats=False"
            )
        input_pipeline.validate_data_config(
            {**config.data.to_dict(), "modality": source}, size_divisor=2**config.model.depth
        )
        if config.source_checkpoint:
            state_dir = resolve_segmentation_checkpoint(config.source_checkpoint)
            run_modality = _segmentation_run_modality(state_dir)
            if run_modality is not None and run_modality != source:
                raise ConfigError(
                    f"config.source_checkpoint {config.source_checkpoint} is a {run_modality} "
                    f"segmentation run, but the source modality is {source}"
                )
        else:
            if jax.process_count() > 1:
                raise ConfigError(
                    "a multi-host run needs config.source_checkpoint: train the source segmenter "
                    "first (on one host), then pass its workdir"
                )
            train_segment.validate_config(config.source)

    def load_data(self, config: ml_collections.ConfigDict) -> DomainData:
        data_config = config.data
        index = input_pipeline.open_index(data_config, progress=config.progress_bar)
        records = {
            domain: input_pipeline.query_splits(
                index, data_config[f"{domain}_modality"], tumour_only=data_config.tumour_only
            )
            for domain in ("source", "target")
        }
        if data_config.disjoint_domains:
            source_patients, target_patients = _disjoint_patient_groups(
                {record.patient_key for record in records["source"]["train"]},
                {record.patient_key for record in records["target"]["train"]},
                data_config.seed,
            )
            for domain, keep in (("source", source_patients), ("target", target_patients)):
                records[domain]["train"] = [
                    record for record in records[domain]["train"] if record.patient_key in keep
                ]
                if not records[domain]["train"]:
                    raise ConfigError(
                        f"config.data.disjoint_domains leaves no {domain} training slices; "
                        "use more patients"
                    )
        arrays = {
            domain: input_pipeline.load_splits(domain_records, data_config.image_size)
            for domain, domain_records in records.items()
        }
        return DomainData(source=arrays["source"], target=arrays["target"])

    def source_variables(
        self, config: ml_collections.ConfigDict, workdir: pathlib.Path, data: DomainData
    ) -> dict:
        del data  # The segmentation run loads its own.
        if config.source_checkpoint:
            state_dir = resolve_segmentation_checkpoint(config.source_checkpoint)
        else:
            source_workdir = workdir / "source"
            if not (source_workdir / "results.json").is_file():
                logging.info("training the source map into %s", source_workdir)
                train_segment.train_and_evaluate(config.source, source_workdir)
            state_dir = resolve_segmentation_checkpoint(source_workdir)
        restored = ocp.StandardCheckpointer().restore(state_dir.resolve())
        return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}

    def prepare_seeds(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        seed_configs: list[ml_collections.ConfigDict],
    ) -> list[ml_collections.ConfigDict]:
        """A `num_seeds` run's source maps: one num_seeds segmentation run of all the seeds into
        workdir/source (train_segment, `num_seeds`), which each seed's config then names as its
        source_checkpoint (unless config.source_checkpoint already gives one to all)."""
        if config.source_checkpoint:
            return seed_configs
        source_workdir = workdir / "source"
        if not (source_workdir / "results.json").is_file():
            source_config = config.source.copy_and_resolve_references()
            source_config.seed = seed_configs[0].seed
            source_config.num_seeds = len(seed_configs)
            logging.info("training %d source maps into %s", len(seed_configs), source_workdir)
            train_segment.train_and_evaluate(source_config, source_workdir)
        for seed_config in seed_configs:
            seed_config.source_checkpoint = str(source_workdir / f"seed_{seed_config.seed}")
        return seed_configs

    def evaluate(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        return metrics.segmentation_metrics(scipy.special.expit(outputs), arrays["mask"])

    def per_image(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, list]:
        """Per test image F1 (Dice), for the §15-3 box plots (report.plot_da_boxplots)."""
        # Thresholded as in `evaluate`, so that their mean is its f1.
        dice = metrics.dice_per_image(scipy.special.expit(outputs) >= 0.5, arrays["mask"] > 0)
        return {"f1": dice.tolist()}


TASKS: Mapping[str, Callable[[], Task]] = {"segmentation": SegmentationTask}


def get_task(name: str) -> Task:
    """A Task from TASKS by name, or from an import path 'package.module:Factory'.

    Raises:
      ConfigError: unknown name or path.
    """
    if name in TASKS:
        return TASKS[name]()
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ConfigError(
            f"config.task {name!r} is unknown; use one of {', '.join(TASKS)} or 'module:Factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"config.task {name!r} cannot be imported: {error}") from None
    return factory()


# ---------------------------------------------------------------------------------------------
# The game: static parts, state, and the jit-compiled steps.


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


class GameState(flax.struct.PyTreeNode):
    """Everything that changes during the game, as one pytree (checkpointed whole).

    Attributes:
      target_params, target_batch_stats: the target map's variables.
      target_opt_state: its optimizer state (`optim.MomentumResetState`, so reset counters too).
      disc_params, disc_batch_stats, disc_opt_state: the discriminator's.
      disc_steps, target_steps: updates made so far (int32 scalars).
      rng: base PRNG key; step keys are fold_in(fold_in(rng, network), steps of that network).
      window: the rolling confusion window (recall, specificity per evaluation).
      confusion_stop, best_loss, highest_peak: the stopping criteria's bests so far.
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
    window: confusion.ConfusionWindow
    confusion_stop: confusion.ConfusionStop
    best_loss: confusion.BestLoss
    highest_peak: confusion.HighestPeak

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


def create_game(config: ml_collections.ConfigDict) -> Game:
    """The networks and optimizers that `config` describes, with the scheme's reset schedules."""
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
    )


def create_game_state(
    rng: jax.Array,
    game: Game,
    source_variables: Mapping[str, Any],
    input_shape: tuple[int, ...],
    window_size: int = confusion.CONFUSION_WINDOW_SIZE,
) -> GameState:
    """The state before DA: the target map a copy of the source map, a fresh discriminator.

    Args:
      rng: PRNG key of the run.
      game: from `create_game`.
      source_variables: {'params', 'batch_stats'} of the trained source map.
      input_shape: one input's shape, e.g. (h, w, 1).
      window_size: evaluations in the confusion window (N_s).

    Returns:
      The state; every leaf its own buffer (none shared with `source_variables`), so the state
      can be donated.
    """

    def build(rng, source_variables):
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
            window=confusion.init_window(window_size),
            confusion_stop=confusion.init_confusion_stop(),
            best_loss=confusion.init_best_loss(),
            highest_peak=confusion.init_highest_peak(),
        )

    # Compiled: eagerly, every initialiser would be compiled on its own. The target map's
    # variables are the source map's, passed through; copy them so donation cannot touch those.
    state = jax.jit(build)(rng, dict(source_variables))
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
      recall, specificity: the discriminator's, over the whole val splits (float32 scalars);
      disc_loss: its cross-entropy against the true domains, mean over both splits' samples;
      target_adversarial_loss: the target loss (target outputs vs the source label), mean over
        target val.
    """

    def one_batch(images):
        source_batch, target_batch = images
        source_outputs = game.map_model.apply(source_variables, source_batch, train=False)
        target_outputs = game.map_model.apply(state.target_variables(), target_batch, train=False)
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
        return target_outputs, jnp.argmax(logits, axis=-1), cross_entropy, adversarial

    target_outputs, predictions, cross_entropy, adversarial = lax.map(
        one_batch, (source_images, target_images)
    )
    num_source = source_images.shape[1]
    recall, specificity = confusion.discriminator_recall_specificity(
        predictions[:, :num_source], predictions[:, num_source:], source_valid, target_valid
    )
    valid = jnp.concatenate([source_valid, target_valid], axis=1)
    return {
        "target_outputs": target_outputs,
        "recall": recall,
        "specificity": specificity,
        "disc_loss": jnp.sum(jnp.where(valid, cross_entropy, 0.0)) / jnp.sum(valid),
        "target_adversarial_loss": jnp.sum(jnp.where(target_valid, adversarial, 0.0))
        / jnp.sum(target_valid),
    }


def update_criteria(
    state: GameState,
    recall: jax.Array,
    specificity: jax.Array,
    target_adversarial_loss: jax.Array,
    target_val_metric: jax.Array,
    step: jax.Array,
    confusion_delay: int,
    best_loss_min_target_steps: int,
) -> tuple[GameState, dict[str, jax.Array]]:
    """Pushes one evaluation into the window and updates the criteria.

    Returns:
      The new state and {'confusion_score', and per criterion whether this evaluation is its new
      best: 'confusion', 'best_loss', 'highest_peak'}.
    """
    window = confusion.push(state.window, recall, specificity)
    confusion_stop, confusion_best = confusion.update_confusion_stop(
        state.confusion_stop, state.disc_steps, window, step, delay=confusion_delay
    )
    best_loss, loss_best = confusion.update_best_loss(
        state.best_loss,
        target_adversarial_loss,
        state.target_steps,
        step,
        min_target_steps=best_loss_min_target_steps,
    )
    highest_peak, peak_best = confusion.update_highest_peak(
        state.highest_peak, target_val_metric, step
    )
    state = state.replace(
        window=window, confusion_stop=confusion_stop, best_loss=best_loss, highest_peak=highest_peak
    )
    return state, {
        "confusion_score": confusion.window_score(window),
        "confusion": confusion_best,
        "best_loss": loss_best,
        "highest_peak": peak_best,
    }


# ---------------------------------------------------------------------------------------------
# Host side: devices, batches, evaluation, checkpoints.


def mesh_devices(config: ml_collections.ConfigDict) -> list:
    """The devices the run uses: the first `config.num_devices` local devices (0: all); in a
    multi-host run (`config.distributed`), every device of every host."""
    if jax.process_count() > 1:
        if config.num_devices and config.num_devices != jax.device_count():
            raise ConfigError(
                f"config.num_devices {config.num_devices}: a multi-host run uses all "
                f"{jax.device_count()} devices of its {jax.process_count()} hosts (set 0)"
            )
        return jax.devices()
    return train_segment.mesh_devices(config)


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """Places host values (the same on every host) with `sharding`.

    One host: jax.device_put. Several (`config.distributed`): each host builds the global array
    from its own copy, handing each of its devices the part `sharding` gives it; every host
    holds the same data and draws the same batches (same seeds), so no data is exchanged.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def global_array(value):
        value = np.asarray(jax.device_get(value))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(global_array, tree)


def _global_input(batch: np.ndarray, sharding: NamedSharding) -> Any:
    """A host batch as a jitted function's input: as it is on one host (jit places it), a global
    array on several (where jit cannot place host arrays)."""
    return batch if jax.process_count() == 1 else _put(batch, sharding)


def _sync_hosts(name: str) -> None:
    """Waits for every host to get here (nothing to wait for on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _is_primary() -> bool:
    """Whether this process writes the run's files (the first host; always on one host)."""
    return jax.process_index() == 0


def _images_only(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # loader.train_batches gathers 'image' and 'mask'; the game needs images only, so an empty
    # mask per example keeps the loader generic over tasks whose labels are not masks.
    images = arrays["image"]
    return {"image": images, "mask": np.zeros((images.shape[0], 0), np.uint8)}


def _next_images(stream, num_batches: int) -> np.ndarray:
    """(num_batches, batch, ...) images from a train_batches stream."""
    return np.stack([next(stream)["image"] for _ in range(num_batches)])


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


def _finite_or_none(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {key: _jsonable(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_jsonable(value) for value in tree]
    if isinstance(tree, float | np.floating):
        return _finite_or_none(tree)
    if isinstance(tree, np.integer):
        return int(tree)
    return tree


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    # Synchronous saves: a run killed right after a save must find it complete.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _save(manager: ocp.CheckpointManager, step: int, tree: Any, meta: Mapping) -> None:
    """Saves a pytree and a JSON record at `step` (replacing an earlier save of that step, which a
    resumed run makes again when it was killed between two saves)."""
    if step in manager.all_steps():
        manager.delete(step)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(tree)),
            meta=ocp.args.JsonSave(_jsonable(dict(meta))),
        ),
    )


def _restore(manager: ocp.CheckpointManager, template: Any) -> tuple[Any, dict]:
    target = jax.tree.map(
        ocp.utils.to_shape_dtype_struct, flax.serialization.to_state_dict(template)
    )
    restored = manager.restore(
        manager.latest_step(),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
    return flax.serialization.from_state_dict(template, restored.state), restored.meta


def _check_source_fits(game: Game, source_variables: Mapping, input_shape: tuple) -> None:
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


def validate_config(config: ml_collections.ConfigDict, task: Task) -> None:
    """Checks everything that can be checked without data or compute.

    Raises:
      ConfigError: one line saying what to change.
    """
    if config.scheme not in SCHEMES:
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
        if reset.when not in RESET_WHEN:
            raise ConfigError(
                f"config.reset.{network}.when {reset.when!r} is unknown; "
                f"use one of {', '.join(RESET_WHEN)}"
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
    train_segment.check_batch_split(config, len(mesh_devices(config)))
    task.validate_config(config)


def _predict(
    predict_fn: Callable,
    variables: Any,
    images: np.ndarray,
    batch_size: int,
    sharding: NamedSharding | None = None,
) -> np.ndarray:
    """Map outputs over images in order, in fixed-shape batches (the last padded); `sharding`:
    the batches' (needed on several hosts)."""
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        num_real = batch.shape[0]
        if num_real < batch_size:
            padding = np.zeros((batch_size - num_real, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, padding])
        if sharding is not None:
            batch = _global_input(batch, sharding)
        outputs.append(np.asarray(jax.device_get(predict_fn(variables, batch)))[:num_real])
    return np.concatenate(outputs)


def _number_of_cycles(config: ml_collections.ConfigDict, num_target_train: int) -> int:
    target_steps = math.ceil(config.target_epochs * num_target_train / config.batch_size)
    return max(1, math.ceil(target_steps / config.target_steps_per_cycle))


class _Compiled(NamedTuple):
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


def _compile(
    game: Game, config: ml_collections.ConfigDict, mesh: Mesh, with_seeds: bool
) -> _Compiled:
    seed_axis = (None,) if with_seeds else ()
    replicated = NamedSharding(mesh, P())
    batched = NamedSharding(mesh, P(*seed_axis, BATCH_AXIS))
    stacked = NamedSharding(mesh, P(None, *seed_axis, BATCH_AXIS))
    val_stacked = NamedSharding(mesh, P(None, BATCH_AXIS))
    examples = NamedSharding(mesh, P(BATCH_AXIS))
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
    criteria = functools.partial(
        update_criteria,
        confusion_delay=config.confusion_delay,
        best_loss_min_target_steps=config.best_loss_min_target_steps,
    )
    return _Compiled(
        disc_steps=jax.jit(
            over_seeds(functools.partial(run_disc_steps, game), (0, 0, 1, 1), (0, 1)),
            in_shardings=(replicated, replicated, stacked, stacked),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        cycle=jax.jit(
            over_seeds(functools.partial(run_cycle, game), **phase_axes),
            in_shardings=(replicated, replicated, stacked, stacked, stacked, stacked),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        disc_step=jax.jit(
            over_seeds(functools.partial(disc_step, game), (0, 0, 0, 0)),
            in_shardings=(replicated, replicated, batched, batched),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        target_step=jax.jit(
            over_seeds(functools.partial(target_step, game), (0, 0, 0, 0)),
            in_shardings=(replicated, replicated, batched, batched),
            out_shardings=state_and_metrics,
            donate_argnums=0,
        ),
        # Outputs the host reads are replicated, so that every host holds all of them.
        evaluate=jax.jit(
            over_seeds(functools.partial(evaluate_game, game), (0, 0, None, None, None, None)),
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
            over_seeds(criteria, (0, 0, 0, 0, 0, None)),
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


def _play(
    compiled: _Compiled,
    fused: bool,
    state: GameState,
    source_variables: Any,
    batches: tuple[np.ndarray, ...],
) -> tuple[GameState, dict[str, np.ndarray]]:
    """Runs a phase (disc batches only, or disc then target batches) fused or step by step.

    Returns:
      The new state and per-step metrics as host arrays.
    """
    if fused:
        function = compiled.cycle if len(batches) == 4 else compiled.disc_steps
        batches = [_global_input(images, compiled.stacked) for images in batches]
        state, step_metrics = function(state, source_variables, *batches)
        return state, jax.device_get(step_metrics)
    collected: dict[str, list] = {}
    pairs = [(compiled.disc_step, batches[0], batches[1])]
    if len(batches) == 4:
        pairs.append((compiled.target_step, batches[2], batches[3]))
    for step_fn, source_images, target_images in pairs:
        for source_batch, target_batch in zip(source_images, target_images, strict=True):
            source_batch = _global_input(source_batch, compiled.batched)
            target_batch = _global_input(target_batch, compiled.batched)
            state, one_step = step_fn(state, source_variables, source_batch, target_batch)
            for name, value in one_step.items():
                collected.setdefault(name, []).append(value)
    return state, {name: np.stack(jax.device_get(values)) for name, values in collected.items()}


def _check_finite(
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


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed of a `num_seeds` run: `seed` set (and the source run's, which shares
    it), `num_seeds` 1; what a single run of that seed is given."""
    single = train_segment.seed_config(config, seed)
    if isinstance(single.get("source"), ml_collections.ConfigDict) and "seed" in single.source:
        single.source.seed = seed
    return single


@dataclasses.dataclass
class _SeedRun:
    """The host side of one seed of the game: its config and folder, its data streams, its
    criterion checkpoints and its last metrics row. A single run is one, in the run's workdir."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    source_stream: Any
    target_stream: Any
    managers: dict[str, ocp.CheckpointManager]
    last_row: dict | None = None

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.workdir / "metrics.jsonl"


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    task: Task | None = None,
    cycle_hook: Callable[[int], None] | None = None,
) -> dict:
    """Plays the ADDA game of `config`, then scores every stopping criterion on target test/val.

    With `config.num_seeds` > 1, plays seeds config.seed, config.seed + 1, ... together in one
    compiled program (module docstring); each seed's run goes to workdir/seed_<s>/.

    Args:
      config: see configs/adda_base.py.
      workdir: output folder (created); an existing one of the same config is resumed.
      task: the Task; default `get_task(config.task)`.
      cycle_hook: called with the number of completed phases (the initial discriminator steps
        count as one) after each phase and its checkpointing; tests use it to interrupt a run.

    Returns:
      The results written to results.json (with seeds: the summary listing them).

    Raises:
      ConfigError: a config that cannot run (before any compute).
      NonFiniteLossError: a loss became NaN or inf.
    """
    task = task if task is not None else get_task(config.task)
    validate_config(config, task)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    primary = _is_primary()  # on several hosts only the first writes files (orbax: all save)
    if primary:
        train_segment.write_config(config, workdir, ignored_keys=COSMETIC_CONFIG_KEYS)
        provenance.write(workdir / "provenance.json", provenance.collect(config, config.seed))
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
    game = create_game(config)
    if with_seeds:
        if hasattr(task, "prepare_seeds"):  # optional in the Task protocol
            seed_configs = task.prepare_seeds(config, workdir, seed_configs)
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True):
            seed_dir.mkdir(exist_ok=True)
            if primary:
                train_segment.write_config(single, seed_dir, ignored_keys=COSMETIC_CONFIG_KEYS)
                provenance.write(
                    seed_dir / "provenance.json", provenance.collect(single, single.seed)
                )
    all_source_variables = [
        dict(task.source_variables(single, seed_dir, data))
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True)
    ]
    for variables in all_source_variables:
        _check_source_fits(game, variables, input_shape)

    mesh = Mesh(np.asarray(mesh_devices(config)), (BATCH_AXIS,))
    compiled = _compile(game, config, mesh, with_seeds)
    fused = fused_cycles(config)
    states = [  # on this host's default device, then placed like the rest
        create_game_state(
            jax.random.PRNGKey(single.seed), game, variables, input_shape, config.confusion_window
        )
        for single, variables in zip(seed_configs, all_source_variables, strict=True)
    ]
    state = _put(seed_map.stack(states) if with_seeds else states[0], compiled.replicated)
    source_variables = _put(
        seed_map.stack(all_source_variables) if with_seeds else all_source_variables[0],
        compiled.replicated,
    )
    del states, all_source_variables

    def take(tree: Any, i: int) -> Any:
        """Seed i's part of a (possibly stacked) pytree."""
        return seed_map.take(tree, i) if with_seeds else tree

    def seed_int(value: Any, i: int) -> int:
        return int(np.ravel(jax.device_get(value))[i])

    val_batches = _put(
        mixed_eval_batches(
            data.source["val"]["image"], data.target["val"]["image"], config.batch_size
        ),
        compiled.val_stacked,
    )
    num_target_val = data.target["val"]["image"].shape[0]
    metric_name = f"target_val_{task.primary_metric}"
    evaluated = ("disc_loss", "recall", "specificity", "target_adversarial_loss", metric_name)

    def evaluate(state: GameState) -> list[dict[str, Any]]:
        """Each seed's evaluation on the val splits."""
        outputs = jax.device_get(compiled.evaluate(state, source_variables, *val_batches))
        evaluations = []
        for i in range(num_seeds):
            seed_outputs = take(outputs, i)
            target_outputs = seed_outputs["target_outputs"]
            target_outputs = target_outputs.reshape(-1, *target_outputs.shape[2:])[:num_target_val]
            task_metrics = task.evaluate(target_outputs, data.target["val"])
            evaluations.append(
                {
                    **{name: float(seed_outputs[name]) for name in evaluated[:-1]},
                    metric_name: float(task_metrics[task.primary_metric]),
                }
            )
        return evaluations

    def counters(state: GameState) -> dict[str, int]:
        # Every seed takes the same steps.
        disc_steps, target_steps = seed_int(state.disc_steps, 0), seed_int(state.target_steps, 0)
        return {
            "step": disc_steps + target_steps,
            "disc_steps": disc_steps,
            "target_steps": target_steps,
        }

    checkpoint_dir = workdir / "checkpoints"
    game_manager = _checkpoint_manager(checkpoint_dir / "game")
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
                name: _checkpoint_manager(seed_dir / "checkpoints" / name) for name in CRITERIA
            },
        )
        for single, seed_dir in zip(seed_configs, seed_dirs, strict=True)
    ]
    num_cycles = _number_of_cycles(config, counts["target"]["train"])
    phases = (["initial_disc"] if config.initial_disc_steps else []) + ["cycle"] * num_cycles

    def per_seed(values: list) -> Any:
        """One value per seed as the compiled functions take it: stacked on axis 1 for phase
        images (steps, seeds, ...) and on axis 0 for scalars; the value itself for one run."""
        if not with_seeds:
            return values[0]
        if np.ndim(values[0]) == 0:
            return np.asarray(values, np.float32)
        return np.stack(values, axis=1)

    def save_game(state: GameState, completed_phases: int, history_rows: int) -> None:
        streams = {
            "source_stream": [run.source_stream.get_state() for run in runs],
            "target_stream": [run.target_stream.get_state() for run in runs],
        }
        _save(
            game_manager,
            counters(state)["step"],
            state,
            {
                "completed_phases": completed_phases,
                "history_rows": history_rows,
                # one run: the state itself (the layout of checkpoints before seeds existed)
                **{key: value if with_seeds else value[0] for key, value in streams.items()},
            },
        )

    def save_criterion(run: _SeedRun, name: str, seed_state: GameState, row: Mapping) -> None:
        _save(run.managers[name], row["step"], seed_state.target_variables(), row)

    if game_manager.latest_step() is not None:
        state, meta = _restore(game_manager, state)
        state = _put(state, compiled.replicated)
        completed_phases, history_rows = meta["completed_phases"], meta["history_rows"]
        kept = []
        for i, run in enumerate(runs):
            for key in ("source_stream", "target_stream"):
                getattr(run, key).set_state(meta[key][i] if with_seeds else meta[key])
            kept.append(run.metrics_path.read_text().splitlines(keepends=True)[:history_rows])
            run.last_row = json.loads(kept[-1][-1])
        _sync_hosts("read metrics")  # every host has read the rows before the first rewrites them
        if primary:
            for run, lines in zip(runs, kept, strict=True):
                run.metrics_path.write_text("".join(lines))
        logging.info("resumed after %d phases in %s", completed_phases, workdir)
    else:
        for i, (run, evaluation) in enumerate(zip(runs, evaluate(state), strict=True)):
            row = {"phase": "before_da", "cycle": 0, **counters(state), **evaluation}
            save_criterion(run, "initial", take(state, i), row)
            if primary:
                run.metrics_path.write_text(json.dumps(_jsonable(row)) + "\n")
            run.last_row = _jsonable(row)
        completed_phases, history_rows = 0, 1
        save_game(state, completed_phases, history_rows)

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
        state, step_metrics = _play(compiled, fused, state, source_variables, batches)
        _check_finite(
            step_metrics,
            before,
            f"{phase} {cycle}" if phase == "cycle" else phase,
            f"{checkpoint_dir / 'game'} (step {game_manager.latest_step()})",
            seeds=[run.seed for run in runs] if with_seeds else None,
        )
        evaluations = evaluate(state)
        state, criteria = compiled.criteria(
            state,
            *(per_seed([evaluation[name] for evaluation in evaluations]) for name in evaluated[1:]),
            counters(state)["step"],
        )
        criteria = jax.device_get(criteria)
        for i, (run, evaluation) in enumerate(zip(runs, evaluations, strict=True)):
            seed_criteria = take(criteria, i)
            row = {
                "phase": phase,
                "cycle": cycle,
                **counters(state),
                **evaluation,
                "confusion_score": float(seed_criteria["confusion_score"]),
                **{
                    f"{name}_train": float(np.mean(values if not with_seeds else values[:, i]))
                    for name, values in step_metrics.items()
                    if name in ("disc_loss", "disc_grad_norm", "target_loss", "target_grad_norm")
                },
                "disc_resets": seed_int(state.disc_opt_state.reset_count, i),
                "target_resets": seed_int(state.target_opt_state.reset_count, i),
                "seconds": time.time() - phase_start,  # the phase's steps and evaluation
            }
            for name in ("confusion", "best_loss", "highest_peak"):
                if seed_criteria[name]:
                    save_criterion(run, name, take(state, i), row)
            if primary:
                with open(run.metrics_path, "a") as metrics_file:
                    metrics_file.write(json.dumps(_jsonable(row)) + "\n")
            run.last_row = _jsonable(row)
        history_rows += 1
        completed_phases += 1
        if completed_phases % config.checkpoint_every_cycles == 0 or completed_phases == len(
            phases
        ):
            save_game(state, completed_phases, history_rows)
        progress.update(1)
        progress.set_postfix(
            cycle=cycle, **_progress_fields([run.last_row for run in runs], metric_name)
        )
        if cycle_hook is not None:
            cycle_hook(completed_phases)
    progress.close()
    for i, run in enumerate(runs):
        save_criterion(run, "latest", take(state, i), run.last_row)
    train_seconds = time.time() - start_time

    def scores(variables: Any, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
        result = {}
        for split in ("test", "val"):
            outputs = _predict(
                compiled.predict,
                variables,
                arrays[split]["image"],
                config.eval_batch_size,
                compiled.examples,
            )
            result[split] = task.evaluate(outputs, arrays[split])
            if split == "test" and hasattr(task, "per_image"):  # optional in the Task protocol
                result["test_per_image"] = task.per_image(outputs, arrays[split])
        return result

    all_results = []
    for i, run in enumerate(runs):
        criteria_results, not_reached = {}, []
        for name in CRITERIA:
            manager = run.managers[name]
            if manager.latest_step() is None:
                not_reached.append(name)
                continue
            variables, meta = _restore(manager, take(state, i).target_variables())
            variables = _put(variables, compiled.replicated)
            criteria_results[name] = {
                "step": meta["step"],
                "cycle": meta["cycle"],
                "disc_steps": meta["disc_steps"],
                "target_steps": meta["target_steps"],
                **scores(variables, data.target),
                "selection": {
                    "confusion_score": meta.get("confusion_score"),
                    "target_adversarial_loss": meta.get("target_adversarial_loss"),
                    metric_name: meta.get(metric_name),
                },
            }
            if name == "highest_peak":
                criteria_results[name]["oracle"] = True  # Chosen with target labels: a ceiling.
        source_scores = scores(take(source_variables, i), data.source)
        results = {
            "pair": _pair_name(config),
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
            results["num_seeds_together"] = num_seeds  # trained in one program with others
        all_results.append(results)
        if primary:
            _write_results(run.workdir, results, counts, train_seconds)
            train_segment.report_line(_summary_line(results, run.workdir), config.progress_bar)
    for manager in [game_manager, *(m for run in runs for m in run.managers.values())]:
        manager.close()
    if not with_seeds:
        return all_results[0]
    summary = {
        "pair": _pair_name(config),
        "scheme": config.scheme,
        "num_seeds": num_seeds,
        "seeds": {
            str(results["seed"]): {
                "source_test": results["source_test"],
                "criteria": {
                    name: {"test": scored["test"], "val": scored["val"], "step": scored["step"]}
                    for name, scored in results["criteria"].items()
                },
            }
            for results in all_results
        },
        "seed_workdirs": [run.workdir.name for run in runs],
        "devices": len(mesh.devices.ravel()),
        "hosts": jax.process_count(),
        "wall_time_s": train_seconds,
    }
    if primary:
        _write_results(workdir, summary, counts, train_seconds)
    return summary


def _pair_name(config: ml_collections.ConfigDict) -> str:
    source_domain = config.data.get("source_modality", "source")
    target_domain = config.data.get("target_modality", "target")
    return f"{source_domain}->{target_domain}"


def _write_results(folder: pathlib.Path, results: Mapping, counts: Mapping, seconds: float) -> None:
    (folder / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    provenance.add(folder / "provenance.json", {"data": counts, "wall_time_s": seconds})


def _summary_line(results: Mapping[str, Any], folder: pathlib.Path) -> str:
    """One line for the terminal: each criterion's target test score (the oracle marked)."""
    metric = results["primary_metric"]
    scored = ", ".join(
        f"{name}{' (oracle)' if name == 'highest_peak' else ''} "
        f"{results['criteria'][name]['test'][metric]:.3f}"
        for name in CRITERIA
        if name in results["criteria"]
    )
    return (
        f"{results['pair']} {results['scheme']} seed {results['seed']}: target test {metric} "
        f"{scored}; see {folder / 'results.json'}"
    )


def _progress_fields(rows: list[Mapping[str, Any]], metric_name: str) -> dict[str, str]:
    """The progress bar's figures from each seed's latest row (space-separated over seeds)."""

    def shown(value: float | None) -> str:
        if value is None:  # NaN in the row (e.g. the confusion score before the window is full)
            return "-"
        text = f"{value:.3f}"
        return "0.000" if text == "-0.000" else text  # a score of -0.0 or -1e-9 is zero

    def joined(name: str) -> str:
        return " ".join(shown(row.get(name)) for row in rows)

    return {
        "disc_loss": joined("disc_loss"),
        "confusion": joined("confusion_score"),
        metric_name: joined(metric_name),
    }
