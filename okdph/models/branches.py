"""Multi-branch networks: a shared trunk and m branches cut from any backbone
(docs/methods.md#multi-branch-split).

ONE, OKDDip, FFL and PCL all split a backbone before its last stage (`Backbone.trunk`), keep one trunk
and give every branch its own copy of the last stage and head:

    x -> trunk -> t -> branch_i = head_i(last_stage_i(t)) -> z_i          i = 0 … m-1

`build_multibranch` does this for every registered backbone. Each method's network builder lives
with its method (`baselines/one.py` `one_network`, `okddip.py`, `ffl.py`, `pcl.py`) and says how the
official model deviates from this plain layout; each deviation that changes the architecture or its
initialisation is an official quirk, applied only in the `official` fidelity and named where it is
applied, beside the method's extra modules (ONE's gate, OKDDip's attention, FFL's fusion module,
PCL's ensemble head and temporal mean).

    >>> net = build_multibranch(create_backbone("resnet32", 100), backbone_factory("resnet32", 100, 1.0), 2)
    >>> t = net.trunk(x)
    >>> features, logits = net.branches[0](t)      # (B, 64), (B, 100)
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .group import ModelGroup

from .densenet import DenseNet, DenseNetHead
from .imagenet import ImageNetResNet
from .registry import Backbone, create_backbone
from .resnet import CifarResNet
from .vgg import VGG, linear_std

__all__ = [
    "Branch",
    "MultiBranchNet",
    "backbone_factory",
    "build_multibranch",
    "family_of",
    "init_linear_like_",
]


def family_of(backbone: Backbone) -> str:
    """"vgg", "densenet" or "resnet": the family whose official model files and initialisation a
    multi-branch network follows (docs/methods.md#initialisation). A backbone of another kind has
    no official multi-branch form to follow: ValueError, rather than a guess."""
    if isinstance(backbone, VGG):
        return "vgg"
    if isinstance(backbone, DenseNet):
        return "densenet"
    if isinstance(backbone, (CifarResNet, ImageNetResNet)):
        return "resnet"
    raise ValueError(f"no multi-branch family for backbone {type(backbone).__name__}: the multi-branch methods "
                     "know ResNets, VGG and DenseNet (okdph.models.branches.family_of); add its family there")


class Branch(nn.Module):
    """One branch: a last stage and a head, applied to the trunk's output."""

    def __init__(self, last_stage: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.last_stage = last_stage
        self.head = head

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Trunk output -> (pooled features (B, d), logits (B, C))."""
        features = self.head.features(self.last_stage(t))
        return features, self.head.classifier(features)

    def forward_map(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Trunk output -> (the map the head pools, (B, d, h, w); logits (B, C)).

        This is the map FFL's fusion module concatenates. For a DenseNet head it is ReLU(BN(block 3)):
        densenet_ffl.py appends the post-BN map to its list and then applies an in-place ReLU to that
        same tensor, so the fusion module sees the post-ReLU map.
        """
        fmap = self.last_stage(t)
        if isinstance(self.head, DenseNetHead):
            fmap = F.relu(self.head.norm_final(fmap))
        # Every CIFAR head is a global average pool of this map (VGG's 1x1 map: a flatten).
        return fmap, self.head.classifier(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1))


class MultiBranchNet(nn.Module):
    """A shared trunk and `len(branches)` branches.

    Attributes:
        trunk: input -> feature map with `trunk_channels` channels.
        branches: a `ModelGroup` of `Branch` modules, called together on the trunk's output
            (`branches([t] * m)` -> features (m, B, d), logits (m, B, C)), which lets the fast
            engine run independent branches as one grouped network. Branches may share a module (a
            shared last stage or head), in which case `parameters()` counts it once.
        feature_dim: size of each branch's pooled feature vector.
        family: "resnet", "vgg" or "densenet", the backbone family (see `family_of`).
    """

    def __init__(self, trunk: nn.Module, branches: list[Branch], trunk_channels: int, feature_dim: int,
                 family: str) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = ModelGroup(branches)
        self.trunk_channels = trunk_channels
        self.feature_dim = feature_dim
        self.family = family

    def forward(self, x: Tensor) -> Tensor:
        """One input through the trunk once and every branch: stacked logits (m, B, C)."""
        t = self.trunk(x)
        return self.branches([t] * len(self.branches))[1]


def reinit_like_(module: nn.Module, backbone: Backbone) -> None:
    """Re-initialise every layer of `module` as `backbone`'s family initialises its own
    (docs/methods.md#initialisation).

    Every family's `reset_parameters` takes the module to initialise (with the backbone's own
    width where the init depends on it).
    """
    backbone.reset_parameters(module)


def init_linear_like_(module: nn.Module, family: str, width: float) -> None:
    """Initialise the Linear layers of an extra module (gate, attention, ensemble head) as the
    official model file of that family does: its init loop runs over the whole model.

    vgg: N(0, 0.01) weights at full width (okdph.models.vgg.linear_std), zero bias; densenet: zero
    bias; resnet: PyTorch's default.
    """
    for m in module.modules():
        if not isinstance(m, nn.Linear):
            continue
        if family == "vgg":
            nn.init.normal_(m.weight, 0.0, linear_std(width))
        if family in ("vgg", "densenet") and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_multibranch(source: Backbone, make_backbone: Callable[[], Backbone], num_branches: int, *,
                      share_last_stage: bool = False, share_head: bool = False,
                      copy_branches: bool = False, head_dropout: float | None = None) -> MultiBranchNet:
    """`source`'s trunk with `num_branches` branches.

    Args:
        source: gives the trunk and branch 0.
        make_backbone: builds a freshly initialised backbone of the same kind; branch i > 0 takes its
            last stage and head, so every branch is initialised independently as its backbone is.
        num_branches: m >= 1.
        share_last_stage: every branch calls `source`'s last stage (one module, so its weights and BN
            statistics are shared and updated once per branch call).
        share_head: every branch uses `source`'s head.
        copy_branches: branch i > 0 is a deep copy of branch 0 re-initialised the backbone's way
            instead of a fresh one; layers that the family's init leaves at PyTorch's default (the
            ResNet Linear, the DenseNet Linear weight) then start identical across branches.
        head_dropout: sets the probability of every Dropout in the heads (VGG's MLP head; a no-op
            for heads without dropout).
    """
    if num_branches < 1:
        raise ValueError(f"num_branches must be >= 1, got {num_branches}")
    first = Branch(source.last_stage, source.head)
    branches = [first]
    for _ in range(1, num_branches):
        if copy_branches:
            branch = copy.deepcopy(first)
            reinit_like_(branch, source)
        else:
            fresh = make_backbone()
            branch = Branch(fresh.last_stage, fresh.head)
        if share_last_stage:
            branch.last_stage = source.last_stage
        if share_head:
            branch.head = source.head
        branches.append(branch)
    if head_dropout is not None:
        for branch in branches:
            for m in branch.head.modules():
                if isinstance(m, nn.Dropout):
                    m.p = head_dropout
    return MultiBranchNet(source.trunk, branches, source.trunk_channels, source.feature_dim,
                          family_of(source))


def backbone_factory(backbone: str, num_classes: int, width: float) -> Callable[[], Backbone]:
    """A builder of freshly initialised copies of `backbone` (branch i > 0 of a multi-branch net)."""
    return partial(create_backbone, backbone, num_classes, width=width)
