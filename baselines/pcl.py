"""PCL: Peer Collaborative Learning (Wu & Gong, "Peer Collaborative Learning for Online Knowledge
Distillation", AAAI 2021), as the OKDPH harness runs it (docs/methods.md#pcl).

A student S: one trunk, run separately on each of m augmented views, and m branches, branch b on
view b's trunk output; a peer-ensemble head z_en = Linear(cat_b h_b) on the m pooled features. A
temporal-mean copy M of S (no optimizer; updated after every step) gives each branch a "peer mean
teacher" from the other branches:

    L = CE(z_en) + Σ_b [ CE(z_b) + r(e)·KD_3(sg(z_en) ▷ z_b)
                        + r(e)·1/(m−1)·Σ_{j≠b} KD_3(sg(M_j) ▷ z_b) ]
    M ← a·M + (1 − a)·S after each step, a = min(1 − 1/(t+1), 0.999), t the global step
                                                                          (06_PCL.py:85-97, 164)

M runs in train mode on the same views, without gradients; its BN buffers follow its own forward
passes and are never averaged (both fidelities, as the original code).

Fidelities (docs/methods.md#what-each-fidelity-changes):
- official: the ramp divides by λ = 1 instead of 80 (`official_rampup`, a bug shaoeric's original
  has too), and `update_ema_variables` is called with global_step = 0, so a = 0: M's parameters are
  a copy of S's after every step and the peer-mean term is DML-style distillation from the other
  branches' pre-step logits. Branch classifiers start identical (ResNet, DenseNet; see
  `pcl_network` below). Reported: M's branches only, on the clean test image.
- paper: r(e) = exp(−5·(1 − min(e, 80)/80)²); a true EMA with the warm-up above (t counts every
  step of the run); independent branches. Evaluated: S's branches and peer ensemble, and M's branches.
Deployed: M's branch 0 ("mean0"), the temporal mean network being what PCL deploys.
The official DenseNet model hard-codes the ensemble head to 3 × 132 features (m = 3 only); here it
takes m·d, so any m runs, and the record says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdph import multi_tensor
from okdph.losses import kd_loss, sigmoid_rampup
from okdph.models.branches import MultiBranchNet, backbone_factory, build_multibranch, family_of, init_linear_like_
from okdph.models.densenet import DenseNetHead
from okdph.models.registry import Backbone
from okdph.errors import ConfigError
from okdph.strategy import OptimizerGroup, Strategy, check_non_negative, check_positive, register_strategy

# --------------------------------------------------------------------------------------------------
# Network: the official model's layout (models/*_pcl.py)


def pcl_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                fidelity: str = "official") -> MultiBranchNet:
    """PCL's branches (docs/methods.md#pcl), without the peer-ensemble head (baselines/pcl.py).

    DenseNet branches are block 3 -> ReLU -> pool -> FC with no final BN, in both fidelities: the
    original PCL code (shaoeric) builds them that way too.
    Official quirk (*_pcl.py): branches 1.. are deep copies of branch 0 made before the init loop,
    which re-draws the convs (and VGG's Linear layers) but leaves the ResNet and DenseNet classifier
    weights identical across branches at initialisation. Paper fidelity: independent branches.
    """
    make = backbone_factory(backbone, num_classes, width)
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


# --------------------------------------------------------------------------------------------------
# Ramp-up, loss and temporal mean


def official_rampup(epoch: int, length: int = 80) -> float:
    """06_PCL.py `compute_rampup_weight` (λ = 1, α = 80): 1 for e > length, else exp(−5·(1 − e/λ)²).

    The division by λ = 1 where the length was meant gives 0.0067, 1, 0.0067, ≈0 … ≈0 for
    e = 0, 1, 2, 3 … length, then 1 from e = length + 1.
    """
    if epoch > length:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / 1.0) ** 2)


def pcl_losses(logits: Tensor, ensemble: Tensor, mean_logits: Tensor, targets: Tensor, *,
               kd_weight: float, temperature: float) -> dict[str, Tensor]:
    """PCL's loss terms (06_PCL.py:85-97), each already weighted:

        ce/ensemble = CE(z_en)
        ce/branch{b} = CE(z_b)
        kd/branch{b} = r · KD_T(sg(z_en) ▷ z_b)                               peer ensemble teacher
        pm/branch{b} = r · 1/(m−1) · Σ_{j≠b} KD_T(sg(M_j) ▷ z_b)                peer mean teacher

    `logits` and `mean_logits` (m, B, C), `ensemble` z_en (B, C); `kd_weight` = r(e). Plain KD.
    """
    m = len(logits)
    teacher = ensemble.detach()
    mean_teachers = mean_logits.detach()
    losses = {"ce/ensemble": F.cross_entropy(ensemble, targets)}
    for b, z in enumerate(logits):
        losses[f"ce/branch{b}"] = F.cross_entropy(z, targets)
        losses[f"kd/branch{b}"] = kd_weight * kd_loss(z, teacher, temperature)
        peer_mean = sum(kd_loss(z, mean_teachers[j], temperature) for j in range(m) if j != b) / (m - 1)
        losses[f"pm/branch{b}"] = kd_weight * peer_mean
    return losses


@torch.no_grad()
def temporal_mean_update_(mean: nn.Module, student: nn.Module, decay: float, step: Tensor | None) -> None:
    """θ_M ← a·θ_M + (1 − a)·θ_S over the parameters only (BN buffers untouched), a = min(1 − 1/(t+1),
    decay) for the global step t (Tarvainen & Valpola's mean teacher, as PCL's `update_ema_variables`).

    `step` None: the official call with global_step = 0, i.e. a = 0, a plain copy. Otherwise a 0-d
    tensor t, so that the update never syncs with the host.
    """
    pairs = list(zip(mean.named_parameters(), student.named_parameters()))
    assert all(m[0] == s[0] for m, s in pairs), "the temporal mean and the student differ in layout"
    means, students = [m for (_, m), _ in pairs], [s for _, (_, s) in pairs]
    if step is None:
        multi_tensor.copy_(means, students)
        return
    keep = torch.clamp(1.0 - 1.0 / (step.to(torch.float32) + 1.0), max=decay).to(means[0].dtype)
    # a·θ_M + (1 − a)·θ_S in the official order (mul_, then add_), over the whole network at once.
    multi_tensor.copy_(means, multi_tensor.add(multi_tensor.mul(means, keep), multi_tensor.mul(students, 1.0 - keep)))


# --------------------------------------------------------------------------------------------------


class PeerNetwork(nn.Module):
    """PCL's student (or temporal mean): `net`, one trunk and m branches, plus the peer-ensemble head
    `ensemble` = Linear(m·d -> C) on the concatenated pooled branch features."""

    def __init__(self, net: MultiBranchNet, num_classes: int, width: float) -> None:
        super().__init__()
        self.net = net
        self.ensemble = nn.Linear(net.feature_dim * len(net.branches), num_classes)
        init_linear_like_(self.ensemble, net.family, width)

    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Branch b on views[b], the trunk run once per view: logits (m, B, C) and z_en (B, C)."""
        features, logits = self.net.branches([self.net.trunk(x) for x in views])
        return logits, self.ensemble(torch.cat(list(features.unbind(0)), dim=1))


@dataclass(frozen=True)
class PCLConfig:
    temperature: float = 3.0  # T of KDLoss and PMLoss (06_PCL.py)
    rampup: int = 80          # ramp-up length in epochs (compute_rampup_weight's alpha = 80)
    ema_decay: float = 0.999  # temporal-mean decay (update_ema_variables' alpha); paper fidelity only

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_non_negative("rampup", self.rampup, " epochs")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@register_strategy("pcl")
class PCL(Strategy):
    """Multi-view branches distil from their peer ensemble and from a temporal mean of each other."""

    Config = PCLConfig
    display_name = "PCL"
    min_models = 2  # the peer-mean term averages over the m − 1 other branches
    deployed_head = "mean0"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        official = self.fidelity == "official"

        def build() -> PeerNetwork:
            net = pcl_network(self.backbone, self.num_classes, self.num_models, width=self.width,
                              fidelity=self.fidelity)
            return PeerNetwork(net, self.num_classes, self.width)

        self.student = build()
        # Initialised independently (06_PCL.py builds a second instance); no optimizer, no gradient.
        self.mean = build().requires_grad_(False)
        # The global step t of the paper's EMA warm-up; a buffer so that it resumes with the run.
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.true_ema = not official

    # views(): the default, m views of the dataset's default type (06_PCL.py:243-251).

    def optimizer_groups(self):
        return [OptimizerGroup("student", list(self.student.parameters()))]

    def kd_weight(self, epoch: int) -> float:
        if self.fidelity == "official":
            return official_rampup(epoch, self.config.rampup)
        return sigmoid_rampup(epoch, self.config.rampup)

    def forward_train(self, images, targets, *, epoch, step):
        logits, ensemble = self.student(images)
        with torch.no_grad():
            mean_logits, _ = self.mean(images)  # train mode: M's own BN statistics move
        losses = pcl_losses(logits, ensemble, mean_logits, targets, kd_weight=self.kd_weight(epoch),
                            temperature=self.config.temperature)
        heads = {f"branch{b}": z for b, z in enumerate(logits)}
        heads["ensemble"] = ensemble
        heads.update({f"mean{b}": z for b, z in enumerate(mean_logits)})
        return heads, losses

    def after_step(self, *, epoch, step):
        if self.true_ema:
            temporal_mean_update_(self.mean, self.student, self.config.ema_decay, self.ema_steps)
            self.ema_steps += 1
        else:
            temporal_mean_update_(self.mean, self.student, self.config.ema_decay, None)

    def eval_heads(self, images):
        # The clean test image goes to every branch (06_PCL.py:115-141); in eval mode the trunk's
        # output is the same for each, so it runs once.
        heads = {}
        m = self.num_models
        if self.true_ema:
            features, logits = self.student.net.branches([self.student.net.trunk(images)] * m)
            heads.update({f"branch{b}": z for b, z in enumerate(logits)})
            heads["ensemble"] = self.student.ensemble(torch.cat(list(features.unbind(0)), dim=1))
        _, logits = self.mean.net.branches([self.mean.net.trunk(images)] * m)
        heads.update({f"mean{b}": z for b, z in enumerate(logits)})
        return heads

    def head_names(self):
        names = [f"mean{b}" for b in range(self.num_models)]
        if self.true_ema:
            names = [f"branch{b}" for b in range(self.num_models)] + ["ensemble"] + names
        return names

    def describe(self):
        official = self.fidelity == "official"
        notes = {
            "rampup": "exp(-5(1-e/1)^2) for e <= 80, 1 after (the official λ=1 bug)" if official
                      else "exp(-5(1-e/80)^2)",
            "temporal_mean": "copy of the student after every step (decay 0), BN buffers not copied" if official
                             else f"EMA, decay min(1-1/(t+1), {self.config.ema_decay}), BN buffers not averaged",
            "reported_heads": "temporal mean branches" if official
                              else "student branches, ensemble, temporal mean branches",
        }
        if official and self.student.net.family != "vgg":  # VGG's init loop re-draws its Linears
            notes["branch_init"] = "branch classifiers start identical (deep copies, *_pcl.py)"
        if self.student.net.family == "densenet":
            notes["densenet_branch"] = "block 3 -> ReLU -> pool -> FC, no final BN"
            if official and self.num_models != 3:
                notes["official_code"] = (f"cannot run m = {self.num_models}: densenet_pcl.py hard-codes the "
                                          "ensemble head to 3 x 132 features; here it takes m x d")
        return notes
