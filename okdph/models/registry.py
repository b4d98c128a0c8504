"""Backbone registry and the interface every backbone shares (docs/methods.md#backbones).

Builders are registered under their own function name, as in timm's `register_model`, so grepping a
backbone name finds its definition, with the name tables and figures print (`display_name`). The
names are also okdph.names.BACKBONES, which the CLI offers without importing torch (a test keeps
the two equal). Every backbone is a `Backbone`: `trunk -> last_stage -> head`, split where ONE,
OKDDip, FFL and PCL (docs/methods.md#multi-branch-split) split the network into a shared trunk and branches.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = [
    "Backbone",
    "Head",
    "create_backbone",
    "display_name",
    "image_size",
    "is_backbone",
    "list_backbones",
    "register_backbone",
    "scale_channels",
    "concat_channels",
]

_BACKBONES: dict[str, Callable[..., "Backbone"]] = {}
_DISPLAY_NAMES: dict[str, str] = {}
_IMAGE_SIZES: dict[str, int] = {}


def register_backbone(fn: Callable[..., "Backbone"] | None = None, *, display_name: str | None = None,
                      image_size: int = 32):
    """Register a builder `fn(num_classes, width=1.0, ...)` under `fn.__name__`, as
    `@register_backbone(display_name="ResNet32")` (how tables and figures spell it) or as
    `@register_backbone` (displayed under its name). `image_size`: the side of the square input the
    network is built for (32: CIFAR's stem; 224: ImageNet's); runs on other data are refused."""

    def register(fn: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
        name = fn.__name__
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        _DISPLAY_NAMES[name] = display_name or name
        _IMAGE_SIZES[name] = image_size
        return fn

    return register if fn is None else register(fn)


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_BACKBONES)


def is_backbone(name: str) -> bool:
    return name in _BACKBONES


def display_name(name: str) -> str:
    """How tables and figures spell backbone `name` ("wrn20_8" -> "WRN20-8"); an unknown name as it is."""
    return _DISPLAY_NAMES.get(name, name)


def image_size(name: str) -> int:
    """The side of the square images backbone `name` is built for."""
    return _IMAGE_SIZES[name]


def create_backbone(name: str, num_classes: int, width: float = 1.0, **kwargs) -> "Backbone":
    """Build backbone `name` with `num_classes` outputs.

    Args:
        name: a registered builder name (see `list_backbones()`).
        num_classes: number of logits.
        width: multiplier on every channel count; 1.0 is the official model, smaller values give
            tiny models for smoke tests.
        **kwargs: builder-specific options, e.g. `dropout` for `vgg16`; an option the builder does
            not take raises `TypeError`.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(list_backbones())}")
    return _BACKBONES[name](num_classes, width=width, **kwargs)


def scale_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to an int >= 1; width 1.0 leaves `channels` unchanged."""
    if not (width > 0 and math.isfinite(width)):  # the comparison also rejects NaN
        raise ValueError(f"width must be a finite number > 0, got {width}")
    return max(1, int(round(channels * width)))


def concat_channels(tensors: list[torch.Tensor], groups: int = 1) -> torch.Tensor:
    """torch.cat along channels. With `groups` = K networks sharing the channel axis, as the fast engine
    runs them (okdph.engine.fused: network k owns one contiguous K-th of the channels), each network's
    channels are joined separately."""
    if groups == 1:
        return torch.cat(tensors, dim=1)
    b = tensors[0].shape[0]
    out = torch.cat([t.reshape(b, groups, -1, *t.shape[2:]) for t in tensors], dim=2)
    return out.reshape(b, -1, *out.shape[3:])


def check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


class Head(nn.Module):
    """Maps the last stage's feature map to logits: `head(f) == head.classifier(head.features(f))`.

    Subclasses define `features(fmap) -> (B, feature_dim)` and an attribute `classifier`.
    """

    classifier: nn.Module

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(fmap))


class Backbone(nn.Module):
    """`forward(x) == head(last_stage(trunk(x)))`.

    Attributes:
        trunk: input -> feature map before the last stage (`trunk_channels` channels); the part a
            multi-branch method shares.
        last_stage: trunk output -> final feature map; each branch owns a copy.
        head: final feature map -> logits, with `head.features` giving the pooled vector of size
            `feature_dim` and `head.classifier` mapping it to logits.
    """

    def __init__(self, trunk: nn.Module, last_stage: nn.Module, head: Head,
                 trunk_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.last_stage = last_stage
        self.head = head
        self.trunk_channels = int(trunk_channels)
        self.feature_dim = int(feature_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled feature vector, (B, feature_dim)."""
        return self.head.features(self.last_stage(self.trunk(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the pooled feature vector, (B, num_classes)."""
        return self.head.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last_stage(self.trunk(x)))
