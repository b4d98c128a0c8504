"""ONE: On-the-fly Native Ensemble (Lan, Zhu & Gong, "Knowledge Distillation by On-the-fly Native
Ensemble", NeurIPS 2018), as the OKDPH harness runs it (docs/methods.md#one).

One network, m branches on a shared trunk, all on one view. A gate on the trunk output weighs the
branches into the teacher x_m:

    g   = softmax(ReLU(BN(W · avgpool(trunk(x)))))                 (B, m)
    x_m = Σ_i g_i · z_i
    L   = Σ_i CE(z_i) + CE(x_m) + α · w(e) · Σ_i T²·KL(σ_T(x_m) ‖ σ_T(z_i))
    w(e) = exp(−5·(1 − min(e, 80)/80)²),  T = 3,  α = 1                (02_ONE.py)

Fidelities (docs/methods.md#what-each-fidelity-changes):
- official: the teacher x_m is not detached (KL gradients reach the gate and every branch through
  it) and its probabilities carry +1e-7 (KD^ε); DenseNet branches share one block 3 and VGG runs
  every branch twice per step (see `ONE._forward`). The reported heads are what 02_ONE.py
  tests: each branch and the plain mean of the branch logits; the gated x_m is not evaluated.
- paper: the teacher is detached with a plain KL, as the ONE authors' code (Lan1991Xu) does;
  independent DenseNet blocks; x_m is evaluated too, as "gate" (the paper's ONE-E ensemble).
Deployed: branch 0, a single branch being what ONE ships.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdph.models.branches import MultiBranchNet, backbone_factory, build_multibranch, family_of, init_linear_like_
from okdph.strategy import BranchStrategy, check_non_negative, check_positive, register_strategy

# --------------------------------------------------------------------------------------------------
# Network: the official model's layout (models/*_one.py)


def one_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                fidelity: str = "official") -> MultiBranchNet:
    """ONE's branches (docs/methods.md#one): independent copies of the last stage and head.

    VGG heads carry Dropout(0.5) (vgg_one.py) in both fidelities; the plain VGG-16 has none.
    Official quirk (densenet_one.py, inherited from DefangChen/OKDDip): one dense block 3 object is
    every branch's block 3, so DenseNet branches differ only in their final BN and classifier. The
    paper fidelity gives every branch its own block 3.
    """
    make = backbone_factory(backbone, num_classes, width)
    source = make()
    shared_block3 = fidelity == "official" and family_of(source) == "densenet"
    return build_multibranch(source, make, num_branches, share_last_stage=shared_block3, head_dropout=0.5)


# --------------------------------------------------------------------------------------------------
# Gate and loss


def gated_ensemble(logits: Tensor, gate: Tensor) -> Tensor:
    """x_m = Σ_i g_i · z_i: branch logits (m, B, C) and gate weights (B, m) -> (B, C)."""
    return torch.einsum("mbc,bm->bc", logits, gate)


def one_losses(logits: Tensor, x_m: Tensor, targets: Tensor, *, kd, kd_weight: float, temperature: float,
               detach_teacher: bool) -> dict[str, Tensor]:
    """ONE's loss terms (02_ONE.py:91-99), each already weighted:

        ce/branch{i} = CE(z_i),  ce/gate = CE(x_m),  kd/branch{i} = kd_weight · kd(z_i, x_m, T)

    `logits` (m, B, C), `x_m` (B, C); `kd` is `kd_loss` or `kd_loss_eps`; `kd_weight` = α·w(e).
    `detach_teacher` stops the KD gradient at x_m; CE(x_m) trains the gate either way.
    """
    losses = {f"ce/branch{i}": F.cross_entropy(z, targets) for i, z in enumerate(logits)}
    losses["ce/gate"] = F.cross_entropy(x_m, targets)
    teacher = x_m.detach() if detach_teacher else x_m
    for i, z in enumerate(logits):
        losses[f"kd/branch{i}"] = kd_weight * kd(z, teacher, temperature)
    return losses


class Gate(nn.Module):
    """ONE's gate: global average pool of the trunk output -> Linear(trunk channels -> m) -> BN1d ->
    ReLU -> softmax over the branches, (B, m) (resnet_one.py:163-165, 250-258)."""

    def __init__(self, channels: int, num_branches: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_branches)
        self.bn = nn.BatchNorm1d(num_branches)

    def forward(self, t: Tensor) -> Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)
        return torch.softmax(F.relu(self.bn(self.fc(pooled))), dim=1)


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ONEConfig:
    temperature: float = 3.0  # T (02_ONE.py --temperature)
    alpha: float = 1.0        # α, weight of the distillation term (--alpha)
    rampup: int = 80          # epochs of the sigmoid ramp-up w(e) (--length; --start_consistency 0)

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_non_negative("alpha", self.alpha)
        check_non_negative("rampup", self.rampup, " epochs")


@register_strategy("one")
class ONE(BranchStrategy):
    """m branches on a shared trunk, all on one view (02_ONE.py:193-200), distil from their gated
    ensemble."""

    Config = ONEConfig
    display_name = "ONE"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        official = self.fidelity == "official"
        self.net = one_network(self.backbone, self.num_classes, self.num_models, width=self.width,
                               fidelity=self.fidelity)
        self.gate = Gate(self.net.trunk_channels, self.num_models)
        init_linear_like_(self.gate, self.net.family, self.width)
        self.detach_teacher = not official
        self.evaluate_gate = not official
        # Official quirk (vgg_one.py:110-119, then again :146-157): in gated mode the VGG model runs
        # every branch twice and returns the second pass, so branch BN statistics move twice per
        # step and two dropout masks are drawn.
        self.branches_run_twice = official and self.net.family == "vgg"

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Branch logits (m, B, C) and the gated ensemble x_m (B, C)."""
        t = self.net.trunk(x)
        shared = [t] * self.num_models  # every branch reads the trunk's output
        if self.branches_run_twice and self.training:
            with torch.no_grad():
                self.net.branches(shared)
        _, logits = self.net.branches(shared)
        return logits, gated_ensemble(logits, self.gate(t))

    def _heads(self, logits: Tensor, x_m: Tensor) -> dict[str, Tensor]:
        heads = {f"branch{i}": z for i, z in enumerate(logits)}
        heads["branch_mean"] = logits.mean(dim=0)
        if self.evaluate_gate:
            heads["gate"] = x_m
        return heads

    def forward_train(self, images, targets, *, epoch, step):
        logits, x_m = self._forward(images[0])
        losses = one_losses(logits, x_m, targets, kd=self.kd, kd_weight=self.kd_weight(epoch),
                            temperature=self.config.temperature, detach_teacher=self.detach_teacher)
        return self._heads(logits, x_m), losses

    def eval_heads(self, images):
        return self._heads(*self._forward(images))

    def head_names(self):
        names = [f"branch{i}" for i in range(self.num_models)] + ["branch_mean"]
        return names + (["gate"] if self.evaluate_gate else [])

    def describe(self):
        notes = {
            "teacher": ("gated ensemble, not detached, KD with +1e-7 on the teacher (02_ONE.py)"
                        if self.fidelity == "official" else "gated ensemble, detached, plain KD (Lan1991Xu)"),
            "gate_head_evaluated": self.evaluate_gate,
        }
        if self.net.family == "densenet":
            shared = self.fidelity == "official"
            notes["densenet_block3"] = "shared by all branches" if shared else "one per branch"
        if self.net.family == "vgg":
            notes["vgg_head_dropout"] = 0.5
            notes["vgg_branches_run_twice_per_step"] = self.branches_run_twice
        return notes
