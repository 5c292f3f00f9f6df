"""Default ADDA config (thesis §10.1, §14.3, SPEC §4) for one modality pair; pair files call it.

`get_config(arg, source, target)` with arg from `--config=configs/adda_ct_pt.py:smoke`, variants
separated by commas:
  ''/None  the full run: 128x128, batches 5 + 5, reference U-Net and discriminator, the pair's
           hyperparameters (PAIRS), 50 target epochs
  'smoke'  a run of about a minute on a laptop CPU: 32x32, source trained 2 epochs, a few short
           cycles, the criteria's delays scaled down
  'strong' the source segmenter's ':strong' variant (configs/segment_base.py STRONG); the game is
           the reference's, on the same input

`--config.scheme=adda|reset` picks plain ADDA or momentum reset with the pair's schedule
(`config.reset`). The source segmentation run is `config.source` (configs/segment_base.py; it
trains into <workdir>/source) unless `--config.source_checkpoint=W` names one to reuse. The data
fields (`config.data.image_size`, `.source`, `.path`, ...) and `config.model` are shared with
`config.source`, so overriding one changes both.
"""

import ml_collections
from ml_collections import config_dict

from configs import segment_base
from data_pipeline.vocabulary import MR_SEQUENCES
from sarcoma_jax.adda import criteria

# Source segmentation learning rates (SPEC §4 'Source'; T1 and STIR as in their segment configs).
SOURCE_LEARNING_RATES = {"CT": 1e-3, "PT": 1e-3, "T1": 1e-3, "T2": 5e-4, "STIR": 5e-4}


def _pair(disc_lr, disc_b1, target_lr, target_b1, k_d, initial, reset_disc, reset_target):
    return {
        "disc_lr": disc_lr,
        "disc_b1": disc_b1,
        "target_lr": target_lr,
        "target_b1": target_b1,
        "k_d": k_d,
        "k_t": 20,
        "initial_disc_steps": initial,
        "reset_discriminator": reset_disc,  # (when, steps): adda/game.py reset_condition
        "reset_target": reset_target,
    }


_NEVER = ("never", 0)
_CYCLE = ("cycle_start", 0)

# SPEC §4's table (the reference configs).
PAIRS = {
    ("CT", "PT"): _pair(2e-4, 0.7, 5e-4, 0.7, 50, 100, _CYCLE, _NEVER),
    ("CT", "T2"): _pair(1e-3, 0.9, 2e-4, 0.9, 50, 200, _CYCLE, _NEVER),
    ("PT", "CT"): _pair(1e-3, 0.9, 2e-4, 0.9, 100, 200, _CYCLE, _NEVER),
    ("PT", "T2"): _pair(1e-3, 0.9, 2e-4, 0.9, 100, 200, _CYCLE, _CYCLE),
    ("T2", "CT"): _pair(1e-3, 0.9, 2e-4, 0.9, 100, 200, _NEVER, ("after_at_least", 200)),
    ("T2", "PT"): _pair(1e-3, 0.5, 5e-4, 0.9, 100, 0, _CYCLE, _CYCLE),
}
# Pairs outside the thesis: T1 and STIR (MR like T2) take T2's row; MR to MR takes DEFAULT_PAIR.
DEFAULT_PAIR = _pair(1e-3, 0.9, 2e-4, 0.9, 100, 200, _CYCLE, _NEVER)


def pair_hyperparameters(source: str, target: str) -> dict:
    """The row of PAIRS for (source, target), with MR sequences read as T2."""

    def as_thesis_domain(domain: str) -> str:
        return "T2" if domain in MR_SEQUENCES else domain

    return PAIRS.get((as_thesis_domain(source), as_thesis_domain(target)), DEFAULT_PAIR)


def _reset(when_steps: tuple[str, int]) -> ml_collections.ConfigDict:
    when, steps = when_steps
    return ml_collections.ConfigDict({"when": when, "steps": steps})


