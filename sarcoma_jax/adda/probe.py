"""What a label-free criterion may look at during an evaluation (`Probe`), computed on demand.

At each evaluation of the game the loop builds one Probe per seed, and every criterion with a
`measure(probe)` method gets it and returns the columns it adds to the evaluation's row (e.g.
{'entropy': 0.21}); its `update` then reads them from the row. A Probe holds the target map's
outputs on the target val images and what can be computed from the target map without target
labels: its outputs on any images (e.g. transformed target val images), its features, its
outputs, features and per-image losses on labelled *source* val data, and the discriminator's
evaluation (recall, specificity and their soft versions). It never holds target labels: only the
oracle criteria, through the row's `target_val_metric`, see what they give.

What "units", "features" and "agreement" are depends on the task (`Task.unit_probabilities`,
`Task.feature_module`, `Task.agreement`, `Task.per_image_loss`): for segmentation a unit is a
pixel (a Bernoulli of tumour), the features are the U-Net's last hidden layer (per pixel) and two
predictions agree by their per-image Dice at p >= 0.5; for digits a unit is an image (10 classes),
the features LeNet's 500-wide hidden layer and agreement is equal argmax.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from sarcoma_jax import runtime
from sarcoma_jax.adda import game as game_lib


class ProbePrograms(NamedTuple):
    """A run's jit-compiled functions of one seed's map variables and a batch of images."""

    outputs: Callable  # (variables, images) -> outputs (batch, ...)
    image_features: Callable  # ... -> {'outputs', 'features' averaged per image (batch, channels)}


def compile_probe_programs(game: game_lib.Game, sharding: Any) -> ProbePrograms:
    """The target map's outputs, and its outputs with each image's features averaged over its
    units (`game_lib.apply_with_features`, the module `game.feature_module`), jit-compiled with
    the run's shardings."""

    def outputs(variables, images):
        return game.map_model.apply(variables, images, train=False)

    def with_image_features(variables, images):
        logits, features = game_lib.apply_with_features(game, variables, images)
        if features.ndim > 2:  # (batch, ..., channels): average over the units
            features = features.reshape(features.shape[0], -1, features.shape[-1]).mean(axis=1)
        return {"outputs": logits, "features": features}

    in_shardings = (sharding.replicated, sharding.examples)
    return ProbePrograms(
        outputs=jax.jit(outputs, in_shardings=in_shardings, out_shardings=sharding.replicated),
        image_features=jax.jit(
            with_image_features, in_shardings=in_shardings, out_shardings=sharding.replicated
        ),
    )


class Probe:
    """One seed's evaluation, as label-free criteria may see it (module docstring).

    Attributes:
      task: the run's Task (its label-free helpers).
      target_val_images: (n_t, ...) target val inputs; no labels.
      target_val_outputs: (n_t, ...) the target map's outputs on them.
      target_val_features: (n_t, ..., channels) its features of them (Task.feature_module).
      source_val: the source val arrays, labels included.
      evaluation: the game's evaluation of this seed (disc_loss, recall, specificity, soft_recall,
        soft_specificity, target_adversarial_loss), floats.
      seed: the run's seed (for criteria that sample).
    """

    def __init__(
        self,
        task: Any,
        programs: ProbePrograms,
        variables: Any,
        target_val_images: np.ndarray,
        target_val_outputs: np.ndarray,
        target_val_features: np.ndarray,
        source_val: Mapping[str, np.ndarray],
        evaluation: Mapping[str, float],
        batch_size: int,
        sharding: Any,
        seed: int,
    ):
        self.task = task
        self.target_val_images = target_val_images
        self.target_val_outputs = target_val_outputs
        self.target_val_features = target_val_features
        self.source_val = source_val
        self.evaluation = dict(evaluation)
        self.seed = seed
        self._programs = programs
        self._variables = variables
        self._batch_size = batch_size
        self._sharding = sharding

    def _batch_size_for(self, num_images: int) -> int:
        """The batch of a pass over `num_images`: all of them at once, up to four evaluation
        batches, rounded up to a multiple of the devices. A probe's passes have fixed sizes
        (source val, a share of target val), so each compiles once a run, and one call without
        padding costs less than several padded ones (the validators' budget)."""
        devices = self._sharding.examples.mesh.size
        size = max(self._batch_size, min(num_images, 4 * self._batch_size))
        return -(-size // devices) * devices

    def outputs_on(self, images: np.ndarray) -> np.ndarray:
        """The target map's outputs on any images (n, ...), in order."""
        return runtime.predict(
            self._programs.outputs,
            self._variables,
            images,
            self._batch_size_for(len(images)),
            self._sharding.examples,
        )

    def _with_image_features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return runtime.predict(
            self._programs.image_features,
            self._variables,
            images,
            self._batch_size_for(len(images)),
            self._sharding.examples,
        )

    @functools.cached_property
    def _source_val_pass(self) -> dict[str, np.ndarray]:
        # Per-image mean features, averaged on the device: what dev uses, without carrying
        # every pixel's features to the host.
        return self._with_image_features(self.source_val["image"])

    @property
    def source_val_outputs(self) -> np.ndarray:
        """(n_s, ...) the target map's outputs on the source val images."""
        return self._source_val_pass["outputs"]

    @property
    def source_val_features(self) -> np.ndarray:
        """(n_s, channels) the target map's features of each source val image, averaged over its
        units (pixels)."""
        return self._source_val_pass["features"]

    @functools.cached_property
    def target_val_probabilities(self) -> np.ndarray:
        """(units, classes) float64 probabilities of the target val outputs' units (pixels or
        images; `Task.unit_probabilities`), computed once for the validators that share them."""
        return self.task.unit_probabilities(self.target_val_outputs)
