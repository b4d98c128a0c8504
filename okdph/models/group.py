"""Networks that a strategy calls together: its students, or a multi-branch network's branches."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .registry import create_backbone


class ModelGroup(nn.ModuleList):
    """K networks of one architecture (students, or a multi-branch network's branches), called
    together: input k goes to network k.

    This is the seam for the fast engine, which swaps in a fused network with the same methods
    (okdph.engine.fused.FusedGroup); strategies only ever go through these methods, never through
    the members' own modules, so they run unchanged on either.
    """

    def forward(self, inputs: Sequence[Tensor], method: str = "forward"):
        """K inputs of (B, ...) -> the members' outputs stacked, (K, B, ...): logits (K, B, C) for a
        network; a tuple of stacks where the members return tuples (a branch's features and logits).
        `method` names another method of the members to call instead of their forward."""
        if len(inputs) != len(self):
            raise ValueError(f"{len(self)} networks but {len(inputs)} inputs")
        outputs = [getattr(net, method)(x) for net, x in zip(self, inputs)]
        if isinstance(outputs[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*outputs))
        return torch.stack(outputs)

    def member_states(self) -> list[dict[str, Tensor]]:
        """Each member's state (parameters and buffers) as detached tensors that alias the live
        ones: in-place writes under no_grad change the member."""
        return [net.state_dict() for net in self]

    def member_parameters(self, k: int) -> dict[str, Tensor]:
        """Member k's parameters, differentiable (for a model built from them, e.g. the paper HWM)."""
        return dict(self[k].named_parameters())


def make_students(backbone: str, num_classes: int, count: int, width: float, same_init: bool) -> ModelGroup:
    """`count` full networks, independently initialised from the global RNG or all copies of the
    first (OKDPH's identical initialisation, docs/methods.md#okdph-views)."""
    if same_init:
        first = create_backbone(backbone, num_classes, width=width)
        return ModelGroup([first] + [copy.deepcopy(first) for _ in range(count - 1)])
    return ModelGroup([create_backbone(backbone, num_classes, width=width) for _ in range(count)])
