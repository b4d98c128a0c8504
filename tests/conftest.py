"""Shared test helpers: networks whose output is a parameter, so loss tests run on fixed logits; a
preemption signal delivered at a chosen step."""
from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from torch import nn

from okdph.engine.checkpoint import StopRequest
from okdph.strategy import ModelGroup


class FixedLogits(nn.Module):
    """A 'network' whose logits are its only parameter: the HWM of such students has exactly the
    mixed logits, which turns OKDPH's parameter hybridization into arithmetic on logits."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits * 1.0


def use_fixed_logits(strategy, logits: list[torch.Tensor]) -> None:
    strategy.students = ModelGroup([FixedLogits(z) for z in logits])
    if hasattr(strategy, "hwm"):
        strategy.hwm = copy.deepcopy(strategy.students[0]).requires_grad_(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def stop_at(monkeypatch, call: int, signum=signal.SIGTERM):
    """Deliver `signum` to this process when the run asks for the `call`-th time whether to stop
    (once per step, and once more at each epoch end)."""
    calls = {"n": 0}
    original = StopRequest.__call__

    def counting(self):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(StopRequest, "__call__", counting)
