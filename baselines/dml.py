"""DML: Deep Mutual Learning (Zhang et al., CVPR 2018), as the OKDPH harness runs it (docs/methods.md#dml).

    L_k = CE(z_k) + 1/(N−1) · Σ_{l≠k} KL(σ(sg(z_l)) ‖ σ(z_k))        (T = 1, batch mean)

N independently initialised networks, network k on view k. All logits come from one forward pass
and the peers are detached, so the official sequential per-network steps equal one joint step.
The DML paper instead recomputes a network's predictions after each update; neither fidelity
does that here (it would forbid fusing the networks into one step), and records say so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from okdph.losses import kd_loss
from okdph.strategy import StudentStrategy, check_positive, register_strategy


@dataclass(frozen=True)
class DMLConfig:
    temperature: float = 1.0  # 01_DML.py: plain softmax, no T² factor (T = 1)

    def __post_init__(self):
        check_positive("temperature", self.temperature)


@register_strategy("dml")
class DML(StudentStrategy):
    """Each network distils from the detached predictions of every other network."""

    Config = DMLConfig
    display_name = "DML"
    min_models = 2

    def student_losses(self, logits, targets):
        peers = logits.detach()
        n = len(logits)
        losses = {}
        for k, z in enumerate(logits):
            losses[f"ce/student{k}"] = F.cross_entropy(z, targets)
            kd = sum(kd_loss(z, peers[l], self.config.temperature) for l in range(n) if l != k)
            losses[f"kd/student{k}"] = kd / (n - 1)
        return losses

    def describe(self):
        return {"update": "simultaneous (one shared forward), as the official code; not the DML "
                          "paper's sequential re-computation"}