def get_config(
    arg: str | None = None, source: str = "CT", target: str = "PT"
) -> ml_collections.ConfigDict:
    """The ADDA config for source -> target (domain names as in data_pipeline.datasets)."""
    smoke = "smoke" in segment_base.parse_variants(arg)
    pair = pair_hyperparameters(source, target)
    source_config = segment_base.get_config(
        arg,
        modality=source,
        learning_rate=SOURCE_LEARNING_RATES.get(source, 1e-3),
    )

    config = ml_collections.ConfigDict()
    config.experiment = "adda"
    config.task = "segmentation"  # adda/task.py TASKS key or 'package.module:Factory'
    config.scheme = "adda"  # 'adda' | 'reset' (momentum reset with the pair's schedule)
    config.seed = source_config.get_ref("seed")  # init, data order (shared with config.source)
    # > 1: seeds seed, seed + 1, ... played together by one vmapped program; each seed's run
    # (metrics, checkpoints, results) goes to <workdir>/seed_<s>/ (sarcoma_jax/adda/train.py).
    config.num_seeds = 1
    config.vmap_seeds = source_config.get_ref("vmap_seeds")  # see configs/segment_base.py

    # Every field of config.source.data, shared with it (overriding one sets both); its modality
    # is the source modality.
    config.data = ml_collections.ConfigDict()
    for key in source_config.data:
        config.data["source_modality" if key == "modality" else key] = source_config.data.get_ref(
            key
        )
    config.data.target_modality = target
    config.data.disjoint_domains = False  # source / target training images from disjoint patients

    config.source = source_config  # the source segmentation run (segment/train.py)
    config.source_checkpoint = config_dict.placeholder(str)  # reuse a segmentation run instead
    config.model = source_config.model  # source and target map (the same object)

    config.discriminator = ml_collections.ConfigDict()
    config.discriminator.name = "logit_map_discriminator"
    config.discriminator.blocks = ((2, 4), (4, 2), (1, 1))
    config.discriminator.final_features = 1
    config.discriminator.final_strides = (2, 1)
    config.discriminator.input_dropout = 0.3
    config.discriminator.leaky_relu_slope = 0.3
    config.discriminator.num_classes = 2
    # 'batch': the reference BatchNorms; 'none': none, so recall and specificity are per-sample
    # verdicts (with 'batch' they collapse to 0 or 1; models.LogitMapDiscriminator, README).
    config.discriminator.norm = "batch"
    config.discriminator_l2 = 1e-3  # times the sum of squared kernels
    config.discriminator_eval_bn = "batch"  # 'batch' (agrees with training) | 'running'
    config.target_map_train_mode = False  # False: the target map's BN keeps the source averages

    config.disc_optimizer = ml_collections.ConfigDict(
        {"learning_rate": pair["disc_lr"], "b1": pair["disc_b1"], "b2": 0.999, "eps": 1e-8}
    )
    config.target_optimizer = ml_collections.ConfigDict(
        {"learning_rate": pair["target_lr"], "b1": pair["target_b1"], "b2": 0.999, "eps": 1e-8}
    )
    config.reset = ml_collections.ConfigDict()  # used when scheme == 'reset'
    config.reset.discriminator = _reset(pair["reset_discriminator"])
    config.reset.target = _reset(pair["reset_target"])

    config.batch_size = 5  # per domain: discriminator batches are 5 source + 5 target
    config.eval_batch_size = 25
    config.initial_disc_steps = pair["initial_disc_steps"]
    config.disc_steps_per_cycle = pair["k_d"]  # k_d
    config.target_steps_per_cycle = pair["k_t"]  # k_t
    config.target_epochs = 50.0
    config.confusion_window = 50  # N_s evaluations
    config.confusion_delay = 2000  # discriminator steps before confusion stop may select
    config.best_loss_min_target_steps = 50
    # The stopping criteria to run (sarcoma_jax/adda/criteria: registered names, or
    # 'package.module:Name'); each gets checkpoints/<name>/ and its entry in results.json.
    config.criteria = criteria.DEFAULT

    # True: one compiled call per cycle; False: one per step (same numbers); None: True except on
    # CPU, where convolution gradients inside a loop are 7x slower (benchmarks/README.md).
    config.fused_cycles = config_dict.placeholder(bool)
    # Data parallel over the first n local devices (0 = all); shared with config.source.
    config.num_devices = source_config.get_ref("num_devices")
    # Several hosts (main.initialize_distributed): 'host:port' of process 0 with num_processes
    # and this host's process_id, or 'auto'; the batch is split over every device of every host.
    config.distributed = ml_collections.ConfigDict(
        {
            "coordinator_address": config_dict.placeholder(str),
            "num_processes": config_dict.placeholder(int),
            "process_id": config_dict.placeholder(int),
        }
    )
    config.checkpoint_every_cycles = 1
    config.progress_bar = source_config.get_ref("progress_bar")  # shared with config.source

    if smoke:
        config.data.phantom_patients = 12  # fewer leave some T2 split empty
        config.eval_batch_size = 10
        config.initial_disc_steps = min(config.initial_disc_steps, 4)
        config.disc_steps_per_cycle = 4
        config.target_steps_per_cycle = 2
        config.target_epochs = 1.0
        config.confusion_window = 3
        config.confusion_delay = 8
        config.best_loss_min_target_steps = 2
        for reset in (config.reset.discriminator, config.reset.target):
            reset.steps = min(reset.steps, 4)
    return config
