"""`highest_peak`: the best target val metric (F1) of the game. An ORACLE: it reads target labels,
so it is a ceiling for the label-free criteria, never a method (thesis §15-7's 'highest peak')."""

import dataclasses
from collections.abc import Mapping

import jax
import ml_collections

from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best


@dataclasses.dataclass(frozen=True)
class HighestPeak:
    """Keeps the highest `target_val_metric` after the start (ties: the later)."""

    name: str = "highest_peak"
    label: str = "highest peak (oracle)"
    oracle: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "HighestPeak":
        del config
        return cls()

    def init(self) -> Best:
        return init_best()

    def update(self, state: Best, row: Mapping[str, jax.Array]) -> tuple[Best, Selection]:
        score = row["target_val_metric"]
        state, is_best = keep_best(state, score, ~row["before_da"], row["step"])
        return state, Selection(is_best, score)
