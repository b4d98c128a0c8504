"""CIFAR ResNets: ResNet-32, bottleneck ResNet-110 and WRN-20-8 (docs/methods.md#backbones).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; the wide variant follows the
torchvision `wide_resnet` convention (wider inner bottleneck), not Zagoruyko & Komodakis' pre-activation
WRN. These are the DefangChen/OKDDip variants the official OKDPH code trains: a 3x3 stem of 16
channels, three stages at strides 1, 2, 2, and type-B (1x1 conv + BN) shortcuts only where the shape
changes. ResNet-110 and WRN-20-8 use bottleneck blocks, so they are ~1.15M and ~6.8M parameters.

Split (docs/methods.md#multi-branch-split): trunk = stem + layer1 + layer2, last_stage = layer3,
head = avgpool + Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Backbone, Head, check_num_classes, register_backbone, scale_channels

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "PooledHead", "init_resnet_", "resnet32", "resnet110", "wrn20_8"]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if base_width != 64:
            raise ValueError("BasicBlock has no inner width to widen; base_width must be 64")
        out_ch = planes * self.expansion
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        # Registered after the main path so that modules() (and hence the init RNG stream) follows
        # the official code's order.
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1-BN + shortcut, then ReLU; output planes*4 channels.

    The inner width is planes * base_width / 64, so base_width=512 gives the 8x wider WRN-20-8.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        inner = int(planes * (base_width / 64.0))
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, inner)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, inner, stride)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = conv1x1(inner, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """Type-B shortcut: a projection only where the identity does not fit."""
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


def make_stage(block: type[nn.Module], in_ch: int, planes: int, num_blocks: int, stride: int,
               base_width: int = 64) -> nn.Sequential:
    """`num_blocks` blocks; only the first one strides or changes the channel count."""
    blocks = [block(in_ch, planes, stride, base_width)]
    out_ch = planes * block.expansion
    blocks += [block(out_ch, planes, 1, base_width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ResNetTrunk(nn.Module):
    """Stem (conv3x3 + BN + ReLU) followed by the first two stages."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, int], widths: tuple[int, int, int],
                 base_width: int) -> None:
        super().__init__()
        stem_ch, w1, w2 = widths
        self.conv1 = conv3x3(3, stem_ch)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.layer1 = make_stage(block, stem_ch, w1, layers[0], 1, base_width)
        self.layer2 = make_stage(block, w1 * block.expansion, w2, layers[1], 2, base_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer2(self.layer1(x))


class PooledHead(Head):
    """Global average pool -> flatten -> `classifier` (a Linear)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_features, num_classes)

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)


class CifarResNet(Backbone):
    """ResNet for 32x32 inputs (the official `ResNet` with inplanes 16 and three stages).

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage, e.g. (5, 5, 5) for ResNet-32.
        num_classes: number of logits.
        base_width: bottleneck inner width per 64 (torchvision's `width_per_group`); 512 for WRN-20-8.
        width: channel multiplier for tiny test models; 1.0 gives stage widths 16, 32, 64.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int], num_classes: int,
                 base_width: int = 64, width: float = 1.0) -> None:
        check_num_classes(num_classes)
        stem_ch, w1, w2, w3 = (scale_channels(c, width) for c in (16, 16, 32, 64))
        trunk = ResNetTrunk(block, layers[:2], (stem_ch, w1, w2), base_width)
        trunk_channels = w2 * block.expansion
        last_stage = make_stage(block, trunk_channels, w3, layers[2], 2, base_width)
        feature_dim = w3 * block.expansion
        head = PooledHead(feature_dim, num_classes)
        super().__init__(trunk, last_stage, head, trunk_channels, feature_dim)
        self.reset_parameters()

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        init_resnet_(module or self)


def init_resnet_(module: nn.Module) -> None:
    """The ResNet init of the official code and of torchvision (docs/methods.md#initialisation): He-normal fan_out
    convs, BN 1/0, Linear left at PyTorch's default, no zero-init of a block's last BN."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_backbone(display_name="ResNet32")
def resnet32(num_classes: int, width: float = 1.0) -> CifarResNet:
    """ResNet-32: basic blocks [5, 5, 5], 64-d feature (docs/methods.md#backbones)."""
    variant = dict(block=BasicBlock, layers=(5, 5, 5))
    return CifarResNet(num_classes=num_classes, width=width, **variant)


@register_backbone(display_name="ResNet110")
def resnet110(num_classes: int, width: float = 1.0) -> CifarResNet:
    """ResNet-110, bottleneck variant: [12, 12, 12] x expansion 4, 256-d feature (docs/methods.md#backbones)."""
    variant = dict(block=Bottleneck, layers=(12, 12, 12))
    return CifarResNet(num_classes=num_classes, width=width, **variant)


@register_backbone(display_name="WRN20-8")
def wrn20_8(num_classes: int, width: float = 1.0) -> CifarResNet:
    """WRN-20-8: bottleneck [2, 2, 2] with 8x inner width, 256-d feature (docs/methods.md#backbones)."""
    variant = dict(block=Bottleneck, layers=(2, 2, 2), base_width=64 * 8)
    return CifarResNet(num_classes=num_classes, width=width, **variant)
