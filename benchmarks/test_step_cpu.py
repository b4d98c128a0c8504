"""Throughput of one training step on the reference path (pytest-benchmark; not part of `pytest`).

    pytest benchmarks -q --benchmark-only

One OKDPH step = HWM rebuild + 3 ResNet32 forwards (2 students + HWM) + backward + 2 SGD steps,
batch 128, fp32, on whatever CPU runs it.
"""
from __future__ import annotations

import pytest
import torch

from okdph.data import get_info
from okdph.engine.reference import train_one_epoch
from okdph.strategy import build_config, get_strategy


def make_step(method: str, backbone: str = "resnet32", batch: int = 128, students: int = 2):
    torch.manual_seed(0)
    cls = get_strategy(method)
    strategy = cls(config=build_config(cls.Config), backbone=backbone, num_classes=100,
                   num_models=students, dataset=get_info("cifar100"), width=1.0)
    views = len(strategy.views())
    batches = [(torch.randn(batch, views, 3, 32, 32), torch.randint(0, 100, (batch,)))]
    optimizers = [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                  for g in strategy.optimizer_groups()]
    return lambda: train_one_epoch(strategy, batches, optimizers, epoch=0, device="cpu")


@pytest.mark.parametrize("method", ["okdph", "dml"])
def test_resnet32_step_cpu(benchmark, method):
    step = make_step(method)
    step()  # warm-up
    benchmark.extra_info.update(method=method, backbone="resnet32", batch=128,
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=3, iterations=1)
