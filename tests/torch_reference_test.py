"""Tests for benchmarks/torch_reference.py: the PyTorch twins compute the flax models' functions."""

import pathlib
import sys

import jax
import numpy as np
from absl.testing import absltest, parameterized

from sarcoma_jax import models

try:
    import torch
except ImportError:  # torch is only in the 'bench' extra.
    torch = None

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))


def _perturbed(variables, seed):
    """Params plus noise, running means and variances moved off 0 and 1 (variances stay positive),
    so that biases, BN scales and running statistics all change the output."""
    rng = np.random.default_rng(seed)

    def noise(leaf):
        return 0.1 * rng.normal(size=leaf.shape).astype(np.float32)

    return {
        "params": jax.tree.map(lambda leaf: leaf + noise(leaf), variables["params"]),
        "batch_stats": jax.tree.map(
            lambda leaf: leaf + 0.5 + np.abs(noise(leaf)), variables["batch_stats"]
        ),
    }


def _nchw(array):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, 1)))


@absltest.skipIf(torch is None, "torch is not installed (pip install -e .[bench])")
class TorchReferenceTest(parameterized.TestCase):
    @parameterized.parameters(False, True)
    def test_unet_matches_flax(self, train):
        import torch_reference

        images = np.random.default_rng(0).normal(size=(3, 16, 24, 1)).astype(np.float32)
        model = models.UNet()
        variables = _perturbed(model.init(jax.random.PRNGKey(0), images, train=False), 1)
        if train:
            expected, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            expected = model.apply(variables, images, train=False)
        unet = torch_reference.UNet().train(train)
        torch_reference.load_unet_from_flax(unet, variables)
        with torch.no_grad():
            logits = unet(_nchw(images)).numpy()
        np.testing.assert_allclose(
            np.moveaxis(logits, 1, -1), expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max()
        )

    def test_discriminator_matches_flax(self):
        import torch_reference

        logit_maps = np.random.default_rng(2).normal(size=(4, 128, 128, 1)).astype(np.float32)
        model = models.LogitMapDiscriminator()
        variables = _perturbed(model.init(jax.random.PRNGKey(3), logit_maps, train=False), 4)
        expected = model.apply(variables, logit_maps, train=False)
        discriminator = torch_reference.LogitMapDiscriminator().eval()
        torch_reference.load_discriminator_from_flax(discriminator, variables)
        with torch.no_grad():
            logits = discriminator(_nchw(logit_maps)).numpy()
        self.assertEqual(logits.shape, (4, 2))
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    def test_kernel_l2_penalty_matches_flax(self):
        import torch_reference

        model = models.LogitMapDiscriminator()
        variables = model.init(jax.random.PRNGKey(5), np.zeros((2, 128, 128, 1)), train=False)
        discriminator = torch_reference.LogitMapDiscriminator()
        torch_reference.load_discriminator_from_flax(discriminator, variables)
        with torch.no_grad():
            penalty = float(torch_reference.kernel_l2_penalty(discriminator))
        self.assertAlmostEqual(
            penalty,
            float(models.kernel_l2_penalty(variables["params"])),
            places=4,
        )


if __name__ == "__main__":
    absltest.main()
