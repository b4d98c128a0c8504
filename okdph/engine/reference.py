"""The reference execution path: the official code's style (docs/methods.md#shared-training-harness).

Networks run one after another in eager fp32 (or fp64, for checks that must not depend on the CPU's
float32 kernels) on batches from a CPU DataLoader with torchvision PIL transforms. It is the
baseline that the fast GPU path is checked and timed against. Nothing here knows which method it
trains: the strategy supplies the losses, hooks and heads.
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR, MultiStepLR
from torch.utils.data import DataLoader, RandomSampler

from okdph.engine.protocol import Engine, Meters, top1_accuracy
from okdph.strategy import Strategy


def network_dtype(strategy: Strategy) -> torch.dtype:
    """The floating type of the strategy's weights (fp32, or fp64 for an fp64 run): the images' type."""
    return next(strategy.parameters()).dtype


def train_one_epoch(strategy: Strategy, loader, optimizers, *, epoch: int, device, forward=None,
                    meters: Meters | None = None, should_stop=None, step_schedulers=()) -> dict | None:
    """One pass over `loader`: forward → sum of losses → zero grad → backward → step → the
    per-step schedules (`step_schedulers`, a linear recipe's) → hooks.

    Returns the epoch's summary (okdph.engine.protocol): per-sample means of every named loss, the
    training accuracy of every head, and the first step whose loss was not finite (or None). Meters
    stay on the device; the only host sync is at the end. Under DDP, `forward` is the wrapped
    strategy's forward_train (distributed.py).

    A resumed epoch passes its `meters` (the loader must already skip the `meters.steps` taken);
    when `should_stop()` turns true after a step, returns None with `meters` up to date.
    """
    forward = forward or strategy.forward_train
    strategy.train()
    dtype = network_dtype(strategy)
    meters = meters if meters is not None else Meters(1, device)
    for step, (views, targets) in enumerate(loader, start=meters.steps):
        views = views.to(device, dtype, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        heads, losses = forward(list(views.unbind(dim=1)), targets, epoch=epoch, step=step)
        loss = sum(losses.values())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in step_schedulers:
            scheduler.step()
        strategy.after_step(epoch=epoch, step=step)
        meters.add(losses, loss, heads, targets, step)
        meters.samples += targets.shape[0]
        meters.steps += 1
        if should_stop is not None and should_stop():
            return None
    return meters.summaries()[0]


def device_batches(loader, device, dtype):
    """The test loader's batches on the device, images in the networks' dtype."""
    for images, targets in loader:
        yield images.to(device, dtype, non_blocking=True), targets.to(device, non_blocking=True)


class ResumableSampler(RandomSampler):
    """RandomSampler that can skip the first `skip` indices of its next pass. It draws from its
    generator exactly as RandomSampler does, so the data order is the same with or without a resume."""

    skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ReferenceEngine(Engine):
    """The official execution style around `train_one_epoch`: a shuffling DataLoader with PIL
    transforms in worker processes, torch.optim.SGD and MultiStepLR per optimizer group. One run.

    Resume (engine/run.py): `state_dict()` holds the strategy, the optimizers, schedulers, the
    data-order generator as it was when the epoch began, and the epoch's meters. Resuming mid-epoch
    replays the same order and skips the steps already taken; the per-sample augmentation continues
    from the global RNG state saved with the checkpoint, which is exact with in-process loading
    (workers=0). With worker processes, a mid-epoch resume restarts the workers' augmentation streams
    (epoch-boundary resumes stay exact: the workers are seeded from the data-order generator).
    """

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int, workers: int):
        self.strategy, self.strategies, self.device, self.workers = strategy, [strategy], device, workers
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
        scheduled = [opt for opt, g in zip(self.optimizers, groups) if g.scheduled]
        if recipe.schedule == "linear":  # per step, after each optimizer step (len: DDP shards the loader)
            factor = lambda s: recipe.step_factor(s, len(self.train_loader))  # noqa: E731
            self.step_schedulers = [LambdaLR(opt, factor) for opt in scheduled]
            self.schedulers = []
        else:  # MultiStepLR after each epoch's test, as the official scripts
            self.step_schedulers = []
            self.schedulers = [MultiStepLR(opt, list(recipe.milestones), gamma=recipe.lr_decay) for opt in scheduled]
        self.meters: Meters | None = None   # the epoch in flight, if any
        self.epoch_rng: Tensor | None = None  # the data-order generator when it began

    def current_lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def train_epoch(self, epoch: int, should_stop=None) -> list[dict] | None:
        if self.meters is None:  # a fresh epoch; otherwise one resumed mid-way
            self.meters, self.epoch_rng = Meters(1, self.device), self.loader_rng.get_state()
        self.sampler.skip = self.meters.steps * self.train_loader.batch_size
        summary = self._train(epoch, should_stop)
        if summary is None:
            return None
        self.meters = self.epoch_rng = None
        return [summary]

    @property
    def step(self) -> int:
        return 0 if self.meters is None else self.meters.steps

    def _train(self, epoch: int, should_stop) -> dict | None:
        return train_one_epoch(self.strategy, self.train_loader, self.optimizers, epoch=epoch,
                               device=self.device, meters=self.meters, should_stop=should_stop,
                               step_schedulers=self.step_schedulers)

    def evaluate(self) -> list[dict[str, float]]:
        self.strategy.eval()
        batches = device_batches(self.test_loader, self.device, network_dtype(self.strategy))
        return top1_accuracy(self.strategy.eval_heads, batches, runs=1)

    def end_epoch(self, epoch: int) -> None:
        with warnings.catch_warnings():
            # A run resumed after the epoch's last step steps the schedule before any optimizer step
            # of this process; MultiStepLR's value depends on its epoch count only, so it is right.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in self.schedulers:
                scheduler.step()
        self.strategy.after_epoch(epoch=epoch)

    def describe(self) -> dict:
        return {"engine": "reference", "workers": self.workers}

    def state_dict(self) -> dict:
        mid_epoch = self.meters is not None
        return {
            "strategies": [self.strategy.state_dict()],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [sched.state_dict() for sched in self.schedulers + self.step_schedulers],
            "loader_rng": self.epoch_rng if mid_epoch else self.loader_rng.get_state(),
            "meters": self.meters.state_dict() if mid_epoch else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["strategies"][0])
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        for sched, saved in zip(self.schedulers + self.step_schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(saved)
        self.loader_rng.set_state(state["loader_rng"])
        if state["meters"] is not None:
            self.meters = Meters(1, self.device)
            self.meters.load_state_dict(state["meters"])
            self.epoch_rng = state["loader_rng"]
