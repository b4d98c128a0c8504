"""CIFAR DenseNet-BC, DenseNet-40-12 (docs/methods.md#backbones).

Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, in its BC form (1x1 bottleneck to
bn_size * k channels, compression 0.5 in the transitions) as the official OKDPH code inherits it from
DefangChen/OKDDip: a plain 3x3 conv0 (no BN after it), three dense blocks of 6 layers with growth 12,
channels 24 -> 96 -> 48 -> 120 -> 60 -> 132, then BN -> ReLU -> global average pool -> Linear.

Split (docs/methods.md#multi-branch-split): trunk = conv0, block1, trans1, block2, trans2 (60x8x8
out); last_stage = block3 (132x8x8); head = norm_final BN -> ReLU -> avgpool -> Linear. The official
ONE/OKDDip/FFL branches share one block3 (docs/methods.md#quirks-of-the-official-code); that is
decided where those methods build branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Backbone, Head, check_num_classes, concat_channels, register_backbone, scale_channels

__all__ = ["DenseBlock", "DenseLayer", "DenseNet", "DenseNetHead", "Transition", "densenet40_12"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (to bn_size * growth) -> BN-ReLU-conv3x3 (to growth): the new features only."""

    def __init__(self, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        inner = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inner, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and all earlier layers' outputs.

    `channel_groups` is K when the fast engine runs K networks as one grouped network
    (okdph.engine.fused); the concatenation then joins each network's channels separately.
    """

    def __init__(self, num_layers: int, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.channel_groups = 1
        self.layers = nn.ModuleList(
            DenseLayer(in_ch + i * growth, growth, bn_size) for i in range(num_layers)
        )
        self.out_channels = in_ch + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = concat_channels([x, layer(x)], self.channel_groups)
        return x


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compressing the channels) -> 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), kernel_size=2, stride=2)


class DenseNetTrunk(nn.Module):
    def __init__(self, conv0: nn.Conv2d, block1: DenseBlock, trans1: Transition, block2: DenseBlock,
                 trans2: Transition) -> None:
        super().__init__()
        self.conv0 = conv0
        self.block1 = block1
        self.trans1 = trans1
        self.block2 = block2
        self.trans2 = trans2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.conv0(x))
        return self.trans2(self.block2(self.trans1(x)))


class DenseNetHead(Head):
    """norm_final BN -> ReLU -> global average pool -> flatten -> `classifier` (a Linear).

    DenseNet layers are pre-activation, so the last block's output still needs its BN and ReLU.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.norm_final = nn.BatchNorm2d(in_features)
        self.classifier = nn.Linear(in_features, num_classes)

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        # At 32x32 inputs the map is 8x8, so this equals the official avg_pool2d(kernel_size=8).
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm_final(fmap)), 1), 1)


class DenseNet(Backbone):
    """DenseNet-BC with three dense blocks for 32x32 inputs.

    Args:
        block_config: layers per dense block, e.g. (6, 6, 6) for depth 40.
        num_classes: number of logits.
        growth: growth rate k.
        init_features: channels of conv0.
        bn_size: bottleneck width as a multiple of k.
        compression: transition output = floor(compression * input channels).
        width: multiplier on `growth` and `init_features` for tiny test models.
    """

    def __init__(self, block_config: tuple[int, int, int], num_classes: int, growth: int = 12,
                 init_features: int = 24, bn_size: int = 4, compression: float = 0.5,
                 width: float = 1.0) -> None:
        check_num_classes(num_classes)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        growth = scale_channels(growth, width)
        ch = scale_channels(init_features, width)

        def transition(in_ch: int) -> Transition:
            return Transition(in_ch, max(1, int(in_ch * compression)))

        conv0 = nn.Conv2d(3, ch, kernel_size=3, padding=1, bias=False)
        block1 = DenseBlock(block_config[0], ch, growth, bn_size)
        trans1 = transition(block1.out_channels)
        block2 = DenseBlock(block_config[1], trans1.conv.out_channels, growth, bn_size)
        trans2 = transition(block2.out_channels)
        trunk = DenseNetTrunk(conv0, block1, trans1, block2, trans2)
        trunk_channels = trans2.conv.out_channels
        block3 = DenseBlock(block_config[2], trunk_channels, growth, bn_size)
        head = DenseNetHead(block3.out_channels, num_classes)
        super().__init__(trunk, block3, head, trunk_channels, feature_dim=block3.out_channels)
        self.reset_parameters()

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        """Official init (docs/methods.md#initialisation) of `module` (default: this network): He-normal
        convs with PyTorch's defaults (fan_in), BN 1/0, Linear with default weight and zero bias."""
        for m in (module or self).modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


@register_backbone(display_name="DenseNet40-12")
def densenet40_12(num_classes: int, width: float = 1.0) -> DenseNet:
    """DenseNet-BC-40 with k = 12: blocks [6, 6, 6], 24 initial features, 132-d feature
    (docs/methods.md#backbones)."""
    variant = dict(block_config=(6, 6, 6), growth=12, init_features=24, bn_size=4, compression=0.5)
    return DenseNet(num_classes=num_classes, width=width, **variant)
