"""Loss functions shared by the online-KD strategies (docs/methods.md#notation).

Every function takes logits of shape (B, C) and returns a scalar averaged over the batch, so that
each one can be checked against its closed form without building a model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean; (B, C) -> ().

    The teacher is the first argument of the KL (teacher -> student), as in every method's official
    code. The caller decides whether the teacher is detached.
    """
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    # F.kl_div(log_p_student, p_teacher, reduction="batchmean") term by term, with the same value bit
    # for bit; written out because vmap (packed runs) has no batching rule for kl_div and would run
    # it once per run.
    kl = (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student).sum() / student.shape[0]
    return kl * temperature**2


def kd_loss_eps(student: Tensor, teacher: Tensor, temperature: float, eps: float = 1e-7) -> Tensor:
    """KD^ε_T of docs/methods.md#notation: like `kd_loss`, but the teacher probabilities are σ_T(t) + ε, both
    as the weight and inside the log, and are not renormalised (ONE, OKDDip and FFL's official code).
    """
    log_p_student = F.log_softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1) + eps
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()
    return kl * temperature**2


def sigmoid_rampup(epoch: int, length: int = 80) -> float:
    """exp(−5·(1 − clip(e, 0, L)/L)²) for the 0-based epoch e (Laine & Aila 2017;
    docs/methods.md#notation).

    Weights the distillation terms of ONE, OKDDip and FFL: 0.0067 at e = 0, 1 from e = L on.
    """
    if length <= 0:
        return 1.0
    progress = min(max(epoch, 0), length) / length
    return math.exp(-5.0 * (1.0 - progress) ** 2)
