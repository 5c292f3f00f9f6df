"""What every criterion is (`Criterion`, `Selection`) and the state most keep (`Best`)."""

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp


class Selection(NamedTuple):
    """A criterion's verdict on one evaluation.

    Attributes:
      is_best: bool scalar; True makes this evaluation the criterion's pick (ties: the later).
      score: float32 scalar, the criterion's value here, higher is better; NaN where undefined.
    """

    is_best: jax.Array
    score: jax.Array


class Criterion(Protocol):
    """See the package docstring."""

    name: str
    label: str
    oracle: bool

    def init(self) -> Any: ...

    def update(self, state: Any, row: Mapping[str, jax.Array]) -> tuple[Any, Selection]: ...


class Best(NamedTuple):
    """The best score so far (-inf before the first eligible evaluation) and its step (-1)."""

    score: jax.Array  # float32 scalar
    step: jax.Array  # int32 scalar


def init_best() -> Best:
    """No evaluation kept yet."""
    return Best(score=jnp.array(-jnp.inf, jnp.float32), step=jnp.array(-1, jnp.int32))


def keep_best(
    best: Best, score: jax.Array, eligible: jax.Array, step: jax.Array
) -> tuple[Best, jax.Array]:
    """Keeps `score` when eligible and at least as high as the best (ties: the later; NaN never).

    Returns:
      The new Best and whether this evaluation became it (bool scalar).
    """
    score = jnp.asarray(score, jnp.float32)
    is_best = jnp.asarray(eligible, bool) & (score >= best.score)
    return Best(
        score=jnp.where(is_best, score, best.score),
        step=jnp.where(is_best, step, best.step).astype(jnp.int32),
    ), is_best
