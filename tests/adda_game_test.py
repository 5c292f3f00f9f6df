"""Tests that would catch a broken ADDA game (sarcoma_jax.adda.game): the losses of both steps
against a hand-written cross-entropy with SPEC §4's labels, each step leaving the other network
alone, and one plain gradient step of each network lowering its own loss."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from configs import adda_base
from sarcoma_jax.adda import criteria
from sarcoma_jax.adda import game as game_lib

IMAGE_SIZE = 16
BATCH = 4
# SPEC §4, typed here and not taken from the code under test: the discriminator labels source
# outputs 1 and target outputs 0; the target map is trained against the source label.
SOURCE_LABEL, TARGET_LABEL = 1, 0


def _config():
    config = adda_base.get_config("smoke", "CT", "PT")
    config.model.depth = 1
    config.model.base_filters = 2
    config.discriminator.blocks = ((2,), (2,))
    # No dropout, so a step's outputs can be recomputed outside it without its PRNG key.
    config.discriminator.input_dropout = 0.0
    return config


def _log_softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over rows of -log softmax(logits)[label], in float64 (written out, no library)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.mean(log_softmax[np.arange(len(labels)), labels]))


class GameStepsTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        config = _config()
        cls.game = game_lib.create_game(config)
        rng = np.random.default_rng(0)
        shape = (BATCH, IMAGE_SIZE, IMAGE_SIZE, 1)
        cls.source_images = jnp.asarray(rng.uniform(0.0, 0.4, shape), jnp.float32)
        cls.target_images = jnp.asarray(rng.uniform(0.5, 1.0, shape), jnp.float32)
        image = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1))
        source_variables = cls.game.map_model.init(jax.random.PRNGKey(1), image, train=False)
        cls.source_variables = dict(source_variables)
        cls.criteria_state = criteria.init(criteria.build(config))
        cls.state = game_lib.create_game_state(
            jax.random.PRNGKey(2),
            cls.game,
            cls.source_variables,
            (IMAGE_SIZE, IMAGE_SIZE, 1),
            cls.criteria_state,
        )
        # The target map starts as a perturbed copy, so that the two maps differ.
        noise = jax.tree.map(
            lambda leaf: 0.05 * jax.random.normal(jax.random.PRNGKey(3), leaf.shape),
            cls.state.target_params,
        )
        cls.state = cls.state.replace(
            target_params=jax.tree.map(jnp.add, cls.state.target_params, noise)
        )

    def _discriminator_logits(self, state, inputs):
        """The discriminator as a step applies it: training mode, batch statistics."""
        logits, _ = self.game.discriminator.apply(
            {"params": state.disc_params, "batch_stats": state.disc_batch_stats},
            inputs,
            train=True,
            mutable=["batch_stats"],
        )
        return np.asarray(logits)

    def _map_outputs(self, variables, images):
        return self.game.map_model.apply(variables, images, train=False)

    def test_disc_step_loss_is_the_cross_entropy_with_source_1_target_0(self):
        _, step_metrics = jax.jit(functools.partial(game_lib.disc_step, self.game))(
            self.state, self.source_variables, self.source_images, self.target_images
        )
        inputs = jnp.concatenate(
            [
                self._map_outputs(self.source_variables, self.source_images),
                self._map_outputs(self.state.target_variables(), self.target_images),
            ]
        )
        labels = np.array([SOURCE_LABEL] * BATCH + [TARGET_LABEL] * BATCH)
        expected = _log_softmax_cross_entropy(
            self._discriminator_logits(self.state, inputs), labels
        )
        self.assertAlmostEqual(float(step_metrics["disc_cross_entropy"]), expected, places=5)
        squared_kernels = sum(
            float(np.sum(np.asarray(leaf, np.float64) ** 2))
            for path, leaf in jax.tree_util.tree_leaves_with_path(self.state.disc_params)
            if "kernel" in jax.tree_util.keystr(path)
        )
        np.testing.assert_allclose(
            float(step_metrics["disc_loss"]),
            expected + self.game.disc_l2 * squared_kernels,
            rtol=1e-5,
        )

    def test_target_step_loss_is_the_cross_entropy_of_target_outputs_against_source_1(self):
        _, step_metrics = jax.jit(functools.partial(game_lib.target_step, self.game))(
            self.state, self.source_variables, self.source_images, self.target_images
        )
        inputs = jnp.concatenate(
            [
                self._map_outputs(self.source_variables, self.source_images),
                self._map_outputs(self.state.target_variables(), self.target_images),
            ]
        )
        logits = self._discriminator_logits(self.state, inputs)  # BN over the mixed batch
        expected = _log_softmax_cross_entropy(logits[BATCH:], np.full(BATCH, SOURCE_LABEL))
        self.assertAlmostEqual(float(step_metrics["target_loss"]), expected, places=5)

    def test_each_step_leaves_the_other_network_bit_identical(self):
        arguments = (self.source_variables, self.source_images, self.target_images)
        disc_state, _ = jax.jit(functools.partial(game_lib.disc_step, self.game))(
            self.state, *arguments
        )
        target_state, _ = jax.jit(functools.partial(game_lib.target_step, self.game))(
            self.state, *arguments
        )

        def assert_identical(a, b):
            jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))

        def assert_changed(a, b):
            self.assertFalse(
                all(
                    np.array_equal(x, y)
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
                )
            )

        for field in ("target_params", "target_batch_stats", "target_opt_state", "target_steps"):
            assert_identical(getattr(disc_state, field), getattr(self.state, field))
        for field in ("disc_params", "disc_batch_stats", "disc_opt_state", "disc_steps"):
            assert_identical(getattr(target_state, field), getattr(self.state, field))
        assert_changed(disc_state.disc_params, self.state.disc_params)
        assert_changed(disc_state.disc_batch_stats, self.state.disc_batch_stats)
        assert_changed(target_state.target_params, self.state.target_params)
        self.assertEqual((int(disc_state.disc_steps), int(target_state.target_steps)), (1, 1))

    def test_one_gradient_step_lowers_each_network_s_own_loss(self):
        # Plain SGD with a small step: a correct gradient must lower the loss on the same batch.
        game = dataclasses.replace(
            self.game, target_tx=optax.sgd(1e-3), disc_tx=optax.sgd(1e-3), disc_l2=0.0
        )
        state = game_lib.create_game_state(
            jax.random.PRNGKey(2),
            game,
            self.source_variables,
            (IMAGE_SIZE, IMAGE_SIZE, 1),
            self.criteria_state,
        ).replace(target_params=self.state.target_params)
        arguments = (self.source_variables, self.source_images, self.target_images)
        disc_step = jax.jit(functools.partial(game_lib.disc_step, game))
        target_step = jax.jit(functools.partial(game_lib.target_step, game))
        # Each step returns the loss before its update; a second step on the same batch gives
        # the loss after the first.
        after_disc, before = disc_step(state, *arguments)
        _, after = disc_step(after_disc, *arguments)
        self.assertLess(float(after["disc_loss"]), float(before["disc_loss"]))
        after_target, before = target_step(state, *arguments)
        _, after = target_step(after_target, *arguments)
        self.assertLess(float(after["target_loss"]), float(before["target_loss"]))


if __name__ == "__main__":
    absltest.main()
