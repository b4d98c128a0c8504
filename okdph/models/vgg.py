"""CIFAR VGG-16 with batch norm (docs/methods.md#backbones).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015,
in the CIFAR form the official OKDPH code inherits from DefangChen/OKDDip: 13 conv3x3 layers (with
biases) each followed by BN and ReLU, five 2x2 max-pools taking 32x32 to 1x1, and a 3-layer MLP head
on the flattened 512-d vector.

Split (docs/methods.md#multi-branch-split): trunk = stem (2 convs + pool), layer1, layer2, layer3 (512x2x2 out);
last_stage = layer4 (3 conv512 + pool); head = flatten + Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import Backbone, Head, check_num_classes, register_backbone, scale_channels

__all__ = ["MLP_HIDDEN", "ConvBNReLU", "MLPHead", "VGG", "linear_std", "vgg16"]


class ConvBNReLU(nn.Module):
    """conv3x3 (with bias, as in the official model) -> BN -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def make_stage(in_ch: int, out_ch: int, num_convs: int) -> nn.Sequential:
    """`num_convs` ConvBNReLU layers, then a 2x2 max-pool that halves the resolution."""
    layers = [ConvBNReLU(in_ch if i == 0 else out_ch, out_ch) for i in range(num_convs)]
    return nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2))


class VGGTrunk(nn.Module):
    def __init__(self, widths: tuple[int, int, int, int], depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.stem = make_stage(3, widths[0], depths[0])
        self.layer1 = make_stage(widths[0], widths[1], depths[1])
        self.layer2 = make_stage(widths[1], widths[2], depths[2])
        self.layer3 = make_stage(widths[2], widths[3], depths[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class MLPHead(Head):
    """flatten -> `classifier` = Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        # The last stage ends at 1x1 on 32x32 inputs, so flattening is the pooled vector.
        return torch.flatten(fmap, 1)

    def hidden_layers(self) -> list[nn.Linear]:
        """The Linear layers that read the hidden units (not the features)."""
        return [m for m in self.classifier if isinstance(m, nn.Linear)][1:]


class VGG(Backbone):
    """VGG with BN for 32x32 inputs.

    Args:
        depths: conv layers in (stem, layer1, layer2, layer3, layer4); (2, 2, 3, 3, 3) is VGG-16.
        num_classes: number of logits.
        dropout: dropout probability in the head; 0.0 in the official model, 0.5 in the ONE and
            OKDDip branches (docs/methods.md#one, docs/methods.md#okddip).
        width: channel multiplier of the convolutions for small models (1.0: 64..512, the official
            model). The MLP head keeps its 512 hidden units at every width (`MLP_HIDDEN`), and its
            first Linear's std follows the width (`linear_std`), so that every layer starts with
            the gain it has at full width.
    """

    def __init__(self, depths: tuple[int, int, int, int, int], num_classes: int, dropout: float = 0.0,
                 width: float = 1.0) -> None:
        check_num_classes(num_classes)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = tuple(scale_channels(c, width) for c in (64, 128, 256, 512, 512))
        hidden = MLP_HIDDEN
        trunk = VGGTrunk(widths[:4], depths[:4])
        last_stage = make_stage(widths[3], widths[4], depths[4])
        head = MLPHead(widths[4], hidden, num_classes, dropout)
        super().__init__(trunk, last_stage, head, trunk_channels=widths[3], feature_dim=widths[4])
        self.width = width
        self.reset_parameters()

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        """Official init (docs/methods.md#initialisation) of `module` (default: this network): He-normal
        fan_out convs with zero bias, BN 1/0, Linear N(0, 0.01) with zero bias: the std of a Linear
        that reads the features follows the width (`linear_std`), one that reads the 512 hidden
        units keeps the official 0.01."""
        module = module or self
        hidden_input = {id(layer) for head in module.modules() if isinstance(head, MLPHead)
                        for layer in head.hidden_layers()}
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                std = OFFICIAL_LINEAR_STD if id(m) in hidden_input else linear_std(self.width)
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)


OFFICIAL_LINEAR_STD = 0.01  # every Linear of the official VGG files, whatever its size
# The head's hidden width, as in the official model, at every channel multiplier: the head costs
# little beside the convolutions, and a narrower one with Dropout(0.5) (ONE's and OKDDip's heads)
# learns far more slowly (docs/methods.md#vgg16-plateau).
MLP_HIDDEN = 512


def linear_std(width: float) -> float:
    """The std of a VGG Linear layer that reads the features (or any input whose size follows the
    width) at channel multiplier `width`: the official 0.01 at full width.

    A fixed std does not follow the width the way the fan-based conv init does: such a layer's gain,
    std * sqrt(fan_in), falls with sqrt(width), and the head would start quieter than the
    full-width network's, on a loss plateau that full-width training does not have
    (docs/methods.md#vgg16-plateau). Scaling the std by 1/sqrt(width) keeps its gain as it is at
    full width.
    """
    return OFFICIAL_LINEAR_STD / math.sqrt(width)


@register_backbone(display_name="VGG16")
def vgg16(num_classes: int, width: float = 1.0, dropout: float = 0.0) -> VGG:
    """VGG-16 (BN): 13 convs + 3 FC, 512-d feature (docs/methods.md#backbones)."""
    variant = dict(depths=(2, 2, 3, 3, 3))
    return VGG(num_classes=num_classes, dropout=dropout, width=width, **variant)
