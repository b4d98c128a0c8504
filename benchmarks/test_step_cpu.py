"""Throughput of one training step, reference path beside fast path (pytest-benchmark; not part of
the test suite):

    pytest benchmarks -q --benchmark-only

One OKDPH step = HWM rebuild + 3 ResNet32 forwards (2 students + HWM) + backward + SGD, batch 128,
fp32, on whatever CPU runs it. The reference path runs the students one after another with
torch.optim.SGD; the fast path runs them fused (one vmapped network) with the engine's SGD.
Augmentation is not part of the step (both paths prepare batches outside it).
"""
from __future__ import annotations

import pytest
import torch

from okdph.data import get_info
from okdph.engine.fast import SGD
from okdph.engine.fused import fuse_model_groups
from okdph.engine.reference import train_one_epoch
from okdph.strategy import build_config, get_strategy


def make_step(method: str, engine: str, backbone: str = "resnet32", batch: int = 128, students: int = 2):
    torch.manual_seed(0)
    cls = get_strategy(method)
    strategy = cls(config=build_config(cls.Config), backbone=backbone, num_classes=100,
                   num_models=students, dataset=get_info("cifar100"), width=1.0).train()
    views = len(strategy.views())
    images = torch.randn(views, batch, 3, 32, 32)
    targets = torch.randint(0, 100, (batch,))
    if engine == "reference":
        optimizers = [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                      for g in strategy.optimizer_groups()]
        batches = [(images.transpose(0, 1), targets)]
        return lambda: train_one_epoch(strategy, batches, optimizers, epoch=0, device="cpu")

    fuse_model_groups(strategy)
    optimizers = [SGD(g.params, 0.1, 0.9, 5e-4, "cpu") for g in strategy.optimizer_groups()]

    def step():
        _, losses = strategy.forward_train(list(images.unbind(0)), targets, epoch=0, step=1)
        for opt in optimizers:
            opt.zero_grad()
        sum(losses.values()).backward()
        for opt in optimizers:
            opt.step()
        strategy.after_step(epoch=0, step=1)

    return step


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("method", ["okdph", "dml"])
def test_resnet32_step_cpu(benchmark, method, engine):
    step = make_step(method, engine)
    step()  # warm-up
    benchmark.group = f"{method} resnet32 step, batch 128, CPU"
    benchmark.extra_info.update(method=method, engine=engine, backbone="resnet32", batch=128,
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=3, iterations=1)
