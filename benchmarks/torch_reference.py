"""PyTorch twins of the reference U-Net and logit-map discriminator, for benchmarks/train_step.py.

Same layers, shapes, BatchNorm settings (Keras' momentum 0.99 = torch's 0.01, epsilon 1e-3) and
'same' padding as sarcoma_jax.models.UNet / LogitMapDiscriminator with their defaults, in NCHW
(optionally channels-last memory). `load_unet_from_flax` copies flax variables in, so a test can
check that both compute the same function.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_KWARGS = {"eps": 1e-3, "momentum": 0.01}


class UNet(nn.Module):
    """sarcoma_jax.models.UNet(depth, base_filters) with strided-conv downsampling and zero-insert
    upsampling (ConvTranspose2d kernel 1 stride 2: the input lands on even rows and columns)."""

    def __init__(self, depth: int = 3, base_filters: int = 8, in_channels: int = 1):
        super().__init__()
        level_filters = [base_filters * 2 ** (level + 1) for level in range(depth)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for features in level_filters:
            self.encoder.append(
                nn.ModuleDict(
                    {
                        "conv0": nn.Conv2d(channels, features, 3, padding=1),
                        "conv1": nn.Conv2d(features, features, 3, padding=1),
                        "bn": nn.BatchNorm2d(features, **BN_KWARGS),
                        "down": nn.Conv2d(features, features, 2, stride=2),
                    }
                )
            )
            channels = features
        bottleneck_filters = base_filters * 2 ** (depth + 1)
        self.bottleneck_bn = nn.BatchNorm2d(channels, **BN_KWARGS)
        self.bottleneck_conv0 = nn.Conv2d(channels, bottleneck_filters, 3, padding=1)
        self.bottleneck_conv1 = nn.Conv2d(bottleneck_filters, bottleneck_filters, 3, padding=1)
        self.decoder = nn.ModuleList()
        channels = bottleneck_filters
        for features in reversed(level_filters):
            self.decoder.append(
                nn.ModuleDict(
                    {
                        "up": nn.ConvTranspose2d(channels, features, 1, stride=2, output_padding=1),
                        "bn": nn.BatchNorm2d(2 * features, **BN_KWARGS),
                        "conv0": nn.Conv2d(2 * features, features, 3, padding=1),
                        "conv1": nn.Conv2d(features, features, 3, padding=1),
                    }
                )
            )
            channels = features
        self.head_conv0 = nn.Conv2d(channels, 1, 3, padding=1)
        self.head_bn = nn.BatchNorm2d(1, **BN_KWARGS)
        self.head_conv1 = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, channels, h, w) -> logits (batch, 1, h, w)."""
        x = images
        skips = []
        for level in self.encoder:
            x = F.relu(level["conv0"](x))
            x = F.relu(level["conv1"](x))
            x = level["bn"](x)
            skips.append(x)
            x = F.relu(level["down"](x))
        x = self.bottleneck_bn(x)
        x = F.relu(self.bottleneck_conv0(x))
        x = F.relu(self.bottleneck_conv1(x))
        for level, skip in zip(self.decoder, reversed(skips), strict=True):
            x = torch.cat([skip, F.relu(level["up"](x))], dim=1)
            x = level["bn"](x)
            x = F.relu(level["conv0"](x))
            x = F.relu(level["conv1"](x))
        return self.head_conv1(self.head_bn(self.head_conv0(x)))


class LogitMapDiscriminator(nn.Module):
    """sarcoma_jax.models.LogitMapDiscriminator with its defaults, for 128x128 logit maps (where
    its output is exactly 2 logits, no Dense)."""

    def __init__(
        self,
        blocks: Sequence[Sequence[int]] = ((2, 4), (4, 2), (1, 1)),
        input_dropout: float = 0.3,
        leaky_relu_slope: float = 0.3,
    ):
        super().__init__()
        self.leaky_relu_slope = leaky_relu_slope
        self.dropout = nn.Dropout(input_dropout)
        self.input_bn = nn.BatchNorm2d(1, **BN_KWARGS)
        self.blocks = nn.ModuleList()
        channels = 1
        for block in blocks:
            convs = []
            for features in block:
                convs.append(nn.Conv2d(channels, features, 2, stride=2))
                channels = features
            self.blocks.append(
                nn.ModuleDict(
                    {"convs": nn.Sequential(*convs), "bn": nn.BatchNorm2d(channels, **BN_KWARGS)}
                )
            )
        self.final_conv = nn.Conv2d(channels, 1, 2, stride=(2, 1))
        self.final_bn = nn.BatchNorm2d(1, **BN_KWARGS)

    def forward(self, logit_map: torch.Tensor) -> torch.Tensor:
        """(batch, 1, h, w) -> (batch, 2) logits."""
        x = self.input_bn(self.dropout(logit_map))
        for block in self.blocks:
            x = F.leaky_relu(block["convs"](x), self.leaky_relu_slope)
            x = block["bn"](x)
        # flax 'SAME' for kernel 2, stride 1 pads one column after (none before).
        x = self.final_bn(self.final_conv(F.pad(x, (0, 1, 0, 0))))
        return x.flatten(1)


