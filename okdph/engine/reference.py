"""The reference execution path: the official code's style (METHODS.md §1).

Networks run one after another in eager fp32 (or fp64, for checks that must not depend on the CPU's
float32 kernels) on batches from a CPU DataLoader with torchvision PIL transforms. It is the baseline that the fast GPU path is checked and timed against. Nothing here
knows which method it trains: the strategy supplies the losses, hooks and heads.
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import Tensor
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, RandomSampler

from okdph.strategy import Strategy


class EpochProgress:
    """Where an epoch stands: the next step and the meters so far, kept on the device. A resume
    checkpoint taken mid-epoch (preemption) stores it, so the epoch continues where it stopped."""

    def __init__(self):
        self.step = 0
        self.seen = 0
        self.loss_sums: dict[str, Tensor] = {}
        self.correct: dict[str, Tensor] = {}
        self.first_bad_step: Tensor | None = None  # first step whose loss was not finite, -1: none

    def update(self, losses: dict[str, Tensor], loss: Tensor, heads: dict[str, Tensor], targets: Tensor,
               step) -> None:
        """Add one step's meters without a host sync; `step` may be a device tensor (graphs)."""
        batch = targets.shape[0]
        with torch.no_grad():
            for name, value in losses.items():
                # at least fp32, and fp64 for an fp64 run, whose losses must not carry fp32 rounding
                total = value.detach().to(torch.promote_types(value.dtype, torch.float32)) * batch
                self.loss_sums[name] = self.loss_sums.get(name, 0) + total
            for name, logits in heads.items():
                self.correct[name] = self.correct.get(name, 0) + (logits.argmax(dim=1) == targets).sum()
            if self.first_bad_step is None:
                self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self.first_bad_step.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad_step < 0), step)

    def diverged_at(self) -> int | None:
        step = -1 if self.first_bad_step is None else int(self.first_bad_step)
        return None if step < 0 else step

    def summary(self) -> dict:
        seen = self.seen
        return {
            "samples": seen,
            "loss": {name: float(total) / seen for name, total in self.loss_sums.items()},
            "acc": {name: 100.0 * float(total) / seen for name, total in self.correct.items()},
            "diverged_step": self.diverged_at(),
        }

    def state_dict(self) -> dict:
        return {"step": self.step, "seen": self.seen, "loss_sums": dict(self.loss_sums),
                "correct": dict(self.correct), "first_bad_step": self.first_bad_step}

    @classmethod
    def from_state(cls, state: dict, device) -> "EpochProgress":
        progress = cls()
        progress.step, progress.seen = state["step"], state["seen"]
        progress.loss_sums = {k: torch.as_tensor(v).to(device) for k, v in state["loss_sums"].items()}
        progress.correct = {k: torch.as_tensor(v).to(device) for k, v in state["correct"].items()}
        bad = state["first_bad_step"]
        progress.first_bad_step = None if bad is None else bad.to(device)
        return progress


def network_dtype(strategy: Strategy) -> torch.dtype:
    """The floating type of the strategy's weights (fp32, or fp64 for an fp64 run): the images' type."""
    return next(strategy.parameters()).dtype


