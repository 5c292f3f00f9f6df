"""Mapping a one-seed function over a leading seed axis, as `jax.vmap` or as an unrolled loop.

`num_seeds` runs (segment/train.py, adda/train.py) train several seeds in one compiled program. vmap
turns every convolution with per-seed kernels into one grouped convolution (feature_group_count
= seeds), which GPUs and TPUs run well but XLA:CPU runs 3-5x slower than the seeds' convolutions
one after another (benchmarks/README.md, "Seeds per hour"). The unrolled form traces the function
once per seed inside the same jit and stacks the results: still one compiled call per step, with
ordinary convolutions that XLA:CPU can run side by side. Both compute the same function.
jax has no batching mode that keeps convolutions ungrouped, hence this small helper.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def use_vmap(config: ml_collections.ConfigDict) -> bool:
    """config.vmap_seeds, with None (the default) read as: vmap unless the devices are CPUs."""
    if config.get("vmap_seeds") is not None:
        return bool(config.vmap_seeds)
    return jax.default_backend() != "cpu"


def take(tree: Any, i: int, axis: int = 0) -> Any:
    """Seed i's part of a stacked pytree (its seed axis `axis` dropped); numpy leaves stay numpy,
    jax arrays (and tracers) stay jax."""
    index = (slice(None),) * axis + (i,)
    return jax.tree.map(lambda leaf: leaf[index], tree)


def stack(trees: Sequence[Any], axis: int = 0) -> Any:
    """Pytrees of one structure stacked leaf by leaf along a new seed axis `axis`."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=axis), *trees)


def seed_map(
    function: Callable,
    in_axes: Sequence[int | None],
    out_axes: int | Sequence[int] = 0,
    *,
    num_seeds: int,
    vmap: bool,
) -> Callable:
    """`function` over a seed axis: jax.vmap(function, in_axes, out_axes) or its unrolled twin.

    Args:
      function: takes one seed's arguments (positional), returns a pytree or a tuple of them.
      in_axes: per positional argument, the seed axis of all its leaves, or None (shared).
      out_axes: the seed axis of every output leaf, or one per element of a tuple output.
      num_seeds: the length of the seed axis (needed to unroll).
      vmap: True for jax.vmap, False for the unrolled loop.
    """
    if vmap:
        return jax.vmap(function, in_axes=tuple(in_axes), out_axes=out_axes)

    def unrolled(*args):
        outputs = [
            function(
                *(
                    arg if axis is None else take(arg, i, axis)
                    for arg, axis in zip(args, in_axes, strict=True)
                )
            )
            for i in range(num_seeds)
        ]
        if isinstance(out_axes, int):
            return stack(outputs, out_axes)
        return tuple(
            stack([output[k] for output in outputs], axis) for k, axis in enumerate(out_axes)
        )

    return unrolled
