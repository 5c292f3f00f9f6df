"""What a problem plugs into the ADDA game: the Task protocol and the data it hands over.

The game builds the maps from `config.model` and the discriminator from `config.discriminator`
(`models.create`); everything else problem-specific sits behind a Task, chosen by `config.task`:
a name in TASKS, or 'package.module:Factory' (a callable returning a Task, e.g. a class), or
passed as `task=` to `adda.train.train_and_evaluate`. A Task has:
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
"""

import importlib
import pathlib
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import ml_collections
import numpy as np

from sarcoma_jax.input_pipeline import ConfigError


class DomainData(NamedTuple):
    """Arrays of both domains: `source[split]` and `target[split]` for each of vocabulary.SPLITS.

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


# Built-in tasks by name (import paths, so that this module imports none of them).
TASKS: Mapping[str, str] = {
    "segmentation": "sarcoma_jax.adda.segmentation:SegmentationTask",
    "digits": "sarcoma_jax.digits.task:DigitsTask",
}


def get_task(name: str) -> Task:
    """A Task from TASKS by name, or from an import path 'package.module:Factory'.

    Raises:
      ConfigError: unknown name or path.
    """
    path = TASKS.get(name, name)
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ConfigError(
            f"config.task {name!r} is unknown; use one of {', '.join(TASKS)} or 'module:Factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"config.task {name!r} cannot be imported: {error}") from None
    return factory()
