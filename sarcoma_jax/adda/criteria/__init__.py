"""Stopping criteria: which of the game's evaluations each one keeps. One file per criterion.

A criterion (`Criterion`) has a `name`, a `label` for tables, whether it is an `oracle` (reads
target labels: a ceiling, never a method), and two pure, jittable functions over the evaluations
of a run: `init()` gives its state (a pytree of arrays, part of the checkpointed game state), and
`update(state, row)` takes one evaluation's row and returns the new state and a `Selection`:
whether this evaluation becomes its pick (`is_best`) and its `score` there, signed so that higher
is better (NaN where it has none yet). The loop saves the target map at every new pick into
checkpoints/<name>/, writes each score into metrics.jsonl as `<name>_score`, and scores every
pick on target test and val into results.json; the report's tables follow the criteria they find
in results.json. Nothing outside this package names a criterion.

The row (jax scalars) has: `step` (discriminator + target updates), `disc_steps`,
`target_steps`, `before_da` (True for the evaluation of the source map before any step),
`recall`, `specificity` (the discriminator's on source / target val), `disc_loss` (its
cross-entropy on both val splits) and `target_adversarial_loss` (the target loss on target val).
An oracle also gets `target_val_metric`, the task's primary metric (F1) of the target map on
target val, which needs target labels; the others never see it (`label_free`).

Adding one: write a file here with a frozen dataclass (or any object) with these members and a
`from_config(config)` classmethod, and add the class to REGISTRY; or, without touching this
package, name it in `config.criteria` as 'package.module:Name' (a class with `from_config`, or a
callable taking the config). Optional: a
`show_in_progress` attribute (default True) says whether the progress bar shows its score.
"""

import importlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sarcoma_jax.adda.criteria import (
    best_loss,
    confusion,
    consistency,
    dev,
    entropy,
    highest_peak,
    im,
    initial,
    latest,
    snd,
    soft_confusion,
    source_val,
)
from sarcoma_jax.adda.criteria.base import Criterion, Selection
from sarcoma_jax.input_pipeline import ConfigError

# The row's column that needs target labels; only oracles receive it.
LABEL_COLUMNS = ("target_val_metric",)


# name -> criterion class (built by its `from_config(config)`); also the report's column order.
REGISTRY: Mapping[str, type] = types.MappingProxyType(
    {
        # The thesis' five (SPEC §4).
        "initial": initial.Initial,
        "highest_peak": highest_peak.HighestPeak,
        "confusion": confusion.ConfusionStop,
        "latest": latest.Latest,
        "best_loss": best_loss.BestLoss,
        # Label-free validators (SPEC §10).
        "soft_confusion": soft_confusion.SoftConfusionStop,
        "entropy": entropy.Entropy,
        "im": im.InformationMaximisation,
        "snd": snd.SoftNeighbourhoodDensity,
        "dev": dev.DeepEmbeddedValidation,
        "consistency": consistency.Consistency,
        "source_val": source_val.SourceVal,
    }
)
DEFAULT = tuple(REGISTRY)  # config.criteria's default: all of them
THESIS_CRITERIA = DEFAULT[:5]  # the thesis' five, what runs before the validators recorded
# The map before adaptation: the 'before DA' column of the tables.
BEFORE_DA = "initial"
# The criterion the README recommends: the tables' 'ADDA' and 'RESET' columns, the overlays and
# `predict`'s default for an ADDA workdir. The thesis' choice is the confusion stop.
RECOMMENDED = "confusion"


def _resolve(name: str) -> Callable[[ml_collections.ConfigDict], Criterion]:
    """The factory of a registered name or an import path (a class with `from_config`, or a
    callable taking the config)."""
    if name in REGISTRY:
        return REGISTRY[name].from_config
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ConfigError(
            f"config.criteria: {name!r} is unknown; use some of {', '.join(REGISTRY)} or "
            "'package.module:Factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"config.criteria: {name!r} cannot be imported: {error}") from None
    return getattr(factory, "from_config", factory)


def build(config: ml_collections.ConfigDict) -> tuple[Criterion, ...]:
    """The criteria `config.criteria` names (default DEFAULT), in that order.

    Raises:
      ConfigError: an unknown or repeated name, or two criteria of one name.
    """
    names = tuple(config.get("criteria") or DEFAULT)
    built = tuple(_resolve(name)(config) for name in names)
    seen = [criterion.name for criterion in built]
    repeated = sorted({name for name in seen if seen.count(name) > 1})
    if repeated:
        raise ConfigError(f"config.criteria names {', '.join(repeated)} more than once")
    for criterion in built:
        if not criterion.name.isidentifier():
            raise ConfigError(f"criterion name {criterion.name!r} must be an identifier")
    return built


def label_free(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row without the columns that need target labels."""
    return {key: value for key, value in row.items() if key not in LABEL_COLUMNS}


def init(criteria: Sequence[Criterion]) -> dict[str, Any]:
    """Every criterion's state before the first evaluation, by name."""
    return {criterion.name: criterion.init() for criterion in criteria}


def update(
    criteria: Sequence[Criterion], states: Mapping[str, Any], row: Mapping[str, jax.Array]
) -> tuple[dict[str, Any], dict[str, Selection]]:
    """One evaluation through every criterion (pure, jittable); an oracle gets the whole row,
    the others `label_free(row)`.

    Returns:
      The new states and each criterion's Selection, by name.
    """
    row = {key: jnp.asarray(value) for key, value in row.items()}
    new_states, selections = {}, {}
    for criterion in criteria:
        seen = row if criterion.oracle else label_free(row)
        new_states[criterion.name], selection = criterion.update(states[criterion.name], seen)
        selections[criterion.name] = Selection(
            is_best=jnp.asarray(selection.is_best, bool),
            score=jnp.asarray(selection.score, jnp.float32),
        )
    return new_states, selections


def sort_names(names: Sequence[str]) -> list[str]:
    """Criterion names in the registry's order, unknown ones after them in their given order."""
    order = {name: position for position, name in enumerate(REGISTRY)}
    return sorted(dict.fromkeys(names), key=lambda name: order.get(name, len(order)))


def label(name: str) -> str:
    """How tables name a registered criterion ('confusion stop'); others by their name."""
    return REGISTRY[name].label if name in REGISTRY else name.replace("_", " ")
