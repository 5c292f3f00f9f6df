"""`confusion`: the confusion stop (thesis §12, SPEC §4): the highest confusion score (eq. 26)
over a rolling window of the discriminator's recall and specificity.

The score and its window are sarcoma_jax.confusion's (the thesis' proposal, with its notes on
eq. 26 as printed); this file is the stopping rule around them.
"""

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from sarcoma_jax import confusion as confusion_lib
from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best


class ConfusionState(NamedTuple):
    """The window of the last evaluations and the best window score so far."""

    window: confusion_lib.ConfusionWindow
    best: Best


@dataclasses.dataclass(frozen=True)
class ConfusionStop:
    """Pushes each evaluation after the start into a window of `window_size`; once the window is
    full and the discriminator has taken more than `delay` steps, keeps the evaluation with the
    highest window score (ties: the later). Score: the window's (NaN until it is full)."""

    window_size: int = confusion_lib.CONFUSION_WINDOW_SIZE
    delay: int = confusion_lib.CONFUSION_STOP_DELAY
    name: str = "confusion"
    label: str = "confusion stop"
    oracle: bool = False
    recall_column: str = "recall"
    specificity_column: str = "specificity"

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ConfusionStop":
        return cls(window_size=int(config.confusion_window), delay=int(config.confusion_delay))

    def init(self) -> ConfusionState:
        return ConfusionState(confusion_lib.init_window(self.window_size), init_best())

    def update(
        self, state: ConfusionState, row: Mapping[str, jax.Array]
    ) -> tuple[ConfusionState, Selection]:
        started = ~row["before_da"]
        pushed = confusion_lib.push(
            state.window, row[self.recall_column], row[self.specificity_column]
        )
        window = jax.tree.map(lambda new, old: jnp.where(started, new, old), pushed, state.window)
        score = confusion_lib.window_score(window)
        eligible = started & (row["disc_steps"] > self.delay) & confusion_lib.window_is_full(window)
        best, is_best = keep_best(state.best, score, eligible, row["step"])
        return ConfusionState(window, best), Selection(is_best, score)