def train_one_epoch(strategy: Strategy, loader, optimizers, *, epoch: int, device, forward=None,
                    reduce=None, progress: EpochProgress | None = None, should_stop=None) -> dict | None:
    """One pass over `loader`: forward → sum of losses → zero grad → backward → step → hooks.

    Returns per-sample means of every named loss, the training accuracy of every head, and the
    first step whose loss was not finite (or None). Meters stay on the device; the only host syncs
    are at the end of the epoch. Under DDP, `forward` is the wrapped strategy's forward_train and
    `reduce` sums the meters over processes (distributed.py).

    `progress` carries a resumed epoch's position (the loader must already skip its first steps);
    when `should_stop()` turns true after a step, returns None with `progress` at the next step.
    """
    forward = forward or strategy.forward_train
    strategy.train()
    dtype = network_dtype(strategy)
    progress = progress if progress is not None else EpochProgress()
    for step, (views, targets) in enumerate(loader, start=progress.step):
        views = views.to(device, dtype, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        heads, losses = forward(list(views.unbind(dim=1)), targets, epoch=epoch, step=step)
        loss = sum(losses.values())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        strategy.after_step(epoch=epoch, step=step)
        progress.update(losses, loss, heads, targets, step)
        progress.seen += targets.shape[0]
        progress.step = step + 1
        if should_stop is not None and should_stop():
            return None
    if reduce is not None:
        progress.loss_sums, progress.correct, progress.seen = reduce(progress.loss_sums, progress.correct,
                                                                     progress.seen)
    return progress.summary()


@torch.inference_mode()
def evaluate(strategy: Strategy, loader, *, device, reduce=None) -> dict[str, float]:
    """Top-1 accuracy (%) of every evaluable head on the test loader, in eval mode (`reduce`: as in
    train_one_epoch, for a test set sharded over processes)."""
    strategy.eval()
    dtype = network_dtype(strategy)
    correct: dict[str, Tensor] = {}
    total = 0
    for images, targets in loader:
        images = images.to(device, dtype, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        for name, logits in strategy.eval_heads(images).items():
            correct[name] = correct.get(name, 0) + (logits.argmax(dim=1) == targets).sum()
        total += targets.shape[0]
    if reduce is not None:
        _, correct, total = reduce({}, correct, total)
    return {name: 100.0 * float(count) / total for name, count in correct.items()}


class ResumableSampler(RandomSampler):
    """RandomSampler that can skip the first `skip` indices of its next pass. It draws from its
    generator exactly as RandomSampler does, so the data order is the same with or without a resume."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ReferenceEngine:
    """The official execution style around `train_one_epoch`/`evaluate`: a shuffling DataLoader with
    PIL transforms in worker processes, torch.optim.SGD and MultiStepLR per optimizer group.

    Resume (engine/run.py): `state_dict()` holds the optimizers, schedulers, the data-order generator
    as it was when the epoch began, and the epoch's progress. Resuming mid-epoch replays the same
    order and skips the steps already taken; the per-sample augmentation continues from the global
    RNG state saved with the checkpoint, which is exact with in-process loading (workers=0). With
    worker processes, a mid-epoch resume restarts the workers' augmentation streams (epoch-boundary
    resumes stay exact: the workers are seeded from the data-order generator).
    """

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int, workers: int):
        self.strategy, self.device = strategy, device
        self.loader_rng = torch.Generator().manual_seed(seed)
        self.sampler = ResumableSampler(train_set, generator=self.loader_rng)
        common = dict(batch_size=recipe.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)
        self.train_loader = DataLoader(train_set, sampler=self.sampler, drop_last=False,
                                       generator=self.loader_rng, **common)
        self.test_loader = DataLoader(test_set, shuffle=False, **common)
        groups = strategy.optimizer_groups()
        self.optimizers = [torch.optim.SGD(g.params, lr=recipe.lr, momentum=recipe.momentum,
                                           weight_decay=recipe.weight_decay) for g in groups]
        self.schedulers = [MultiStepLR(opt, list(recipe.milestones), gamma=recipe.lr_decay)
                           for opt, g in zip(self.optimizers, groups) if g.scheduled]
        self.progress: EpochProgress | None = None   # the epoch in flight, if any
        self.epoch_rng: Tensor | None = None          # the data-order generator when it began

    def current_lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def train_epoch(self, epoch: int, should_stop=None) -> dict | None:
        if self.progress is None:  # a fresh epoch; otherwise one resumed mid-way
            self.progress, self.epoch_rng = EpochProgress(), self.loader_rng.get_state()
        self.sampler.skip = self.progress.step * self.train_loader.batch_size
        result = self._train(epoch, should_stop)
        if result is not None:
            self.progress = self.epoch_rng = None
        return result

    def _train(self, epoch: int, should_stop) -> dict | None:
        return train_one_epoch(self.strategy, self.train_loader, self.optimizers, epoch=epoch, device=self.device,
                               progress=self.progress, should_stop=should_stop)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.strategy, self.test_loader, device=self.device)

    def end_epoch(self, epoch: int) -> None:
        with warnings.catch_warnings():
            # A run resumed after the epoch's last step steps the schedule before any optimizer step
            # of this process; MultiStepLR's value depends on its epoch count only, so it is right.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in self.schedulers:
                scheduler.step()

    def state_dict(self) -> dict:
        mid_epoch = self.progress is not None
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [sched.state_dict() for sched in self.schedulers],
            "loader_rng": self.epoch_rng if mid_epoch else self.loader_rng.get_state(),
            "progress": self.progress.state_dict() if mid_epoch else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for sched, saved in zip(self.schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(saved)
        self.loader_rng.set_state(state["loader_rng"])
        if state["progress"] is not None:
            self.progress = EpochProgress.from_state(state["progress"], self.device)
            self.epoch_rng = state["loader_rng"]
