"""Runs an experiment: python main.py --config=configs/segment_ct.py --workdir=runs/ct.

The config's `experiment` field picks the training function; `--config.x.y=value` overrides a field;
`--config=configs/segment_ct.py:smoke` passes 'smoke' to the config's get_config. With
`--config.data.num_folds=K` and no `--config.data.fold`, every fold runs (sarcoma_jax/folds.py).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sarcoma_jax import folds, input_pipeline
from sarcoma_jax.adda import train as adda_train
from sarcoma_jax.segment import train as segment_train

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics, results and figures.")
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# config.experiment -> train_and_evaluate(config, workdir).
EXPERIMENTS = {
    "segment": segment_train.train_and_evaluate,
    "adda": adda_train.train_and_evaluate,
}
# config.experiment -> (validate_config(config), config fields a resumed run may change): what a
# run of every fold (folds.run_all_folds) needs besides the training function.
FOLD_CHECKS = {
    "segment": (segment_train.validate_config, segment_train.RESUMABLE_CONFIG_CHANGES),
    "adda": (adda_train.validate_config, adda_train.COSMETIC_CONFIG_KEYS),
}


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a one-line error for an override of a field the config lacks."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError) as error:
        sys.exit(f"error: bad --config override (no such field, or a wrong type): {error}")


def initialize_distributed(config) -> None:
    """Joins a multi-host run when `config.distributed.coordinator_address` is set.

    'host:port' with `num_processes` and `process_id` (every host runs the same command with its
    own id), or 'auto' for what jax.distributed.initialize detects by itself (SLURM, Open MPI,
    TPU pods, Kubernetes). Must run before anything touches a device.
    """
    distributed = config.get("distributed")
    address = distributed.get("coordinator_address") if distributed else None
    if not address:
        return
    # CPU hosts exchange over Gloo (GPUs use NCCL whatever this says).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=distributed.num_processes,
            process_id=distributed.process_id,
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    experiment = config.get("experiment")
    if experiment not in EXPERIMENTS:
        sys.exit(
            f"error: config.experiment {experiment!r} is unknown; use one of {sorted(EXPERIMENTS)}"
        )
    if not FLAGS["verbosity"].present:
        # Libraries' INFO logs (orbax's, per save) would bury the progress bar; `-v 0` shows them.
        logging.set_verbosity(logging.WARNING)
    logging.info("config:\n%s", config)
    try:
        initialize_distributed(config)
        if folds.runs_all_folds(config):
            validate, resumable = FOLD_CHECKS[experiment]
            folds.run_all_folds(config, FLAGS.workdir, EXPERIMENTS[experiment], validate, resumable)
        else:
            EXPERIMENTS[experiment](config, FLAGS.workdir)
    except input_pipeline.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    except adda_train.NonFiniteLossError as error:  # the last good checkpoint is kept
        sys.exit(f"stopped: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
