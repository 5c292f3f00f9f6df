"""`initial`: the source map itself, before any adaptation (the 'before DA' column, SPEC §4)."""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best


@dataclasses.dataclass(frozen=True)
class Initial:
    """Keeps the evaluation before any step (`before_da`); its score, -step, prefers earlier."""

    name: str = "initial"
    label: str = "before DA"
    oracle: bool = False
    show_in_progress: bool = False  # its score is only the step

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Initial":
        del config
        return cls()

    def init(self) -> Best:
        return init_best()

    def update(self, state: Best, row: Mapping[str, jax.Array]) -> tuple[Best, Selection]:
        score = -jnp.asarray(row["step"], jnp.float32)
        state, is_best = keep_best(state, score, row["before_da"], row["step"])
        return state, Selection(is_best, score)
