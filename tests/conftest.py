"""Shared test helpers: networks whose output is a parameter, so loss tests run on fixed logits; a
preemption signal delivered at a chosen step; one CPU thread per test worker."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from okdph.engine.checkpoint import StopRequest
from okdph.models import ModelGroup


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


def pytest_configure(config):
    # Tiny CPU trainings are bound by Python overhead, not arithmetic: a second thread barely speeds
    # one up, a second test worker (pytest -n, xdist) nearly halves the suite. Each worker then keeps
    # to one thread, and so do the training subprocesses it starts, so workers do not oversubscribe
    # the cores. No test may depend on the thread count unless it sets it itself.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_cpu_worker(monkeypatch):
    # `okdph-bench run` starts one worker process per free core by default; under the test suite's
    # own workers the free cores, and so the processes a test starts, would depend on the load.
    # Tests of the default itself undo this (tests/test_threads.py).
    monkeypatch.setattr("okdph.threads.default_jobs", lambda: 1)


class RandomImages:
    """A minimal in-memory dataset, what the fast engine reads: n random 32x32 RGB uint8 images with
    targets in 0..9, drawn from `seed`, and the dataset's constants `info`."""

    def __init__(self, n, info, seed):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, n)
        self.info = info


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


# CPU kernels that every machine of this kind has: oneDNN, MKL and ATen capped at AVX2, one thread.
PINNED_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                  "OMP_NUM_THREADS": "1"}
_TRAIN = """
import json, sys
from okdph.engine.run import RunConfig, train_run
config = json.loads(sys.argv[1])
config["overrides"] = tuple(tuple(pair) for pair in config.get("overrides", ()))
record = train_run(RunConfig(**config), progress=False)
print(json.dumps(record))
"""


def train_with_pinned_kernels(**config) -> dict:
    """A run's record, trained in a fresh process under PINNED_KERNELS (the libraries read those
    variables once per process): the same numbers on every CPU of the kind. For tests whose claim
    rests on one short run's accuracy, which float32 rounding moves by tens of points."""
    done = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(config)], env={**os.environ, **PINNED_KERNELS},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])
