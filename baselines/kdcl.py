"""KDCL: Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020), as the OKDPH
harness runs it (docs/methods.md#kdcl).

    t = sg(mean_k z_k)                      (plain logit average, each z_k on its own view)
    L_k = (1 − α)·CE(z_k) + α·T²·KL(σ_T(t) ‖ σ_T(z_k)),   α = 0.5, T = 4

The averaged-logit teacher is none of the KDCL paper's named ensembles (Naive, Linear, MinLogit,
General); no official KDCL code exists, so both fidelities use it. The official script reseeds the
global RNG to N−1 inside every run, so its five "runs" start identically; the harness gives every
run its own seed instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from okdph.losses import kd_loss
from okdph.strategy import StudentStrategy, check_positive, check_unit_range, register_strategy


@dataclass(frozen=True)
class KDCLConfig:
    alpha: float = 0.5        # 03_KDCL.py:130, weight of the distillation term
    temperature: float = 4.0  # 03_KDCL.py:131

    def __post_init__(self):
        check_unit_range("alpha", self.alpha)
        check_positive("temperature", self.temperature)


@register_strategy("kdcl")
class KDCL(StudentStrategy):
    """Every network distils from the detached mean of all networks' logits."""

    Config = KDCLConfig
    display_name = "KDCL"
    min_models = 2

    def student_losses(self, logits, targets):
        teacher = logits.detach().mean(dim=0)
        a, t = self.config.alpha, self.config.temperature
        losses = {}
        for k, z in enumerate(logits):
            losses[f"ce/student{k}"] = (1 - a) * F.cross_entropy(z, targets)
            losses[f"kd/student{k}"] = a * kd_loss(z, teacher, t)
        return losses
