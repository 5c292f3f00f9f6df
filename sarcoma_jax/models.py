"""Flax modules: the thesis' U-Net (§14.2), logit-map discriminator (§14.3), digits nets (§10.1)."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Keras/TF1 BatchNormalization defaults, which the reference code used (flax's epsilon is 1e-5).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
# U-Net variants (UNet.downsampling, UNet.upsampling).
DOWNSAMPLING = ("conv", "maxpool")
UPSAMPLING = ("zero_insert", "transpose", "nearest")
COMPUTE_DTYPES = ("float32", "bfloat16")


class ZeroInsertUpsampling(nn.Module):
    """ConvTranspose(kernel 1, stride 2, "SAME"), "upsampling by zero padding", computed cheaply.

    The transposed convolution puts `x @ kernel` on the even rows and columns of a twice-as-large
    map, zeros elsewhere, then adds the bias everywhere. Here that is a 1x1 convolution at the input
    resolution and `lax.pad` with one interior zero, which on CPU is far cheaper than XLA's
    transposed convolution over the zero-inserted map (its weight gradient above all; see
    benchmarks/README.md). Same function and same variables (`kernel` (1, 1, in, features),
    `bias` (features,), same initialisers) as nn.ConvTranspose, so checkpoints are interchangeable.
    """

    features: int
    dtype: Any = None  # computation dtype (None: that of the input); parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(batch, h, w, in) -> (batch, 2h, 2w, features)."""
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        projected = jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0])
        zero = jnp.zeros((), projected.dtype)
        upsampled = lax.pad(projected, zero, ((0, 0, 0), (0, 1, 1), (0, 1, 1), (0, 0, 0)))
        return upsampled + bias


def _batch_norm(
    use_running_average: bool,
    momentum: float = BN_MOMENTUM,
    name: str | None = None,
    dtype: Any = None,
) -> nn.BatchNorm:
    # Flax computes the statistics in at least float32 whatever `dtype` (the output's) is.
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=momentum,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


