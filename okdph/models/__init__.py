"""Backbones of docs/methods.md#backbones, built by name.

    >>> from okdph.models import create_backbone
    >>> net = create_backbone("resnet32", num_classes=100)
    >>> logits = net.head(net.last_stage(net.trunk(x)))  # == net(x)

Importing the family modules registers their builders.
"""

from . import densenet, imagenet, resnet, vgg  # noqa: F401  (registers the builders)
from .group import ModelGroup, make_students
from .registry import (Backbone, Head, create_backbone, display_name, image_size, is_backbone, list_backbones,
                       register_backbone)

__all__ = [
    "Backbone",
    "Head",
    "ModelGroup",
    "create_backbone",
    "display_name",
    "image_size",
    "is_backbone",
    "list_backbones",
    "make_students",
    "register_backbone",
]
