"""Base: independent training of N networks, no distillation (docs/methods.md#base).

Each network sees its own view of the batch (all of the dataset's default type) and minimises its
own cross-entropy. The official harness reports the best of the N networks, which makes Base the
best of N independent runs: an optimistic baseline.
"""
from __future__ import annotations

import torch.nn.functional as F

from okdph.models import make_students
from okdph.strategy import Strategy, register_strategy


@register_strategy("base")
class Base(Strategy):
    """Independent training: L_k = CE(z_k)."""

    display_name = "Base"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.students = make_students(self.backbone, self.num_classes, self.num_models, self.width,
                                      same_init=False)

    def forward_train(self, images, targets, *, epoch, step):
        logits = self.students(images)
        losses = {f"ce/student{k}": F.cross_entropy(z, targets) for k, z in enumerate(logits)}
        return {f"student{k}": z for k, z in enumerate(logits)}, losses

    def graph_key(self, *, epoch, step):
        return None  # the same computation at every step
