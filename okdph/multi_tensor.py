"""Elementwise arithmetic over lists of tensors (whole networks' states at once).

On plain tensors these are PyTorch's multi-tensor (foreach) kernels: a handful of launches for a
whole network instead of a few per entry, which matters inside a captured GPU step. Under
`torch.func.vmap` (packed runs, okdph.engine.packed) foreach ops have no batching rule, so the
same arithmetic runs one op per tensor; the values are the same either way.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _batched(xs: Sequence[Tensor]) -> bool:
    return bool(xs) and torch._C._functorch.is_functorch_wrapped_tensor(xs[0])


def mul(xs: Sequence[Tensor], factor: Tensor | float) -> list[Tensor]:
    """[x·factor for x in xs]; `factor` a number or a 0-d tensor."""
    if _batched(xs):
        return [x * factor for x in xs]
    return list(torch._foreach_mul(list(xs), factor))


def add(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """[x + y for x, y in zip(xs, ys)]."""
    if _batched(xs) or _batched(ys):
        return [x + y for x, y in zip(xs, ys)]
    return list(torch._foreach_add(list(xs), list(ys)))


def copy_(targets: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """targets[i].copy_(values[i]) for every i, in place."""
    if _batched(targets) or _batched(values):
        for t, v in zip(targets, values):
            t.copy_(v)
    else:
        torch._foreach_copy_(list(targets), list(values))
