"""The reference execution path: the official code's style (METHODS.md §1).

Networks run one after another in eager fp32 on batches from a CPU DataLoader with torchvision PIL
transforms. It is the baseline that the fast GPU path is checked and timed against. Nothing here
knows which method it trains: the strategy supplies the losses, hooks and heads.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader

from okdph.strategy import Strategy


def train_one_epoch(strategy: Strategy, loader, optimizers, *, epoch: int, device, forward=None,
                    reduce=None) -> dict:
    """One pass over `loader`: forward → sum of losses → zero grad → backward → step → hooks.

    Returns per-sample means of every named loss and the training accuracy of every head. Meters
    stay on the device; the only host syncs are at the end of the epoch. Under DDP, `forward` is the
    wrapped strategy's forward_train and `reduce` sums the meters over processes (distributed.py).
    """
    forward = forward or strategy.forward_train
    strategy.train()
    loss_sums: dict[str, Tensor] = {}
    correct: dict[str, Tensor] = {}
    seen = 0
    for step, (views, targets) in enumerate(loader):
        views = views.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        heads, losses = forward(list(views.unbind(dim=1)), targets, epoch=epoch, step=step)
        loss = sum(losses.values())
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        strategy.after_step(epoch=epoch, step=step)

        batch = targets.shape[0]
        seen += batch
        with torch.no_grad():
            for name, value in losses.items():
                loss_sums[name] = loss_sums.get(name, 0) + value.detach() * batch
            for name, logits in heads.items():
                correct[name] = correct.get(name, 0) + (logits.argmax(dim=1) == targets).sum()
    if reduce is not None:
        loss_sums, correct, seen = reduce(loss_sums, correct, seen)
    return {
        "samples": seen,
        "loss": {name: float(total) / seen for name, total in loss_sums.items()},
        "acc": {name: 100.0 * float(total) / seen for name, total in correct.items()},
    }


@torch.inference_mode()
def evaluate(strategy: Strategy, loader, *, device, reduce=None) -> dict[str, float]:
    """Top-1 accuracy (%) of every evaluable head on the test loader, in eval mode (`reduce`: as in
    train_one_epoch, for a test set sharded over processes)."""
    strategy.eval()
    correct: dict[str, Tensor] = {}
    total = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        for name, logits in strategy.eval_heads(images).items():
            correct[name] = correct.get(name, 0) + (logits.argmax(dim=1) == targets).sum()
        total += targets.shape[0]
    if reduce is not None:
        _, correct, total = reduce({}, correct, total)
    return {name: 100.0 * float(count) / total for name, count in correct.items()}


class ReferenceEngine:
    """The official execution style around `train_one_epoch`/`evaluate`: a shuffling DataLoader with
    PIL transforms in worker processes, torch.optim.SGD and MultiStepLR per optimizer group."""

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int, workers: int):
        self.strategy, self.device = strategy, device
        loader_rng = torch.Generator().manual_seed(seed)
        common = dict(batch_size=recipe.batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)
        self.train_loader = DataLoader(train_set, shuffle=True, drop_last=False, generator=loader_rng, **common)
        self.test_loader = DataLoader(test_set, shuffle=False, **common)
        groups = strategy.optimizer_groups()
        self.optimizers = [torch.optim.SGD(g.params, lr=recipe.lr, momentum=recipe.momentum,
                                           weight_decay=recipe.weight_decay) for g in groups]
        self.schedulers = [MultiStepLR(opt, list(recipe.milestones), gamma=recipe.lr_decay)
                           for opt, g in zip(self.optimizers, groups) if g.scheduled]

    def current_lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def train_epoch(self, epoch: int) -> dict:
        return train_one_epoch(self.strategy, self.train_loader, self.optimizers, epoch=epoch, device=self.device)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.strategy, self.test_loader, device=self.device)

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self.schedulers:
            scheduler.step()