def kernel_l2_penalty(module: nn.Module) -> torch.Tensor:
    """Sum of squared conv kernels (biases and BN excluded), as models.kernel_l2_penalty."""
    return sum(
        (m.weight.square().sum() for m in module.modules() if isinstance(m, nn.Conv2d)),
        start=torch.zeros(()),
    )


def _tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _load_conv(conv: nn.Conv2d, params: Mapping[str, Any]) -> None:
    conv.weight.data.copy_(_tensor(params["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    conv.bias.data.copy_(_tensor(params["bias"]))


def _load_bn(bn: nn.BatchNorm2d, params: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    bn.weight.data.copy_(_tensor(params["scale"]))
    bn.bias.data.copy_(_tensor(params["bias"]))
    bn.running_mean.copy_(_tensor(stats["mean"]))
    bn.running_var.copy_(_tensor(stats["var"]))


def load_unet_from_flax(unet: UNet, variables: Mapping[str, Any]) -> None:
    """Copies the variables of a flax models.UNet (same depth and filters) into `unet`."""
    params, stats = variables["params"], variables["batch_stats"]
    for index, level in enumerate(unet.encoder):
        for name in ("conv0", "conv1", "down"):
            _load_conv(level[name], params[f"enc{index}_{name}"])
        _load_bn(level["bn"], params[f"enc{index}_bn"], stats[f"enc{index}_bn"])
    _load_bn(unet.bottleneck_bn, params["bottleneck_bn"], stats["bottleneck_bn"])
    _load_conv(unet.bottleneck_conv0, params["bottleneck_conv0"])
    _load_conv(unet.bottleneck_conv1, params["bottleneck_conv1"])
    depth = len(unet.decoder)
    for position, level in enumerate(unet.decoder):
        index = depth - 1 - position
        up = params[f"dec{index}_up"]
        # flax ConvTranspose kernel (1, 1, in, out) -> torch (in, out, 1, 1).
        level["up"].weight.data.copy_(_tensor(up["kernel"]).permute(2, 3, 0, 1))
        level["up"].bias.data.copy_(_tensor(up["bias"]))
        _load_bn(level["bn"], params[f"dec{index}_bn"], stats[f"dec{index}_bn"])
        _load_conv(level["conv0"], params[f"dec{index}_conv0"])
        _load_conv(level["conv1"], params[f"dec{index}_conv1"])
    _load_conv(unet.head_conv0, params["head_conv0"])
    _load_bn(unet.head_bn, params["head_bn"], stats["head_bn"])
    _load_conv(unet.head_conv1, params["head_conv1"])


def load_discriminator_from_flax(
    discriminator: LogitMapDiscriminator, variables: Mapping[str, Any]
) -> None:
    """Copies a flax models.LogitMapDiscriminator's variables (default layout, 128x128 inputs)."""
    params, stats = variables["params"], variables["batch_stats"]
    norms = iter(range(len(discriminator.blocks) + 2))
    convs = iter(range(sum(len(block["convs"]) for block in discriminator.blocks) + 1))

    def next_bn(bn: nn.BatchNorm2d) -> None:
        name = f"BatchNorm_{next(norms)}"
        _load_bn(bn, params[name], stats[name])

    next_bn(discriminator.input_bn)
    for block in discriminator.blocks:
        for conv in block["convs"]:
            _load_conv(conv, params[f"Conv_{next(convs)}"])
        next_bn(block["bn"])
    _load_conv(discriminator.final_conv, params[f"Conv_{next(convs)}"])
    next_bn(discriminator.final_bn)
