"""Tests for sarcoma_jax.models: shapes, parameter counts by hand, BatchNorm modes, variants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from sarcoma_jax import models


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _conv(kernel: int, channels_in: int, features: int) -> int:
    return kernel * kernel * channels_in * features + features


def _shapes(model, inputs):
    """The model's variables as shapes only (no compute)."""
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), inputs)


def _init(model, rng, inputs):
    """model.init in one compilation (eager init compiles every initializer separately)."""
    init_fn = jax.jit(
        lambda key, x: model.init(key, x, train=False),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return init_fn(rng, inputs)


def _reference_unet_params() -> int:
    """Trainable parameters of the reference U-Net (depth 3, base 8), counted layer by layer."""
    bn = 2  # scale and bias per channel
    encoder = (
        _conv(3, 1, 16) + _conv(3, 16, 16) + bn * 16 + _conv(2, 16, 16)
        + _conv(3, 16, 32) + _conv(3, 32, 32) + bn * 32 + _conv(2, 32, 32)
        + _conv(3, 32, 64) + _conv(3, 64, 64) + bn * 64 + _conv(2, 64, 64)
    )  # fmt: skip
    bottleneck = bn * 64 + _conv(3, 64, 128) + _conv(3, 128, 128)
    decoder = (
        _conv(1, 128, 64) + bn * (64 + 64) + _conv(3, 128, 64) + _conv(3, 64, 64)
        + _conv(1, 64, 32) + bn * (32 + 32) + _conv(3, 64, 32) + _conv(3, 32, 32)
        + _conv(1, 32, 16) + bn * (16 + 16) + _conv(3, 32, 16) + _conv(3, 16, 16)
    )  # fmt: skip
    head = _conv(3, 16, 1) + bn * 1 + _conv(3, 1, 1)
    return encoder + bottleneck + decoder + head


class UNetTest(parameterized.TestCase):
    def test_reference_parameter_count_by_hand(self):
        variables = _shapes(models.UNet(), jnp.zeros((1, 32, 32, 1)))
        self.assertEqual(_count(variables["params"]), _reference_unet_params())
        self.assertEqual(_reference_unet_params(), 472045)
        # Running mean and variance for every BN channel: 16+32+64 + 64 + 128+64+32 + 1.
        self.assertEqual(_count(variables["batch_stats"]), 2 * 401)

    @parameterized.product(downsampling=models.DOWNSAMPLING, upsampling=models.UPSAMPLING)
    def test_variants_give_one_logit_per_pixel(self, downsampling, upsampling):
        model = models.UNet(
            depth=2, base_filters=2, downsampling=downsampling, upsampling=upsampling
        )
        images = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 12, 1))
        variables = _init(model, jax.random.PRNGKey(0), images)
        logits = model.apply(variables, images, train=False)
        self.assertEqual(logits.shape, (2, 8, 12, 1))
        self.assertTrue(np.all(np.isfinite(logits)))

    def test_maxpool_has_no_downsampling_params(self):
        conv = _shapes(models.UNet(base_filters=2), jnp.zeros((1, 8, 8, 1)))
        pool = _shapes(models.UNet(base_filters=2, downsampling="maxpool"), jnp.zeros((1, 8, 8, 1)))
        downsampling_params = sum(_conv(2, 4 * 2**level, 4 * 2**level) for level in range(3))
        self.assertEqual(_count(conv["params"]) - _count(pool["params"]), downsampling_params)

    def test_base_filters_and_depth_change_widths(self):
        variables = _shapes(models.UNet(depth=2, base_filters=4), jnp.zeros((1, 8, 8, 1)))
        params = variables["params"]
        self.assertEqual(params["enc0_conv0"]["kernel"].shape, (3, 3, 1, 8))
        self.assertEqual(params["enc1_conv0"]["kernel"].shape, (3, 3, 8, 16))
        self.assertEqual(params["bottleneck_conv0"]["kernel"].shape, (3, 3, 16, 32))
        self.assertNotIn("enc2_conv0", params)

    def test_zero_insert_upsampling_leaves_only_the_bias_between_pixels(self):
        # ConvTranspose(kernel 1, stride 2) inserts zeros: every odd row and column of its output
        # is its bias alone; the even ones carry the (varying) input.
        model = models.UNet(depth=1, base_filters=2)
        images = jax.random.uniform(jax.random.PRNGKey(1), (1, 8, 8, 1))
        variables = _init(model, jax.random.PRNGKey(0), images)
        _, state = model.apply(
            variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        up = np.asarray(state["intermediates"]["dec0_up"]["__call__"][0])[0]
        bias = np.asarray(variables["params"]["dec0_up"]["bias"])
        self.assertEqual(up.shape, (8, 8, 4))
        np.testing.assert_allclose(up[1::2, :], np.broadcast_to(bias, up[1::2, :].shape))
        np.testing.assert_allclose(up[:, 1::2], np.broadcast_to(bias, up[:, 1::2].shape))
        self.assertGreater(np.std(up[::2, ::2]), 1e-4)

    def test_eval_uses_running_averages(self):
        model = models.UNet(depth=1, base_filters=2)
        rng = jax.random.PRNGKey(0)
        images = 3.0 + 2.0 * jax.random.normal(rng, (4, 8, 8, 1))
        variables = _init(model, rng, images)
        # Initial running stats are mean 0, var 1: evaluation must not depend on the batch, so one
        # image alone gives the same logits as inside the batch.
        alone = model.apply(variables, images[:1], train=False)
        in_batch = model.apply(variables, images, train=False)[:1]
        np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-5)
        # A training pass moves the running mean of the first BN towards the batch mean
        # (momentum 0.99): new = 0.99 * 0 + 0.01 * batch_mean.
        _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        first_bn_input = jax.nn.relu(
            model.apply(variables, images, train=False, capture_intermediates=True, mutable=True)[
                1
            ]["intermediates"]["enc0_conv1"]["__call__"][0]
        )
        np.testing.assert_allclose(
            updates["batch_stats"]["enc0_bn"]["mean"],
            0.01 * np.asarray(first_bn_input).mean(axis=(0, 1, 2)),
            rtol=1e-4,
            atol=1e-6,
        )
        # With the updated running statistics, evaluation output changes accordingly.
        updated = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        self.assertFalse(
            np.allclose(model.apply(updated, images, train=False), in_batch[:1].repeat(4, 0))
        )

    def test_eval_batch_stats_option_uses_the_batch(self):
        model = models.UNet(depth=1, base_filters=2, eval_batch_stats=True)
        rng = jax.random.PRNGKey(0)
        images = 3.0 + 2.0 * jax.random.normal(rng, (4, 8, 8, 1))
        variables = _init(model, rng, images)
        alone, _ = model.apply(variables, images[:1], train=False, mutable=["batch_stats"])
        in_batch, _ = model.apply(variables, images, train=False, mutable=["batch_stats"])
        train_mode, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        self.assertFalse(np.allclose(alone, in_batch[:1], atol=1e-4))
        np.testing.assert_allclose(in_batch, train_mode, rtol=1e-6)


