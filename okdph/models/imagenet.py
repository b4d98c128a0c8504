"""ImageNet ResNet-18 (docs/methods.md#backbones).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, exactly as
`torchvision.models.resnet18(num_classes=...)` builds it: the official code uses torchvision's model,
randomly initialised. It is assembled here from torchvision's own `BasicBlock`, in torchvision's
construction and initialisation order, so that at width 1.0 and the same seed its weights equal
`torchvision.models.resnet18`'s (tests/test_models.py checks this); the assembly is what lets it take
the trunk / last-stage split and a `width` multiplier.

Split (by analogy with the CIFAR ResNets, docs/methods.md#multi-branch-split): trunk = stem (7x7
conv, BN, ReLU, max-pool)
+ layer1..layer3; last_stage = layer4; head = global average pool + fc.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from .registry import Backbone, check_num_classes, register_backbone, scale_channels
from .resnet import PooledHead, init_resnet_

__all__ = ["ImageNetResNet", "resnet18"]


def make_stage(in_ch: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """torchvision's `_make_layer` for basic blocks: a projection only on the first block, if needed."""
    downsample = None
    if stride != 1 or in_ch != planes * BasicBlock.expansion:
        downsample = nn.Sequential(conv1x1(in_ch, planes * BasicBlock.expansion, stride),
                                   nn.BatchNorm2d(planes * BasicBlock.expansion))
    blocks = [BasicBlock(in_ch, planes, stride, downsample)]
    blocks += [BasicBlock(planes * BasicBlock.expansion, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class ImageNetResNet(Backbone):
    """torchvision's basic-block ResNet for 224x224 inputs.

    Args:
        layers: blocks per stage, (2, 2, 2, 2) for ResNet-18.
        num_classes: number of logits.
        width: channel multiplier for tiny test models; 1.0 gives stage widths 64, 128, 256, 512.
    """

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int, width: float = 1.0) -> None:
        check_num_classes(num_classes)
        w = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        trunk = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)),
            ("bn1", nn.BatchNorm2d(w[0])),
            ("relu", nn.ReLU()),
            ("maxpool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ("layer1", make_stage(w[0], w[0], layers[0], 1)),
            ("layer2", make_stage(w[0], w[1], layers[1], 2)),
            ("layer3", make_stage(w[1], w[2], layers[2], 2)),
        ]))
        last_stage = make_stage(w[2], w[3], layers[3], 2)
        head = PooledHead(w[3] * BasicBlock.expansion, num_classes)
        super().__init__(trunk, last_stage, head, trunk_channels=w[2], feature_dim=w[3])
        self.reset_parameters()

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        init_resnet_(module or self)  # torchvision's resnet18 init is the same as the CIFAR ResNets'

@register_backbone(display_name="ResNet18", image_size=224)
def resnet18(num_classes: int, width: float = 1.0) -> ImageNetResNet:
    """ResNet-18 for ImageNet: basic blocks [2, 2, 2, 2], 512-d feature, 11,689,512 parameters at 1000 classes."""
    variant = dict(layers=(2, 2, 2, 2))
    return ImageNetResNet(num_classes=num_classes, width=width, **variant)
