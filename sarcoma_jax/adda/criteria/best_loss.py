"""`best_loss`: the lowest target adversarial loss on target val (thesis §15-7's 'best loss')."""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from sarcoma_jax.adda.criteria.base import Best, Selection, init_best, keep_best

MIN_TARGET_STEPS = 50  # SPEC §4: target steps before best-loss stop may select a model


@dataclasses.dataclass(frozen=True)
class BestLoss:
    """Keeps the lowest `target_adversarial_loss` (score: its negative) among evaluations after at
    least `min_target_steps` target steps (ties: the later).

    The target loss is the cross-entropy of the discriminator's verdict on target outputs against
    the source label: low when the discriminator takes target maps for source maps.
    """

    min_target_steps: int = MIN_TARGET_STEPS
    name: str = "best_loss"
    label: str = "best loss stop"
    oracle: bool = False

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "BestLoss":
        return cls(min_target_steps=int(config.best_loss_min_target_steps))

    def init(self) -> Best:
        return init_best()

    def update(self, state: Best, row: Mapping[str, jax.Array]) -> tuple[Best, Selection]:
        score = -jnp.asarray(row["target_adversarial_loss"], jnp.float32)
        eligible = (row["target_steps"] >= self.min_target_steps) & ~row["before_da"]
        state, is_best = keep_best(state, score, eligible, row["step"])
        return state, Selection(is_best, score)
