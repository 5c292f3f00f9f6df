"""The pattern every label-free validator shares: a value measured at each evaluation (one row
column of its own name), kept at its best after the start. One file per validator defines the
measurement; this is the keeping."""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best


class Validator:
    """Base of the validators: subclasses (frozen dataclasses) set `name`, `label`,
    `higher_is_better` and define `measure(probe) -> {name: value}`."""

    name: str
    label: str
    oracle: bool = False
    higher_is_better: bool = True

    @classmethod
    def from_config(cls, config):
        del config
        return cls()

    def init(self) -> Best:
        return init_best()

    def update(self, state: Best, row: Mapping[str, jax.Array]) -> tuple[Best, Selection]:
        value = jnp.asarray(row[self.name], jnp.float32)
        score = value if self.higher_is_better else -value
        state, is_best = keep_best(state, score, ~row["before_da"], row["step"])
        return state, Selection(is_best, score)
