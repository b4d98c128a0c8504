"""What every engine does for the driver (okdph.engine.run), and the meters and test accuracy they share.

An engine trains P runs that differ only in their seed (P = 1 for a single run) and answers per run:

    train_epoch(epoch, should_stop) -> [summary per run], or None when `should_stop()` turned true
                                       mid-epoch; `step` is then the next step, and state_dict()
                                       continues the epoch from there
    evaluate()                      -> [{head: top-1 %} per run]
    end_epoch(epoch)                   the schedules' step, then the strategies' after-epoch hooks
    current_lr(), describe(), state_dict(), load_state_dict(state)
    write_back()                       the runs' own strategy objects made current (a pack trains
                                       stacked copies of them)

A summary is {"samples", "loss": {name: mean}, "acc": {head: %}, "diverged_step": first step whose
loss was not finite, or None}. The reference engine (eager, DataLoader), the fast engine (device data,
fused networks, CUDA graphs), the packed fast engine (P runs under vmap) and the distributed engine
(the reference engine under DDP) implement it; the driver knows no engine by name.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from okdph.strategy import Strategy


class Engine:
    """The protocol above, with the parts every engine shares."""

    strategies: list[Strategy]  # one per run, in the order of the runs' seeds
    step: int = 0                # the next step of the epoch in flight (0 between epochs)

    def train_epoch(self, epoch: int, should_stop: Callable[[], bool] | None = None) -> list[dict] | None:
        raise NotImplementedError

    def evaluate(self) -> list[dict[str, float]]:
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def current_lr(self) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        """How the runs executed, for their records."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def write_back(self) -> None:
        """Nothing to do where the runs' strategy objects are the trained ones."""


class Meters:
    """An epoch's training meters for P runs, on the device: loss sums (P, L), correct predictions
    per head (P, H) and the first step whose total loss was not finite (P,), -1 for none.

    `add` runs inside the training step and never syncs with the host, so a captured CUDA graph can
    hold it: the tensors are sized at the first step and reset in place. Losses sum in at least fp32,
    and in fp64 for fp64 runs, whose losses must not carry fp32 rounding. `samples` is counted by the
    engine, outside the step, as are the `steps` taken (a resumed epoch continues after them)."""

    def __init__(self, runs: int, device):
        self.runs, self.device = runs, torch.device(device)
        self.loss_names: list[str] | None = None
        self.head_names: list[str] | None = None
        self.loss_sums: Tensor | None = None
        self.correct: Tensor | None = None
        self.first_bad_step = torch.full((runs,), -1, dtype=torch.int64, device=self.device)
        self.samples = 0
        self.steps = 0

    def reset(self) -> None:
        if self.loss_sums is not None:
            self.loss_sums.zero_()
            self.correct.zero_()
        self.first_bad_step.fill_(-1)
        self.samples = self.steps = 0

    @torch.no_grad()
    def add(self, losses: dict[str, Tensor], total: Tensor, heads: dict[str, Tensor], targets: Tensor,
            step) -> None:
        """One step: losses () or (P,), their sum, heads (B, C) or (P, B, C), targets (B,) or (P, B);
        `step` may be a device tensor (a captured step reads the step counter from the device)."""
        runs, batch = self.runs, targets.shape[-1]
        losses_now = torch.stack([v.detach().reshape(runs) for v in losses.values()], dim=1)
        if self.loss_sums is None:
            self.loss_names, self.head_names = list(losses), list(heads)
            dtype = torch.promote_types(losses_now.dtype, torch.float32)
            self.loss_sums = torch.zeros(runs, len(losses), dtype=dtype, device=self.device)
            self.correct = torch.zeros(runs, len(heads), dtype=torch.int64, device=self.device)
        self.loss_sums += losses_now.to(self.loss_sums.dtype) * batch
        targets = targets.reshape(runs, batch)
        self.correct += torch.stack([(z.reshape(runs, batch, -1).argmax(dim=-1) == targets).sum(dim=-1)
                                     for z in heads.values()], dim=1)
        bad = ~torch.isfinite(total.detach().reshape(runs)) & (self.first_bad_step < 0)
        self.first_bad_step.masked_fill_(bad, step)

    def summaries(self) -> list[dict]:
        """One summary per run; the epoch's one host sync."""
        n = self.samples
        sums, correct, bad = self.loss_sums.tolist(), self.correct.tolist(), self.first_bad_step.tolist()
        return [{"samples": n,
                 "loss": {name: s / n for name, s in zip(self.loss_names, sums[p])},
                 "acc": {name: 100.0 * c / n for name, c in zip(self.head_names, correct[p])},
                 "diverged_step": None if bad[p] < 0 else bad[p]} for p in range(self.runs)]

    def state_dict(self) -> dict:
        return {"loss_names": self.loss_names, "head_names": self.head_names, "samples": self.samples,
                "steps": self.steps,
                "loss_sums": None if self.loss_sums is None else self.loss_sums.clone(),
                "correct": None if self.correct is None else self.correct.clone(),
                "first_bad_step": self.first_bad_step.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_names, self.head_names = state["loss_names"], state["head_names"]
        self.samples, self.steps = state["samples"], state["steps"]
        if state["loss_sums"] is not None:
            self.loss_sums = state["loss_sums"].to(self.device)
            self.correct = state["correct"].to(self.device)
        self.first_bad_step.copy_(state["first_bad_step"])


@torch.inference_mode()
def top1_accuracy(heads_of: Callable[[Tensor], dict[str, Tensor]], batches: Iterable[tuple[Tensor, Tensor]],
                  runs: int, reduce: Callable | None = None) -> list[dict[str, float]]:
    """Top-1 accuracy (%) of every head of every run: `heads_of(x)` gives logits (B, C) or (P, B, C)
    for a test batch x with targets y (B,). `reduce(correct, total)` sums the counts over processes
    (a test set sharded under DDP)."""
    correct: dict[str, Tensor] = {}
    total = 0
    for x, y in batches:
        for name, logits in heads_of(x).items():
            hits = (logits.reshape(runs, y.shape[0], -1).argmax(dim=-1) == y).sum(dim=-1)
            correct[name] = correct.get(name, 0) + hits
        total += y.shape[0]
    if reduce is not None:
        correct, total = reduce(correct, total)
    counts = {name: c.tolist() for name, c in correct.items()}
    return [{name: 100.0 * c[p] / total for name, c in counts.items()} for p in range(runs)]
