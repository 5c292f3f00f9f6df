"""The digits Task of the ADDA game (SPEC §3-4, §8): LeNet maps, SVHN-like -> MNIST-like."""

import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import scipy.special
from absl import logging

from sarcoma_jax import input_pipeline, models
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.digits.classifier import (
    accuracy,
    accuracy_of_logits,
    create_classifier_optimizer,
    init_params,
    train_source_classifier,
)
from sarcoma_jax.digits.data import Domain, LabelledImages, fraction_sizes, offline_pair
from sarcoma_jax.digits.tfds_builders import svhn_mnist_pair

DATASETS = ("offline", "svhn_mnist")


def load_pair(data_config: Mapping[str, Any]) -> tuple[Domain, Domain]:
    """(source, target) of `config.data` (configs/adda_svhn_mnist.py documents the fields)."""
    if data_config["dataset"] == "offline":
        return offline_pair(
            data_config["seed"], data_config["source_sizes"], data_config["target_fractions"]
        )
    return svhn_mnist_pair(
        data_config["seed"],
        data_config["tfds_data_dir"],
        data_config["val_examples"],
        data_config["max_examples"],
    )


def _as_arrays(domain: Domain) -> dict[str, dict[str, np.ndarray]]:
    return {split: {"image": data.images, "label": data.labels} for split, data in domain.items()}


def _as_labelled(arrays: Mapping[str, np.ndarray]) -> LabelledImages:
    return LabelledImages(arrays["image"], arrays["label"])


SOURCE_RUN_FILE = "source.json"  # in <workdir>/source: history and accuracies of the source run


class DigitsTask:
    """Digit classification, SVHN-like -> MNIST-like (thesis §10.1, SPEC §3-4, §8).

    Config (configs/adda_svhn_mnist.py): `config.data.dataset` 'svhn_mnist' (tfds) or 'offline'
    (SPEC §8); `config.model` LeNet ('lenet'), `config.discriminator` the MLP on its 10 logits;
    `config.source` the source-only training (trained into <workdir>/source), unless
    `config.source_checkpoint` names the workdir (or its 'source' folder) of an earlier digits
    run to reuse. The primary metric is classification accuracy.
    """

    primary_metric = "accuracy"
    # Label-free criteria (adda/probe.py): a unit is an image, features are LeNet's 500-wide
    # hidden layer; a mirrored digit is another digit.
    feature_module = "Dense_0"
    flip_invariant = False

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        data = config.data
        if data.dataset not in DATASETS:
            raise input_pipeline.ConfigError(
                f"config.data.dataset {data.dataset!r} is unknown; use one of {', '.join(DATASETS)}"
            )
        if config.model.name != "lenet":
            raise input_pipeline.ConfigError(
                f"config.model.name {config.model.name!r}: the digits task needs 'lenet'"
            )
        if config.discriminator.name != "mlp_discriminator":
            raise input_pipeline.ConfigError(
                f"config.discriminator.name {config.discriminator.name!r}: the digits task needs "
                "'mlp_discriminator' (it sees the 10 logits)"
            )
        if data.dataset == "offline":
            if len(data.source_sizes) != 3 or min(data.source_sizes) < 1:
                raise input_pipeline.ConfigError(
                    f"config.data.source_sizes must be 3 positive counts, got {data.source_sizes}"
                )
            fraction_sizes(1, data.target_fractions)  # raises DigitsDataError if invalid
        elif data.val_examples < 1:
            raise input_pipeline.ConfigError(
                f"config.data.val_examples must be >= 1, got {data.val_examples}"
            )
        for name in ("num_epochs", "batch_size"):
            if config.source[name] < 1:
                raise input_pipeline.ConfigError(
                    f"config.source.{name} must be >= 1, got {config.source[name]}"
                )
        if config.source_checkpoint:
            _source_run_dir(config.source_checkpoint)
        elif jax.process_count() > 1:
            raise input_pipeline.ConfigError(
                "a multi-host run needs config.source_checkpoint: train the source map first "
                "(on one host), then pass its workdir"
            )

    def load_data(self, config: ml_collections.ConfigDict) -> task_lib.DomainData:
        source, target = load_pair(config.data)
        return task_lib.DomainData(source=_as_arrays(source), target=_as_arrays(target))

    def source_variables(
        self,
        config: ml_collections.ConfigDict,
        workdir: pathlib.Path,
        data: task_lib.DomainData,
    ) -> dict:
        model = models.create(config.model)
        template = jax.eval_shape(
            functools.partial(init_params, model=model), jax.random.PRNGKey(0)
        )
        if config.source_checkpoint:
            run_dir = _source_run_dir(config.source_checkpoint)
        else:
            run_dir = pathlib.Path(workdir) / "source"
            if not (run_dir / SOURCE_RUN_FILE).is_file():
                _train_source_run(config, model, data, run_dir)
        params = ocp.StandardCheckpointer().restore(
            (run_dir / "params").resolve(),
            template,
        )
        return {"params": params, "batch_stats": {}}

    def evaluate(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": accuracy_of_logits(outputs, arrays["label"])}

    def unit_probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """(images, 10) float64 class probabilities (softmax of the logits)."""
        return scipy.special.softmax(np.asarray(outputs, np.float64), axis=1)

    def agreement(self, outputs: np.ndarray, other_outputs: np.ndarray) -> float:
        """Fraction of images with the same predicted class."""
        return float(np.mean(np.argmax(outputs, 1) == np.argmax(other_outputs, 1)))

    def per_image_loss(self, outputs: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n,) float64 softmax cross-entropy of each image."""
        log_probabilities = scipy.special.log_softmax(np.asarray(outputs, np.float64), axis=1)
        return -log_probabilities[np.arange(len(outputs)), arrays["label"]]


def _source_run_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The folder of a source run: `path` itself or its 'source' subfolder (a digits workdir)."""
    root = pathlib.Path(path).expanduser()
    for folder in (root, root / "source"):
        if (folder / SOURCE_RUN_FILE).is_file() and (folder / "params").is_dir():
            return folder
    raise input_pipeline.ConfigError(
        f"no digits source run in {path} (config.source_checkpoint): expected a digits ADDA "
        f"workdir or its source folder, with {SOURCE_RUN_FILE} and params/"
    )


def _train_source_run(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    data: task_lib.DomainData,
    run_dir: pathlib.Path,
) -> None:
    """Trains the source classifier of config.source into run_dir (params/, source.json)."""
    logging.info("training the source classifier into %s", run_dir)
    source = {split: _as_labelled(arrays) for split, arrays in data.source.items()}
    params, history = train_source_classifier(
        source,
        seed=config.seed,
        num_epochs=config.source.num_epochs,
        batch_size=config.source.batch_size,
        weight_decay=config.source.weight_decay,
        optimizer=create_classifier_optimizer(
            config.source.learning_rate, config.source.b1, config.source.b2
        ),
        model=model,
        progress=config.progress_bar,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((run_dir / "params").resolve(), params, force=True)
    checkpointer.wait_until_finished()
    record = {
        "history": history,
        "source_val_accuracy": accuracy(params, model, source["val"]),
        "target_val_accuracy": accuracy(
            params, model, _as_labelled(data.target["val"])
        ),  # before DA, for the log only
    }
    (run_dir / SOURCE_RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