class UNet(nn.Module):
    """U-Net of SPEC §3; the defaults are the reference code's.

    Encoder level i (i = 0..depth-1) has base_filters * 2**(i+1) filters: [Conv3x3-ReLU,
    Conv3x3-ReLU, BN] (the skip), then downsampling. The bottleneck is BN, Conv3x3-ReLU x2 with
    base_filters * 2**(depth+1) filters. Decoder levels mirror the encoder: upsampling-ReLU to the
    level's filters, concat(skip, up), BN, Conv3x3-ReLU x2. Head: Conv3x3(1), BN, Conv3x3(1) -> one
    logit per pixel. 'same' padding.

    Attributes:
      depth: number of downsampling steps; the input side must be divisible by 2**depth.
      base_filters: 8 gives the reference 16, 32, 64 encoder filters and a 128-filter bottleneck.
      downsampling: 'conv' (Conv 2x2 stride 2 + ReLU, the reference) or 'maxpool' (MaxPool 2x2).
      upsampling: 'zero_insert' (ConvTranspose kernel 1 stride 2, "upsampling by zero padding", the
        reference), 'transpose' (ConvTranspose kernel 2 stride 2) or 'nearest'
        (nearest-neighbour resize, then Conv 3x3).
      eval_batch_stats: if True, BatchNorm normalises with the batch's statistics at evaluation
        too (what the reference code did, SPEC §9.3); the default uses the running averages. With
        True, apply at evaluation with mutable=['batch_stats'] and discard the update.
      bn_momentum: BatchNorm running-average momentum (0.99 as Keras); a clone with 0 makes a
        training pass store each batch's own statistics (used to re-estimate them).
      compute_dtype: 'float32' or 'bfloat16' (mixed precision: convolutions and activations in
        bfloat16, parameters, BatchNorm statistics, logits and hence the loss in float32).
    """

    depth: int = 3
    base_filters: int = 8
    downsampling: str = "conv"
    upsampling: str = "zero_insert"
    eval_batch_stats: bool = False
    bn_momentum: float = BN_MOMENTUM
    compute_dtype: str = "float32"

    @property
    def _dtype(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"unknown compute_dtype {self.compute_dtype!r}; use 'float32' or 'bfloat16'"
            )
        return jnp.dtype(self.compute_dtype)

    def _conv(self, features: int, kernel, name: str, strides=(1, 1)) -> nn.Conv:
        return nn.Conv(
            features, kernel, strides=strides, padding="SAME", dtype=self._dtype, name=name
        )

    def _down(self, x: jax.Array, features: int, name: str) -> jax.Array:
        if self.downsampling == "conv":
            return nn.relu(self._conv(features, (2, 2), name, strides=(2, 2))(x))
        if self.downsampling == "maxpool":
            return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        raise ValueError(f"unknown downsampling {self.downsampling!r}; use 'conv' or 'maxpool'")

    def _up(self, x: jax.Array, features: int, name: str) -> jax.Array:
        if self.upsampling == "zero_insert":
            up = ZeroInsertUpsampling(features, dtype=self._dtype, name=name)(x)
        elif self.upsampling == "transpose":
            up = nn.ConvTranspose(
                features, (2, 2), strides=(2, 2), padding="SAME", dtype=self._dtype, name=name
            )(x)
        elif self.upsampling == "nearest":
            batch, height, width, channels = x.shape
            resized = jax.image.resize(
                x, (batch, 2 * height, 2 * width, channels), method="nearest"
            )
            up = self._conv(features, (3, 3), name)(resized)
        else:
            raise ValueError(
                f"unknown upsampling {self.upsampling!r}; "
                "use 'zero_insert', 'transpose' or 'nearest'"
            )
        return nn.relu(up)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Maps images (batch, h, w, channels) to float32 logits (batch, h, w, 1)."""
        use_running_average = not train and not self.eval_batch_stats
        dtype = self._dtype

        def batch_norm(name):
            return _batch_norm(use_running_average, self.bn_momentum, name=name, dtype=dtype)

        def conv_relu(x, features, name):
            return nn.relu(self._conv(features, (3, 3), name)(x))

        level_filters = [self.base_filters * 2 ** (level + 1) for level in range(self.depth)]
        x = images
        skips = []
        for level, features in enumerate(level_filters):
            x = conv_relu(x, features, f"enc{level}_conv0")
            x = conv_relu(x, features, f"enc{level}_conv1")
            x = batch_norm(f"enc{level}_bn")(x)
            skips.append(x)
            x = self._down(x, features, name=f"enc{level}_down")

        bottleneck_filters = self.base_filters * 2 ** (self.depth + 1)
        x = batch_norm("bottleneck_bn")(x)
        x = conv_relu(x, bottleneck_filters, "bottleneck_conv0")
        x = conv_relu(x, bottleneck_filters, "bottleneck_conv1")

        for level in reversed(range(self.depth)):
            features = level_filters[level]
            up = self._up(x, features, name=f"dec{level}_up")
            x = jnp.concatenate([skips[level], up], axis=-1)
            x = batch_norm(f"dec{level}_bn")(x)
            x = conv_relu(x, features, f"dec{level}_conv0")
            x = conv_relu(x, features, f"dec{level}_conv1")

        x = self._conv(1, (3, 3), "head_conv0")(x)
        x = batch_norm("head_bn")(x)
        return self._conv(1, (3, 3), "head_conv1")(x).astype(jnp.float32)


DISCRIMINATOR_NORMS = ("batch", "layer", "none")


class LogitMapDiscriminator(nn.Module):
    """The reference ADDA discriminator (SPEC §3, thesis §14.3) on a segmenter's logit map.

    Layout: Dropout, BN; then per block its strided convs, LeakyReLU, BN; then a last conv with
    `final_strides` and BN. At 128x128 with the defaults the output is (batch, 1, 2, 1), i.e.
    exactly `num_classes` = 2 logits, as in the reference. For other input sizes, where the
    flattened output is not `num_classes` wide, a Dense(num_classes) is appended so the
    discriminator still works.

    Attributes:
      blocks: features of the kernel-2 stride-2 convs, grouped per block.
      final_features: features of the last conv.
      final_strides: strides of the last conv.
      input_dropout: dropout rate on the input logit map (active only in training).
      leaky_relu_slope: negative slope of LeakyReLU (Keras' default 0.3).
      num_classes: output logits (index 1 = source, 0 = target in the ADDA convention).
      bn_momentum: BatchNorm running-average momentum (see UNet).
      norm: 'batch' (the reference: BatchNorm after the input and after every block and the last
        conv), 'layer' (LayerNorm after the input and every block, each sample normalised over
        its own positions and channels, so its logits depend on that sample only; not after the
        last conv, and not where a sample's map is a single value) or 'none' (no normalisation;
        likewise per sample).

    A caveat of the reference layout (README, "Hypothesis II"). Its last BatchNorm normalises the
    last conv's output over the batch, and at training and at `discriminator_eval_bn='batch'`
    evaluation that batch is half source, half target. Whenever the two halves differ at all on
    that output, however slightly, normalisation stretches the difference to about +-1 standard
    deviation, so the argmax splits the batch along the domains: all right (recall = specificity
    = 1) or all wrong (both 0), while the cross-entropy can sit near log 2. Its recall and
    specificity then say which side of the batch mean each domain is on, not how confused the
    discriminator is. `norm='layer'` and `norm='none'` remove that coupling (tests/models_test.py
    shows it).
    """

    blocks: Sequence[Sequence[int]] = ((2, 4), (4, 2), (1, 1))
    final_features: int = 1
    final_strides: Sequence[int] = (2, 1)
    input_dropout: float = 0.3
    leaky_relu_slope: float = 0.3
    num_classes: int = 2
    bn_momentum: float = BN_MOMENTUM
    norm: str = "batch"

    @nn.compact
    def __call__(
        self, logit_map: jax.Array, train: bool, use_running_average: bool | None = None
    ) -> jax.Array:
        """Maps (batch, h, w, 1) logit maps to (batch, num_classes) logits.

        Args:
          logit_map: the segmenter's output.
          train: dropout on, and BatchNorm with batch statistics (unless overridden).
          use_running_average: BatchNorm mode; defaults to `not train`. Evaluating with
            train=False, use_running_average=False gives deterministic predictions that agree with
            the training-mode normalisation (then apply with mutable=['batch_stats'] and discard).

        Returns:
          Logits (batch, num_classes).
        """
        if self.norm not in DISCRIMINATOR_NORMS:
            raise ValueError(
                f"discriminator norm {self.norm!r}; use one of {', '.join(DISCRIMINATOR_NORMS)}"
            )
        if use_running_average is None:
            use_running_average = not train

        def normalise(x, last=False):
            if self.norm == "batch":
                return _batch_norm(use_running_average, self.bn_momentum)(x)
            # Over each sample's positions and channels; never the last conv's output (the
            # logits: LayerNorm would leave only their signs) nor a map of one value per sample
            # (at 32x32 the third block's output is 1x1x1, which LayerNorm sets to 0, cutting
            # the discriminator off from its input).
            if self.norm == "layer" and not last and math.prod(x.shape[-3:]) > 1:
                return nn.LayerNorm(epsilon=BN_EPSILON, reduction_axes=(-3, -2, -1))(x)
            return x

        x = nn.Dropout(self.input_dropout, deterministic=not train)(logit_map)
        x = normalise(x)
        for block in self.blocks:
            for features in block:
                x = nn.Conv(int(features), (2, 2), strides=(2, 2), padding="SAME")(x)
            x = nn.leaky_relu(x, negative_slope=self.leaky_relu_slope)
            x = normalise(x)
        x = nn.Conv(self.final_features, (2, 2), strides=tuple(self.final_strides), padding="SAME")(
            x
        )
        x = normalise(x, last=True)
        x = x.reshape((x.shape[0], -1))
        if x.shape[-1] != self.num_classes:
            x = nn.Dense(self.num_classes)(x)
        return x


class LeNetEncoder(nn.Module):
    """ADDA's digits network (SPEC §3, thesis §10.1): 28x28 images -> 10 class logits.

    Conv(20, 5x5)-MaxPool-ReLU, Conv(50, 5x5)-Dropout-MaxPool-ReLU, Dense 500-ReLU, Dense 10, with
    'valid' convolutions as in ADDA's LeNet (28 -> 24 -> 12 -> 8 -> 4).
    """

    num_classes: int = 10
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        """Maps images (batch, 28, 28, channels) to logits (batch, num_classes)."""
        x = nn.Conv(20, (5, 5), padding="VALID")(images)
        x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = nn.Conv(50, (5, 5), padding="VALID")(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.max_pool(x, (2, 2), strides=(2, 2)))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(500)(x))
        return nn.Dense(self.num_classes)(x)


class MLPDiscriminator(nn.Module):
    """ADDA's digits discriminator on the 10 logits: Dense 500-ReLU, Dense 500-ReLU, Dense 2."""

    hidden_features: Sequence[int] = (500, 500)
    num_classes: int = 2

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        """Maps (batch, d) to logits (batch, num_classes); `train` is unused (no dropout/BN)."""
        del train
        x = features
        for width in self.hidden_features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


MODELS: Mapping[str, type[nn.Module]] = {
    "unet": UNet,
    "logit_map_discriminator": LogitMapDiscriminator,
    "lenet": LeNetEncoder,
    "mlp_discriminator": MLPDiscriminator,
}


def create(model_config: Mapping[str, Any]) -> nn.Module:
    """Builds a module from a config with a `name` (a key of MODELS) and the module's attributes.

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    kwargs = dict(model_config)
    name = kwargs.pop("name")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    for key, value in kwargs.items():
        if isinstance(value, list):
            kwargs[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return MODELS[name](**kwargs)


def kernel_l2_penalty(params: Any) -> jax.Array:
    """Sum of squared conv/dense kernels (biases and BN scales excluded).

    Multiply by the weight (1e-3 for the discriminators, SPEC §3); this is Keras' `l2(w)`
    convention, w * sum(kernel**2).
    """
    kernels = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if getattr(path[-1], "key", None) == "kernel"
    ]
    return sum((jnp.sum(jnp.square(k)) for k in kernels), start=jnp.zeros((), jnp.float32))
