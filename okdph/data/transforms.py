"""The training views and the test transform, as the official code builds them (docs/methods.md#training-views).

torchvision v1 transforms on PIL images, each composition ending ToTensor -> Normalize.

CIFAR-sized data (32x32: cifar10/100, digits, synthetic*); every training view starts with
RandomCrop(32, padding=4) (zero fill). The official code puts Resize([32, 32]) before it, an identity on
32x32 inputs, left out here.

| view        | ops before ToTensor                           | after ToTensor            |
|-------------|-----------------------------------------------|---------------------------|
| 'hflip'     | crop, RandomHorizontalFlip                    |                           |
| 'hflip+rot' | crop, RandomHorizontalFlip, RandomRotation(15) (nearest, fill 0) |        |
| 'cutout'    | crop, RandomHorizontalFlip                    | Cutout(1 hole, 16 px)     |
| 'augment'   | crop, RandAugment() (2 ops, magnitude 9)      |                           |
| 'auto_aug'  | crop, AutoAugment() (ImageNet policy, also on CIFAR) |                    |
| 'base'      | nothing (same as the test transform)          |                           |

'augment' and 'auto_aug' have no flip. A dataset whose images change class when mirrored (digits:
`DatasetInfo.mirror_invariant` False) gets every view without its flip. Cutout zeroes the tensor
before Normalize, so the hole reads -mean/std afterwards.

ImageNet-sized data (224): RandomResizedCrop(224) replaces the padded crop; 'cutout' uses a 32 px hole;
'base' and the test transform are Resize(256) -> CenterCrop(224). 'hflip+rot' is RandomResizedCrop ->
flip -> RandomRotation(15): the official code has no ImageNet 'hflip+rot' and silently falls back to
the test transform there; we build the view the name asks for.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from okdph.errors import DataError
from okdph.names import VIEWS

from .info import DatasetInfo

__all__ = ["VIEWS", "Cutout", "build_test_transform", "build_train_transform"]

# The views' constants, for this pipeline and the device one (okdph.data.gpu_augment) alike.
CIFAR_PADDING = 4
ROTATION_DEGREES = 15
CUTOUT_LENGTH = {"cifar": 16, "imagenet": 32}
_IMAGENET_RESIZE = 256  # Resize(256) -> CenterCrop(224)


class Cutout:
    """DeVries & Taylor 2017: zero `n_holes` squares of side `length` in a (C, H, W) tensor.

    Each centre (y, x) is uniform over the pixels; the square [y - length//2, y + length//2) x
    [x - length//2, x + length//2) is clipped at the borders (so it is smaller near an edge) and
    applied to all channels. Same geometry as the official data/auto_aug.py, but the centre is drawn
    from torch's RNG, not numpy's, so that the DataLoader's per-worker torch seeding covers it along
    with the other augmentations.
    """

    def __init__(self, n_holes: int = 1, length: int = 16):
        self.n_holes = n_holes
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        img = img.clone()
        half = self.length // 2
        for _ in range(self.n_holes):
            y = int(torch.randint(h, ()))
            x = int(torch.randint(w, ()))
            img[..., max(y - half, 0):min(y + half, h), max(x - half, 0):min(x + half, w)] = 0.0
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_holes={self.n_holes}, length={self.length})"


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise DataError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")


def build_train_transform(view: str, info: DatasetInfo) -> Callable:
    """PIL image -> normalised float tensor (3, S, S), S = info.image_size, for one training view."""
    _check_view(view)
    if view == "base":
        return build_test_transform(info)
    size = info.image_size
    crop = T.RandomCrop(size, padding=CIFAR_PADDING) if info.family == "cifar" else T.RandomResizedCrop(size)
    hole = CUTOUT_LENGTH[info.family]
    flip = [T.RandomHorizontalFlip()] if info.mirror_invariant else []
    rotation = T.RandomRotation(ROTATION_DEGREES, interpolation=InterpolationMode.NEAREST, fill=0)
    pil_ops = {
        "hflip": [crop, *flip],
        "hflip+rot": [crop, *flip, rotation],
        "cutout": [crop, *flip],
        "augment": [crop, T.RandAugment()],
        "auto_aug": [crop, T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)],
    }[view]
    tensor_ops = [Cutout(1, hole)] if view == "cutout" else []
    return T.Compose([*pil_ops, T.ToTensor(), *tensor_ops, T.Normalize(info.mean, info.std)])


def build_test_transform(info: DatasetInfo) -> Callable:
    """PIL image -> normalised float tensor, no augmentation (also the 'base' view)."""
    resize = [] if info.family == "cifar" else [T.Resize(_IMAGENET_RESIZE), T.CenterCrop(info.image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(info.mean, info.std)])
