"""ADDA SVHN -> MNIST (thesis §10.1.1, SPEC §3-4); `--config.scheme=reset` for momentum reset.

`get_config(arg)` with arg from `--config=configs/adda_svhn_mnist.py:smoke`:
  ''/None  the full run: tfds svhn_cropped -> mnist (grayscale 28x28, [0, 1] for both), LeNet and
           the MLP discriminator, batches 20 + 20, Adam 2e-4 (0.5, 0.999) for both networks,
           (k_d, k_t) = (10, 1), 5 target epochs, L2 1e-3; RESET resets the discriminator every
           100 of its steps. The first run downloads SVHN and MNIST (tfds, the internet needed);
           offline, use configs/adda_digits_offline.py.
  'smoke'  a few hundred images per split, a short source run and a few cycles.

The source classifier trains into <workdir>/source (`config.source`) unless
`--config.source_checkpoint=W` names an earlier digits run (its workdir) to reuse.
"""

import ml_collections
from ml_collections import config_dict

from sarcoma_jax.adda import criteria


def get_config(arg: str | None = None, dataset: str = "svhn_mnist") -> ml_collections.ConfigDict:
    """The digits ADDA config for `dataset` ('svhn_mnist' or 'offline')."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config argument {arg!r}; use ':smoke' or nothing")
    config = ml_collections.ConfigDict()
    config.experiment = "adda"
    config.task = "digits"
    config.scheme = "adda"  # 'adda' | 'reset' (the discriminator's moments reset every 100 steps)
    config.seed = 0  # init, data order, source training
    # > 1: seeds seed, seed + 1, ... played together by one vmapped program; each seed's run
    # (metrics, checkpoints, results) goes to <workdir>/seed_<s>/ (sarcoma_jax/adda/train.py).
    config.num_seeds = 1
    config.vmap_seeds = config_dict.placeholder(bool)  # see configs/segment_base.py

    config.data = ml_collections.ConfigDict()
    config.data.dataset = dataset  # 'svhn_mnist' (tfds) | 'offline' (SPEC §8)
    config.data.seed = 0  # rendering (offline) and train/val/test division
    # 'svhn_mnist': each tfds train split gives val_examples to val; test is tfds' test split.
    config.data.tfds_data_dir = config_dict.placeholder(str)  # default ~/tensorflow_datasets
    config.data.val_examples = 1000  # evaluated after every cycle, so kept small
    config.data.max_examples = config_dict.placeholder(int)  # per tfds split; None = all
    # 'offline': rendered printed digits (train, val, test) -> scikit-learn's handwritten digits.
    config.data.source_sizes = (4000, 1000, 1000)
    config.data.target_fractions = (0.6, 0.2, 0.2)  # of the 1797 handwritten digits

    config.source = ml_collections.ConfigDict()  # source-only training (§10.1 step 1)
    config.source.num_epochs = 10
    config.source.batch_size = 20
    config.source.learning_rate = 2e-4
    config.source.b1 = 0.5
    config.source.b2 = 0.999
    config.source.weight_decay = 1e-3  # times the sum of squared kernels
    config.source_checkpoint = config_dict.placeholder(str)

    config.model = ml_collections.ConfigDict({"name": "lenet", "num_classes": 10})
    config.discriminator = ml_collections.ConfigDict(
        {"name": "mlp_discriminator", "hidden_features": (500, 500), "num_classes": 2}
    )
    config.discriminator_l2 = 1e-3
    config.discriminator_eval_bn = "batch"  # the MLP has no BatchNorm; kept for the game
    config.target_map_train_mode = False  # dropout off in the target map's steps

    adam = {"learning_rate": 2e-4, "b1": 0.5, "b2": 0.999, "eps": 1e-8}
    config.disc_optimizer = ml_collections.ConfigDict(adam)
    config.target_optimizer = ml_collections.ConfigDict(adam)
    config.reset = ml_collections.ConfigDict()  # used when scheme == 'reset'
    config.reset.discriminator = ml_collections.ConfigDict({"when": "every", "steps": 100})
    config.reset.target = ml_collections.ConfigDict({"when": "never", "steps": 0})

    config.batch_size = 20  # per domain: discriminator batches are 20 source + 20 target
    config.eval_batch_size = 500
    config.initial_disc_steps = 0
    config.disc_steps_per_cycle = 10  # k_d
    config.target_steps_per_cycle = 1  # k_t
    config.target_epochs = 5.0
    config.confusion_window = 50  # N_s evaluations
    config.confusion_delay = 2000  # discriminator steps before confusion stop may select
    config.best_loss_min_target_steps = 50
    config.criteria = criteria.DEFAULT  # sarcoma_jax/adda/criteria

    config.fused_cycles = config_dict.placeholder(bool)  # None: fused except on CPU
    config.num_devices = 0  # 0 = all local devices
    config.distributed = ml_collections.ConfigDict(  # several hosts: see configs/adda_base.py
        {
            "coordinator_address": config_dict.placeholder(str),
            "num_processes": config_dict.placeholder(int),
            "process_id": config_dict.placeholder(int),
        }
    )
    config.checkpoint_every_cycles = 100  # cycles are short here
    config.progress_bar = True

    if arg == "smoke":
        config.data.val_examples = 100
        config.data.max_examples = 400
        config.data.source_sizes = (300, 100, 100)
        config.source.num_epochs = 2
        config.eval_batch_size = 100
        config.target_epochs = 0.2
        config.confusion_window = 3
        config.confusion_delay = 20
        config.best_loss_min_target_steps = 2
        config.reset.discriminator.steps = 20
        config.checkpoint_every_cycles = 5
    return config
