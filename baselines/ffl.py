"""FFL: Feature Fusion Learning (Kim, Hyun, Chung & Kwak, "Feature Fusion for Online Mutual Knowledge
Distillation", ICPR 2020), as the OKDPH harness runs it (docs/methods.md#ffl).

A branch network (shared trunk, m branches, one shared view) and a separate fusion module that
turns the concatenated branch feature maps into a fused classifier z_f:

    z_f = Linear(avgpool(ReLU(BN(conv1x1(ReLU(BN(dwconv3x3(cat_b fmap_b))))))))
    L = Σ_b CE(z_b) + CE(z_f) + w(e)·[ Σ_b KD_3(sg(z_f) ▷ z_b) + KD_3(sg(mean_b z_b) ▷ z_f) ]
    w(e) = exp(−5·(1 − min(e, 80)/80)²)                                     (05_FFL.py:78-92)

Both teachers are detached in both fidelities, as in the original FFL code. The network and the
fusion module have one SGD optimizer each (same hyper-parameters), stepped after one joint backward.

Fidelities (docs/methods.md#what-each-fidelity-changes):
- official: KD^ε (+1e-7 on the teacher); only the network's scheduler is stepped (05_FFL.py:140),
  so the fusion module keeps the initial learning rate for the whole run; the architecture quirks
  of `ffl_network` below (ResNet convs ~ N(0, 2/layers[0]), thin "WRN-20-8", one
  VGG classifier shared by the branches, one DenseNet block 3 shared by the branches).
- paper: plain KD; both learning rates decay; the backbones' own architecture and initialisation.
  (The original's weight decay 1e-4/1e-5 and Nesterov momentum are not reproduced: every method here
  runs the harness's optimiser recipe.)
Heads, both fidelities (as 05_FFL.py tests): branch{i} and fused. Deployed: branch 0, one
sub-network being what FFL deploys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdph.models.branches import MultiBranchNet, backbone_factory, build_multibranch, family_of
from okdph.models.resnet import Bottleneck, CifarResNet
from okdph.strategy import BranchStrategy, OptimizerGroup, check_non_negative, check_positive, register_strategy

# --------------------------------------------------------------------------------------------------
# Network: the official model's layout (models/*_ffl.py)


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
        make = backbone_factory(backbone, num_classes, width)
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


# --------------------------------------------------------------------------------------------------
# Loss


def ffl_losses(logits: Tensor, fused: Tensor, targets: Tensor, *, kd, kd_weight: float,
               temperature: float) -> dict[str, Tensor]:
    """FFL's loss terms (05_FFL.py:78-92), each already weighted:

        ce/branch{b} = CE(z_b),  kd/branch{b} = kd_weight · kd(z_b, sg(z_f), T)
        ce/fused = CE(z_f),      kd/fused = kd_weight · kd(z_f, sg(mean_b z_b), T)

    `logits` (m, B, C), `fused` z_f (B, C); `kd` is `kd_loss` or `kd_loss_eps`; `kd_weight` = w(e).
    """
    losses = {}
    fused_teacher = fused.detach()
    for b, z in enumerate(logits):
        losses[f"ce/branch{b}"] = F.cross_entropy(z, targets)
        losses[f"kd/branch{b}"] = kd_weight * kd(z, fused_teacher, temperature)
    losses["ce/fused"] = F.cross_entropy(fused, targets)
    losses["kd/fused"] = kd_weight * kd(fused, logits.detach().mean(dim=0), temperature)
    return losses


class FusionModule(nn.Module):
    """FFL's fusion module (resnet_ffl.py:251-282): the m branch maps (B, C, h, w) concatenated to
    mC channels -> depthwise 3x3 (no bias) -> BN -> ReLU -> 1x1 to C (no bias) -> BN -> ReLU ->
    global average pool -> Linear(C, classes). Convs He-normal on the fan-out, BN 1/0, Linear default."""

    def __init__(self, channels: int, num_branches: int, num_classes: int) -> None:
        super().__init__()
        fused = channels * num_branches
        self.depthwise = nn.Conv2d(fused, fused, kernel_size=3, padding=1, groups=fused, bias=False)
        self.bn1 = nn.BatchNorm2d(fused)
        self.pointwise = nn.Conv2d(fused, channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: list[Tensor]) -> Tensor:
        x = F.relu(self.bn1(self.depthwise(torch.cat(maps, dim=1))))
        x = F.relu(self.bn2(self.pointwise(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FFLConfig:
    temperature: float = 3.0  # T, hard-coded in 05_FFL.py's KLLoss
    rampup: int = 80          # epochs of the sigmoid ramp-up w(e) (--consistency_rampup)

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_non_negative("rampup", self.rampup, " epochs")


@register_strategy("ffl")
class FFL(BranchStrategy):
    """Branches and a fusion module distil from each other's detached predictions. All branches read
    one view (05_FFL.py:190-197)."""

    Config = FFLConfig
    display_name = "FFL"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = ffl_network(self.backbone, self.num_classes, self.num_models, width=self.width,
                               fidelity=self.fidelity)
        self.fusion = FusionModule(self.net.feature_dim, self.num_models, self.num_classes)
        # Official quirk (05_FFL.py:140): the fusion module's scheduler is never stepped.
        self.fusion_lr_decays = self.fidelity != "official"

    def optimizer_groups(self):
        return [OptimizerGroup("network", list(self.net.parameters())),
                OptimizerGroup("fusion", list(self.fusion.parameters()), scheduled=self.fusion_lr_decays)]

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Branch logits (m, B, C) and the fused logits (B, C)."""
        t = self.net.trunk(x)
        maps, logits = self.net.branches([t] * self.num_models, method="forward_map")
        return logits, self.fusion(list(maps.unbind(0)))

    def _heads(self, logits: Tensor, fused: Tensor) -> dict[str, Tensor]:
        heads = {f"branch{b}": z for b, z in enumerate(logits)}
        heads["fused"] = fused
        return heads

    def forward_train(self, images, targets, *, epoch, step):
        logits, fused = self._forward(images[0])
        losses = ffl_losses(logits, fused, targets, kd=self.kd, kd_weight=self.kd_weight(epoch),
                            temperature=self.config.temperature)
        return self._heads(logits, fused), losses

    def eval_heads(self, images):
        return self._heads(*self._forward(images))

    def head_names(self):
        return [f"branch{b}" for b in range(self.num_models)] + ["fused"]

    def describe(self):
        official = self.fidelity == "official"
        kd = ", KD with +1e-7 on the teacher (05_FFL.py)" if official else ", plain KD"
        notes = {"teachers": "detached" + kd, "fusion_lr_decays": self.fusion_lr_decays}
        if official and self.net.family == "resnet":
            notes["conv_init"] = "N(0, 2/layers[0]) (resnet_ffl.py)"
        if official and self.backbone == "wrn20_8":
            notes["wrn20_8"] = "thin bottleneck ResNet-20 (the official wrn_20_8_ffl), not WRN-20-8"
        if self.net.family == "vgg":
            notes["vgg_classifier"] = "one shared by all branches" if official else "one per branch"
        if self.net.family == "densenet":
            notes["densenet_block3"] = "shared by all branches" if official else "one per branch"
        return notes
