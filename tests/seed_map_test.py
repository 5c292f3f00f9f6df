"""seed_map: the unrolled loop computes what jax.vmap computes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from sarcoma_jax import seed_map


def _step(params, shared, batch):
    """A conv layer with per-seed kernels, a shared offset, and a (state, metrics) output."""
    outputs = jax.lax.conv_general_dilated(
        batch, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    loss = jnp.mean((outputs + shared) ** 2, axis=(1, 2, 3))  # (batch,)
    return {"kernel": params["kernel"] * 0.5, "total": loss.sum()}, {"loss": loss}


class SeedMapTest(absltest.TestCase):
    def test_unrolled_equals_vmap(self):
        rng = np.random.default_rng(0)
        seeds = 3
        params = {"kernel": rng.normal(size=(seeds, 3, 3, 2, 4)).astype(np.float32)}
        shared = np.float32(0.25)
        batches = rng.normal(size=(5, seeds, 6, 6, 2)).astype(np.float32)  # seed axis 1
        in_axes, out_axes = (0, None, 1), (0, 1)
        results = {
            vmap: jax.jit(seed_map.seed_map(_step, in_axes, out_axes, num_seeds=seeds, vmap=vmap))(
                params, shared, batches
            )
            for vmap in (True, False)
        }
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            results[True],
            results[False],
        )
        state, step_metrics = results[False]
        self.assertEqual(state["kernel"].shape, (seeds, 3, 3, 2, 4))
        self.assertEqual(step_metrics["loss"].shape, (5, seeds))
        self.assertEqual(state["total"].shape, (seeds,))
        # Each seed's slice is the one-seed function on its slice.
        for i in range(seeds):
            single = _step({"kernel": params["kernel"][i]}, shared, batches[:, i])
            np.testing.assert_allclose(step_metrics["loss"][:, i], single[1]["loss"], rtol=1e-5)

    def test_default_is_vmap_except_on_cpu(self):
        config = ml_collections.ConfigDict({"vmap_seeds": None})
        self.assertEqual(seed_map.use_vmap(config), jax.default_backend() != "cpu")
        for forced in (True, False):
            config.vmap_seeds = forced
            self.assertEqual(seed_map.use_vmap(config), forced)


if __name__ == "__main__":
    absltest.main()
