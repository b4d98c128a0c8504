"""Multi-branch networks: a shared trunk and m branches cut from any backbone
(docs/methods.md#multi-branch-split).

ONE, OKDDip, FFL and PCL all split a backbone before its last stage (`Backbone.trunk`), keep one trunk
and give every branch its own copy of the last stage and head:

    x -> trunk -> t -> branch_i = head_i(last_stage_i(t)) -> z_i          i = 0 … m-1

`build_multibranch` does this for every registered backbone. The four `*_network` builders below say,
per method, how the official models deviate from that plain layout; each deviation that changes the
architecture or its initialisation is an official quirk, applied only in the `official` fidelity and
named where it is applied. The method-specific extra modules (ONE's gate, OKDDip's attention, FFL's
fusion module, PCL's ensemble head and temporal mean) live with their strategies in `baselines/`.

    >>> net = one_network("resnet32", num_classes=100, num_branches=2, fidelity="official")
    >>> t = net.trunk(x)
    >>> features, logits = net.branches[0](t)      # (B, 64), (B, 100)
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .group import ModelGroup

from .densenet import DenseNet, DenseNetHead
from .imagenet import ImageNetResNet
from .registry import Backbone, create_backbone
from .resnet import Bottleneck, CifarResNet
from .vgg import VGG, linear_std

__all__ = [
    "Branch",
    "MultiBranchNet",
    "build_multibranch",
    "family_of",
    "ffl_network",
    "init_linear_like_",
    "okddip_network",
    "one_network",
    "pcl_network",
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


def _backbone_factory(backbone: str, num_classes: int, width: float) -> Callable[[], Backbone]:
    return partial(create_backbone, backbone, num_classes, width=width)


# --------------------------------------------------------------------------------------------------
# Per method: the official models' layout (models/*_one.py, *_okddip.py, *_ffl.py, *_pcl.py)


def one_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                fidelity: str = "official") -> MultiBranchNet:
    """ONE's branches (docs/methods.md#one): independent copies of the last stage and head.

    VGG heads carry Dropout(0.5) (vgg_one.py) in both fidelities; the plain VGG-16 has none.
    Official quirk (densenet_one.py, inherited from DefangChen/OKDDip): one dense block 3 object is
    every branch's block 3, so DenseNet branches differ only in their final BN and classifier. The
    paper fidelity gives every branch its own block 3.
    """
    make = _backbone_factory(backbone, num_classes, width)
    source = make()
    shared_block3 = fidelity == "official" and family_of(source) == "densenet"
    return build_multibranch(source, make, num_branches, share_last_stage=shared_block3, head_dropout=0.5)


def okddip_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                   fidelity: str = "official") -> MultiBranchNet:
    """OKDDip's peers and leader (docs/methods.md#okddip): the same layout as ONE's.

    VGG heads carry Dropout(0.5) and keep PyTorch's default Linear biases (vgg_okddip.py's init loop
    sets only the weights), in both fidelities.
    Official quirk (densenet_okddip.py, DefangChen): the DenseNet block 3 object is shared by all
    branches; paper fidelity: one block 3 per branch. (The official DenseNet leader path and peer
    set, the other half of that model's quirk, are in baselines/okddip.py.)
    """
    make = _backbone_factory(backbone, num_classes, width)
    source = make()
    shared_block3 = fidelity == "official" and family_of(source) == "densenet"
    net = build_multibranch(source, make, num_branches, share_last_stage=shared_block3, head_dropout=0.5)
    if net.family == "vgg":
        for branch in net.branches:
            for m in branch.head.modules():
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound)
    return net


def ffl_thin_wrn20_8(num_classes: int, width: float = 1.0) -> CifarResNet:
    """Official quirk (resnet_ffl.py `wide_resnet20_8_ff1`): the FFL "WRN-20-8" is built without
    width_per_group=512, i.e. a thin bottleneck ResNet-20 (0.24M parameters per branch model)."""
    return CifarResNet(Bottleneck, (2, 2, 2), num_classes, base_width=64, width=width)


def ffl_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                fidelity: str = "official") -> MultiBranchNet:
    """FFL's branch network (docs/methods.md#ffl), without the fusion module (baselines/ffl.py).

    Official quirks, none of them in the original FFL code; the paper fidelity has none:
    - wrn20_8 is the thin bottleneck ResNet-20 (`ffl_thin_wrn20_8`);
    - ResNet family: every conv of trunk and branches is drawn from N(0, 2/layers[0]) (resnet_ffl.py
      computes the fan-out n and then uses layers[0] in its place): std 0.63 for ResNet-32, 0.41
      for ResNet-110, 1.0 for the thin WRN;
    - VGG: one 3-FC classifier (dropout 0) is shared by all branches (vgg_ffl.py);
    - DenseNet: one dense block 3 object for all branches (densenet_ffl.py).
    """
    official = fidelity == "official"
    if official and backbone == "wrn20_8":
        make = partial(ffl_thin_wrn20_8, num_classes, width=width)
    else:
        make = _backbone_factory(backbone, num_classes, width)
    source = make()
    family = family_of(source)
    net = build_multibranch(source, make, num_branches,
                            share_last_stage=official and family == "densenet",
                            share_head=official and family == "vgg")
    if official and isinstance(source, CifarResNet):
        std = math.sqrt(2.0 / len(source.trunk.layer1))  # len(layer1) is the official layers[0]
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, std)
    return net


def pcl_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                fidelity: str = "official") -> MultiBranchNet:
    """PCL's branches (docs/methods.md#pcl), without the peer-ensemble head (baselines/pcl.py).

    DenseNet branches are block 3 -> ReLU -> pool -> FC with no final BN, in both fidelities: the
    original PCL code (shaoeric) builds them that way too.
    Official quirk (*_pcl.py): branches 1.. are deep copies of branch 0 made before the init loop,
    which re-draws the convs (and VGG's Linear layers) but leaves the ResNet and DenseNet classifier
    weights identical across branches at initialisation. Paper fidelity: independent branches.
    """
    make = _backbone_factory(backbone, num_classes, width)
    source = make()
    if family_of(source) == "densenet":
        source.head.norm_final = nn.Identity()

    def make_without_final_norm() -> Backbone:
        fresh = make()
        if isinstance(fresh.head, DenseNetHead):
            fresh.head.norm_final = nn.Identity()
        return fresh

    return build_multibranch(source, make_without_final_norm, num_branches,
                             copy_branches=fidelity == "official")