class MixedPrecisionTest(parameterized.TestCase):
    @parameterized.parameters("zero_insert", "transpose", "nearest")
    def test_bfloat16_compute_keeps_float32_params_and_logits(self, upsampling):
        images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1))
        full = models.UNet(upsampling=upsampling)
        mixed = models.UNet(upsampling=upsampling, compute_dtype="bfloat16")
        variables = full.init(jax.random.PRNGKey(1), images, train=False)
        # Same variables (names, shapes, float32): checkpoints move between the two.
        mixed_variables = mixed.init(jax.random.PRNGKey(1), images, train=False)
        self.assertEqual(jax.tree.structure(variables), jax.tree.structure(mixed_variables))
        for leaf in jax.tree.leaves(mixed_variables):
            self.assertEqual(leaf.dtype, jnp.float32)
        expected = full.apply(variables, images, train=False)
        got = mixed.apply(variables, images, train=False)
        self.assertEqual(got.dtype, jnp.float32)
        # bfloat16 keeps 8 bits of mantissa: agreement to a few percent of the logits' spread.
        np.testing.assert_allclose(got, expected, atol=0.05 * float(jnp.std(expected)) + 1e-3)

        def loss(params, model):
            logits, _ = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(logits**2)

        grads_full = jax.grad(loss)(variables["params"], full)
        grads_mixed = jax.grad(loss)(variables["params"], mixed)
        for g_mixed in jax.tree.leaves(grads_mixed):
            self.assertEqual(g_mixed.dtype, jnp.float32)
        cosine = sum(
            jnp.vdot(a, b)
            for a, b in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads_mixed), strict=True)
        ) / (optax_norm(grads_full) * optax_norm(grads_mixed))
        # Not ~1: backpropagating through BatchNorm subtracts nearly equal bfloat16 numbers (the
        # one-channel head_bn above all), so the deeper layers' gradients agree to a cosine of
        # 0.85-0.95 at initialisation (measured); what that costs in F1 is in the README.
        self.assertGreater(float(cosine), 0.75)

    def test_unknown_compute_dtype_is_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "compute_dtype 'float16'"):
            models.UNet(compute_dtype="float16").init(
                jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), train=False
            )


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


