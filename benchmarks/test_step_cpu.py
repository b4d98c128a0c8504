"""Throughput of one training step, reference path beside fast path (pytest-benchmark; not part of
the test suite):

    pytest benchmarks -q --benchmark-only

One OKDPH step = HWM rebuild + 3 ResNet32 forwards (2 students + HWM) + backward + SGD, batch 128,
fp32, on whatever CPU runs it. Both paths run their engine's own step code on batches already
augmented (augmentation is outside the step in both):
- reference: okdph.engine.reference.train_one_epoch over one batch, torch.optim.SGD;
- fast: okdph.engine.fast.FastEngine._step with the networks fused into one grouped network
  (channels-last on the CPU; its default), and with them separate (`fast-separate`).

`test_smoke_step_cpu` times the same at the smoke profile's sizes (4 DML students at width 0.25,
batch 32, one thread): the grouped network against the separate ones, the lever behind the smoke
table's CPU time (docs/verification.md#cpu-speed).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from okdph.data import get_info
from okdph.engine.fast import FastEngine
from okdph.engine.recipe import resolve_recipe
from okdph.engine.reference import train_one_epoch
from okdph.strategy import build_config, get_strategy

BATCH = 128


class _Images:
    """`batch` random CIFAR-100-shaped images held in memory, as the fast engine reads datasets."""

    def __init__(self, batch: int, info):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 100, batch)
        self.info = info


def make_step(method: str, engine: str, backbone: str = "resnet32", batch: int = BATCH, students: int = 2,
              width: float = 1.0):
    torch.manual_seed(0)
    info = get_info("cifar100")
    cls = get_strategy(method)
    strategy = cls(config=build_config(cls.Config), backbone=backbone, num_classes=100,
                   num_models=students, dataset=info, width=width).train()
    if engine == "reference":
        views = len(strategy.views())
        images = torch.randn(views, batch, 3, 32, 32)
        targets = torch.randint(0, 100, (batch,))
        optimizers = [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                      for g in strategy.optimizer_groups()]
        batches = [(images.transpose(0, 1), targets)]
        return lambda: train_one_epoch(strategy, batches, optimizers, epoch=0, device="cpu")

    data = _Images(batch, info)
    fast = FastEngine(strategy, data, data, resolve_recipe("paper", "cifar100"), "cpu", seed=0,
                      fuse=engine != "fast-separate")
    fast._prepare_epoch()
    strategy.train()

    def step():
        fast.counter.zero_()  # the same batch every time
        fast._step(batch, epoch=0, step=1)

    return step


@pytest.mark.parametrize("engine", ["reference", "fast-separate", "fast"])
@pytest.mark.parametrize("method", ["okdph", "dml"])
def test_resnet32_step_cpu(benchmark, method, engine):
    step = make_step(method, engine)
    step()  # warm-up
    benchmark.group = f"{method} resnet32 step, batch {BATCH}, CPU"
    benchmark.extra_info.update(method=method, engine=engine, backbone="resnet32", batch=BATCH,
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=5, iterations=1)


@pytest.mark.parametrize("engine", ["fast-separate", "fast"])
@pytest.mark.parametrize("backbone", ["resnet32", "vgg16"])
def test_smoke_step_cpu(benchmark, backbone, engine):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker of a smoke table run
    try:
        step = make_step("dml", engine, backbone=backbone, batch=32, students=4, width=0.25)
        step()  # warm-up
        benchmark.group = f"dml {backbone} x4 step, width 0.25, batch 32, 1 thread, CPU"
        benchmark.extra_info.update(method="dml", engine=engine, backbone=backbone, batch=32, students=4, width=0.25,
                                    threads=1)
        benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
