"""OKDDip: Online Knowledge Distillation with Diverse Peers (Chen, Mei, Wang, Feng & Chen, AAAI 2020),
as the OKDPH harness runs it (docs/methods.md#okddip).

m branches on a shared trunk, one shared view. Branches 0…m−2 are auxiliary peers, branch m−1 is
the group leader (the deployed model). Each peer i gets its own target, an attention-weighted mix
of the peers' logits (two-level distillation):

    q_i = W_Q h_i,  k_i = W_K h_i                (h_i: pooled feature; W: Linear d -> d/8, no bias)
    A_ij = softmax_j(q_i · k_j)                   (j over the peers, i itself included)
    t_i = Σ_j A_ij z_j
    L = Σ_peers CE(z_i) + CE(z_L) + α·w(e)·[ Σ_peers KD_T(t_i ▷ z_i) + KD_T(mean_peers z ▷ z_L) ]
    T = 3, α = 1, w(e) = exp(−5·(1 − min(e, 80)/80)²)                      (04_OKDDip.py:96-105)

The targets are not detached, in both fidelities, as in the authors' code (DefangChen train_GL.py):
the attention weights W_Q, W_K learn only through them. With two branches (baseline.sh) there is one
peer, A ≡ 1, t_0 = z_0, and what remains is CE(z_0) + CE(z_L) + w·KD(z_0 ▷ z_L), a mutual pull.

Fidelities (docs/methods.md#what-each-fidelity-changes):
- official: KD^ε (+1e-7 on the teacher probabilities); DenseNet quirks of densenet_okddip.py
  (DefangChen): all branches share block 3; the peer set (attention, targets, peer mean) also holds
  branch m−1's BN-ReLU output z′ (which gets no CE term), and the leader is recomputed as block 3 ->
  avgpool -> classifier_{m−1} with no final BN/ReLU.
- paper: plain KD; independent DenseNet blocks; the leader is a normal branch outside the peer set.
Heads, both fidelities (as 04_OKDDip.py tests): peer{i}, leader, peer_mean (mean of the peer set's
logits). Deployed: the leader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdph.errors import ConfigError
from okdph.models.branches import MultiBranchNet, backbone_factory, build_multibranch, family_of, init_linear_like_
from okdph.strategy import BranchStrategy, check_non_negative, check_positive, register_strategy

# --------------------------------------------------------------------------------------------------
# Network: the official model's layout (models/*_okddip.py)


def okddip_network(backbone: str, num_classes: int, num_branches: int, *, width: float = 1.0,
                   fidelity: str = "official") -> MultiBranchNet:
    """OKDDip's peers and leader (docs/methods.md#okddip): the same layout as ONE's.

    VGG heads carry Dropout(0.5) and keep PyTorch's default Linear biases (vgg_okddip.py's init loop
    sets only the weights), in both fidelities.
    Official quirk (densenet_okddip.py, DefangChen): the DenseNet block 3 object is shared by all
    branches; paper fidelity: one block 3 per branch. (The official DenseNet leader path and peer
    set, the other half of that model's quirk, are in baselines/okddip.py.)
    """
    make = backbone_factory(backbone, num_classes, width)
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


# --------------------------------------------------------------------------------------------------
# Attention and loss


def attention_targets(attention: Tensor, logits: Tensor) -> Tensor:
    """t_i = Σ_j A_ij z_j: attention (B, p, p) and peer logits (p, B, C) -> targets (p, B, C)."""
    return torch.einsum("bij,jbc->ibc", attention, logits)


def okddip_losses(peer_logits: Tensor, peer_targets: Tensor, leader: Tensor, targets: Tensor, *,
                  trained_peers: int, kd, kd_weight: float, temperature: float) -> dict[str, Tensor]:
    """OKDDip's loss terms (04_OKDDip.py:96-105), each already weighted:

        ce/peer{i} = CE(z_i),  kd/peer{i} = kd_weight · kd(z_i, t_i, T)        i < trained_peers
        ce/leader = CE(z_L),   kd/leader = kd_weight · kd(z_L, mean_j z_j, T)   j over all p peers

    `peer_logits` and `peer_targets` (p, B, C), `leader` (B, C); nothing is detached. `kd` is
    `kd_loss` or `kd_loss_eps`; `kd_weight` = α·w(e). `trained_peers` < p only for the official
    DenseNet model, whose peer set also holds the leader branch's BN path.
    """
    losses = {}
    for i in range(trained_peers):
        losses[f"ce/peer{i}"] = F.cross_entropy(peer_logits[i], targets)
        losses[f"kd/peer{i}"] = kd_weight * kd(peer_logits[i], peer_targets[i], temperature)
    losses["ce/leader"] = F.cross_entropy(leader, targets)
    losses["kd/leader"] = kd_weight * kd(leader, peer_logits.mean(dim=0), temperature)
    return losses


class PeerAttention(nn.Module):
    """A_ij = softmax_j(W_Q h_i · W_K h_j) with W_Q, W_K: Linear(d -> d/reduction), no bias, shared
    by all peers (resnet_okddip.py:144-145). Pooled features (p, B, d) -> attention (B, p, p)."""

    def __init__(self, dim: int, reduction: int = 8) -> None:
        super().__init__()
        inner = max(1, dim // reduction)
        self.query = nn.Linear(dim, inner, bias=False)
        self.key = nn.Linear(dim, inner, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        q = self.query(features).transpose(0, 1)  # (B, p, d/8)
        k = self.key(features).transpose(0, 1)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1)  # no 1/sqrt(d) scaling, as the official code


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OKDDipConfig:
    temperature: float = 3.0       # T (04_OKDDip.py --temperature)
    alpha: float = 1.0             # α, weight of both distillation levels (--alpha)
    rampup: int = 80               # epochs of the sigmoid ramp-up w(e) (--length)
    attention_reduction: int = 8   # W_Q, W_K map d -> d/8 (the model files' factor = 8)

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_non_negative("alpha", self.alpha)
        check_non_negative("rampup", self.rampup, " epochs")
        if self.attention_reduction < 1:
            raise ConfigError(f"attention_reduction must be >= 1, got {self.attention_reduction}")


@register_strategy("okddip")
class OKDDip(BranchStrategy):
    """Peers distil from attention-weighted peer ensembles; the leader from the peers' mean. All
    branches read one view (04_OKDDip.py:206-213)."""

    Config = OKDDipConfig
    display_name = "OKDDip"
    min_models = 2  # at least one peer and the leader
    deployed_head = "leader"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        official = self.fidelity == "official"
        self.net = okddip_network(self.backbone, self.num_classes, self.num_models, width=self.width,
                                  fidelity=self.fidelity)
        self.attention = PeerAttention(self.net.feature_dim, self.config.attention_reduction)
        init_linear_like_(self.attention, self.net.family, self.width)
        # Official quirk (densenet_okddip.py, DefangChen): the peer loop runs over all m branches and
        # the leader output is recomputed without the final BN/ReLU (see `_forward`).
        self.leader_in_peer_set = official and self.net.family == "densenet"

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Peer logits (p, B, C), attention (B, p, p) and the leader's logits (B, C)."""
        t = self.net.trunk(x)
        features, logits = self.net.branches([t] * self.num_models)
        peers = self.num_models if self.leader_in_peer_set else self.num_models - 1
        attention = self.attention(features[:peers])
        peer_logits = logits[:peers]
        if self.leader_in_peer_set:
            # The shared block 3 runs once more (its BN statistics move m+1 times per step), then
            # avgpool -> classifier_{m-1} with no norm_final/ReLU (densenet_okddip.py).
            leader_branch = self.net.branches[-1]  # an unfused group: its branches share block 3
            pooled = torch.flatten(F.adaptive_avg_pool2d(leader_branch.last_stage(t), 1), 1)
            leader = leader_branch.head.classifier(pooled)
        else:
            leader = logits[-1]
        return peer_logits, attention, leader

    def _heads(self, peer_logits: Tensor, leader: Tensor) -> dict[str, Tensor]:
        heads = {f"peer{i}": peer_logits[i] for i in range(self.num_models - 1)}
        heads["leader"] = leader
        heads["peer_mean"] = peer_logits.mean(dim=0)
        return heads

    def forward_train(self, images, targets, *, epoch, step):
        peer_logits, attention, leader = self._forward(images[0])
        losses = okddip_losses(peer_logits, attention_targets(attention, peer_logits), leader, targets,
                               trained_peers=self.num_models - 1, kd=self.kd,
                               kd_weight=self.kd_weight(epoch), temperature=self.config.temperature)
        return self._heads(peer_logits, leader), losses

    def eval_heads(self, images):
        peer_logits, _, leader = self._forward(images)
        return self._heads(peer_logits, leader)

    def head_names(self):
        return [f"peer{i}" for i in range(self.num_models - 1)] + ["leader", "peer_mean"]

    def describe(self):
        notes = {"teachers": "not detached" + (", KD with +1e-7 on the teacher (04_OKDDip.py)"
                                               if self.fidelity == "official" else ", plain KD")}
        if self.num_models == 2:
            notes["single_peer"] = "one peer: attention ≡ 1, the peer KD term is ~0 and W_Q/W_K learn nothing"
        if self.net.family == "densenet":
            notes["densenet"] = ("shared block 3; peer set includes the leader branch's BN path; leader "
                                 "without final BN/ReLU (densenet_okddip.py)" if self.leader_in_peer_set
                                 else "one block 3 per branch; leader outside the peer set")
        if self.net.family == "vgg":
            notes["vgg_head_dropout"] = 0.5
        return notes