class ZeroInsertUpsamplingTest(parameterized.TestCase):
    """The pad-based upsampling is the transposed convolution the reference used (benchmarks/)."""

    @parameterized.parameters((1, 4, 4, 3, 2), (2, 5, 3, 8, 16), (5, 16, 16, 128, 64))
    def test_same_function_as_conv_transpose_and_as_numpy(
        self, batch, height, width, channels, features
    ):
        inputs = jax.random.normal(jax.random.PRNGKey(0), (batch, height, width, channels))
        conv_transpose = nn.ConvTranspose(features, (1, 1), strides=(2, 2), padding="SAME")
        variables = conv_transpose.init(jax.random.PRNGKey(1), inputs)
        # A nonzero bias, so that the positions between the input pixels are checked too.
        variables = jax.tree.map(
            lambda leaf: leaf + jax.random.normal(jax.random.PRNGKey(2), leaf.shape), variables
        )
        upsampled = models.ZeroInsertUpsampling(features).apply(variables, inputs)
        np.testing.assert_allclose(
            upsampled, conv_transpose.apply(variables, inputs), rtol=1e-5, atol=1e-5
        )
        # float64 NumPy: x @ kernel on the even rows and columns, zeros elsewhere, plus the bias.
        kernel = np.asarray(variables["params"]["kernel"], np.float64)[0, 0]
        bias = np.asarray(variables["params"]["bias"], np.float64)
        expected = np.zeros((batch, 2 * height, 2 * width, features))
        expected[:, ::2, ::2] = np.asarray(inputs, np.float64) @ kernel
        np.testing.assert_allclose(upsampled, expected + bias, rtol=1e-5, atol=1e-4)

    def test_variables_and_initialisation_match_conv_transpose(self):
        # Same names, shapes and initial values: checkpoints of either formulation load in both.
        inputs = jnp.zeros((1, 4, 4, 6))
        rng = jax.random.PRNGKey(3)
        ours = models.ZeroInsertUpsampling(5).init(rng, inputs)
        reference = nn.ConvTranspose(5, (1, 1), strides=(2, 2), padding="SAME").init(rng, inputs)
        self.assertEqual(jax.tree.structure(ours), jax.tree.structure(reference))
        for ours_leaf, reference_leaf in zip(
            jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True
        ):
            np.testing.assert_array_equal(ours_leaf, reference_leaf)


