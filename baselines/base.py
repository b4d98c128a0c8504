"""Base: independent training of N networks, no distillation (docs/methods.md#base).

Each network sees its own view of the batch (all of the dataset's default type) and minimises its
own cross-entropy. The official harness reports the best of the N networks, which makes Base the
best of N independent runs: an optimistic baseline.
"""
from __future__ import annotations

import torch.nn.functional as F

from okdph.strategy import StudentStrategy, register_strategy


@register_strategy("base")
class Base(StudentStrategy):
    """Independent training: L_k = CE(z_k)."""

    display_name = "Base"

    def student_losses(self, logits, targets):
        return {f"ce/student{k}": F.cross_entropy(z, targets) for k, z in enumerate(logits)}
