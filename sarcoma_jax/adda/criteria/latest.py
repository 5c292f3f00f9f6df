"""`latest`: the last evaluation of the game (what a run without a stopping rule ends with)."""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best


@dataclasses.dataclass(frozen=True)
class Latest:
    """Keeps every evaluation after the start, so the last one in the end; score: the step."""

    name: str = "latest"
    label: str = "latest stop"
    oracle: bool = False
    show_in_progress: bool = False  # its score is only the step

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Latest":
        del config
        return cls()

    def init(self) -> Best:
        return init_best()

    def update(self, state: Best, row: Mapping[str, jax.Array]) -> tuple[Best, Selection]:
        score = jnp.asarray(row["step"], jnp.float32)
        state, is_best = keep_best(state, score, ~row["before_da"], row["step"])
        return state, Selection(is_best, score)