class LogitMapDiscriminatorTest(parameterized.TestCase):
    def test_reference_layout_gives_two_logits_at_128(self):
        model = models.LogitMapDiscriminator()
        rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        variables = _init(model, rngs, jnp.zeros((3, 128, 128, 1)))
        params = variables["params"]
        conv_features = [params[f"Conv_{i}"]["kernel"].shape[-1] for i in range(7)]
        self.assertEqual(conv_features, [2, 4, 4, 2, 1, 1, 1])  # 7 convs as in the reference code
        self.assertNotIn("Dense_0", params)  # exactly 2 logits by construction
        # Hand count: convs k2 -> 4*cin*cout + cout; BN 2 per channel on 1, 4, 2, 1, 1 channels.
        convs = [(1, 2), (2, 4), (4, 4), (4, 2), (2, 1), (1, 1), (1, 1)]
        expected = sum(4 * cin * cout + cout for cin, cout in convs) + 2 * (1 + 4 + 2 + 1 + 1)
        self.assertEqual(_count(params), expected)
        logits = model.apply(variables, jnp.ones((3, 128, 128, 1)), train=False)
        self.assertEqual(logits.shape, (3, 2))

    def test_small_inputs_get_a_dense_head(self):
        model = models.LogitMapDiscriminator()
        variables = _init(model, jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 1)))
        self.assertIn("Dense_0", variables["params"])
        self.assertEqual(model.apply(variables, jnp.ones((2, 32, 32, 1)), False).shape, (2, 2))

    def test_dropout_only_in_training(self):
        model = models.LogitMapDiscriminator()
        x = jax.random.normal(jax.random.PRNGKey(2), (4, 128, 128, 1))
        variables = _init(model, jax.random.PRNGKey(0), x)
        eval_a = model.apply(variables, x, train=False)
        eval_b = model.apply(variables, x, train=False)
        np.testing.assert_array_equal(eval_a, eval_b)
        train_a, _ = model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)}, mutable=True
        )
        train_b, _ = model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(4)}, mutable=True
        )
        self.assertFalse(np.allclose(train_a, train_b))
        # Deterministic batch-statistics mode equals a training pass without dropout.
        batch_mode, _ = model.apply(
            variables, x, train=False, use_running_average=False, mutable=["batch_stats"]
        )
        no_dropout = models.LogitMapDiscriminator(input_dropout=0.0)
        train_no_dropout, _ = no_dropout.apply(variables, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(batch_mode, train_no_dropout, rtol=1e-6)

    def test_batch_norm_makes_verdicts_all_or_nothing_on_mixed_batches(self):
        # The caveat in LogitMapDiscriminator's docstring: on a 5 + 5 batch whose halves differ by
        # an offset, batch-statistics BN splits the verdicts along the halves (recall and
        # specificity both 0 or both 1) whether the offset is large or a thousand times smaller;
        # without BN a tiny offset leaves both halves with the same verdict, as it should.
        noise = 1e-5 * jax.random.normal(jax.random.PRNGKey(5), (10, 32, 32, 1))
        halves = jnp.concatenate([jnp.ones((5, 1, 1, 1)), -jnp.ones((5, 1, 1, 1))])

        def verdicts(model, offset):
            # Every sample the same map but for its half's offset: what the verdicts can tell
            # apart is the offset alone.
            x = 1.0 + noise[:1] + offset * halves
            variables = _init(model, jax.random.PRNGKey(0), x)
            logits, _ = model.apply(
                variables, x, train=False, use_running_average=False, mutable=["batch_stats"]
            )
            return np.asarray(jnp.argmax(logits, -1))

        batch_model = models.LogitMapDiscriminator(input_dropout=0.0)
        for offset in (1.0, 1e-3):
            split = verdicts(batch_model, offset)
            self.assertLen(set(split[:5]), 1, offset)
            self.assertLen(set(split[5:]), 1, offset)
            self.assertNotEqual(split[0], split[5], offset)

        for norm in ("none", "layer"):  # per-sample: a verdict never depends on the batch
            plain = models.LogitMapDiscriminator(input_dropout=0.0, norm=norm)
            self.assertLen(set(verdicts(plain, 1e-3)), 1, norm)
            variables = _init(plain, jax.random.PRNGKey(0), noise)
            self.assertNotIn("batch_stats", variables)
            alone = plain.apply(variables, noise[:1], train=False)
            together = plain.apply(variables, noise, train=False)[:1]
            np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "discriminator norm 'group'"):
            _init(models.LogitMapDiscriminator(norm="group"), jax.random.PRNGKey(0), noise)


    def test_per_sample_discriminators_see_their_input_at_32x32(self):
        # At 32x32 the third block's map is one value per sample: LayerNorm there (or on the
        # logits) would make the output a constant, and the target map would get no gradient.
        x = jax.random.normal(jax.random.PRNGKey(6), (4, 32, 32, 1))
        for norm in ("none", "layer"):
            model = models.LogitMapDiscriminator(input_dropout=0.0, norm=norm)
            variables = _init(model, jax.random.PRNGKey(1), x)

            def source_logit(images, model=model, variables=variables):
                return jnp.sum(model.apply(variables, images, train=False)[:, 1])

            gradient = jax.grad(source_logit)(x)
            self.assertGreater(float(jnp.min(jnp.abs(gradient).sum(axis=(1, 2, 3)))), 0.0, norm)
            logits = model.apply(variables, x, train=False)
            self.assertGreater(float(jnp.std(logits[:, 1] - logits[:, 0])), 0.0, norm)


class DigitsModelsTest(absltest.TestCase):
    def test_lenet_shapes_and_count(self):
        model = models.LeNetEncoder()
        variables = _shapes(model, jnp.zeros((2, 28, 28, 1)))
        # conv 5x5x1x20, conv 5x5x20x50, dense 800x500 (4*4*50 = 800), dense 500x10, with biases.
        expected = (25 * 20 + 20) + (25 * 20 * 50 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
        self.assertEqual(_count(variables["params"]), expected)
        logits = jax.eval_shape(
            lambda v, x: model.apply(v, x, False), variables, jnp.zeros((2, 28, 28, 1))
        )
        self.assertEqual(logits.shape, (2, 10))

    def test_mlp_discriminator(self):
        model = models.MLPDiscriminator()
        variables = _init(model, jax.random.PRNGKey(0), jnp.zeros((2, 10)))
        expected = (10 * 500 + 500) + (500 * 500 + 500) + (500 * 2 + 2)
        self.assertEqual(_count(variables["params"]), expected)
        self.assertEqual(model.apply(variables, jnp.zeros((5, 10)), False).shape, (5, 2))


class FactoryAndPenaltyTest(absltest.TestCase):
    def test_create_from_config(self):
        model = models.create({"name": "unet", "depth": 2, "base_filters": 4})
        self.assertIsInstance(model, models.UNet)
        self.assertEqual((model.depth, model.base_filters), (2, 4))
        discriminator = models.create({"name": "logit_map_discriminator", "blocks": [[2, 4], [1]]})
        self.assertEqual(discriminator.blocks, ((2, 4), (1,)))
        with self.assertRaisesRegex(ValueError, "unknown model"):
            models.create({"name": "resnet"})

    def test_kernel_l2_penalty_counts_kernels_only(self):
        params = {
            "Conv_0": {"kernel": jnp.full((2, 2, 1, 1), 2.0), "bias": jnp.ones(1)},
            "BatchNorm_0": {"scale": jnp.full(3, 5.0), "bias": jnp.ones(3)},
            "Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
        }
        self.assertAlmostEqual(float(models.kernel_l2_penalty(params)), 4 * 4.0 + 6 * 1.0)


if __name__ == "__main__":
    absltest.main()
