"""Sweeps under faults (docs/verification.md#concurrency-divergence-and-bad-input): concurrent
workers on one results folder, a worker killed while it holds a run, a run that diverges in the
middle of a sweep."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from okdph.bench.runner import run_table
from okdph.bench.runner import Execution, TableChoices
from okdph.engine.lock import read_lock

# Table 3 restricted to DML with one seed, pipeline profile: 6 runs (2-4 students × ResNet32/VGG16).
SWEEP = ["run", "--table", "3", "--profile", "pipeline", "--method", "dml", "--seeds", "1", "--quiet", "--jobs", "1"]
SWEEP_RUNS = 6


def _cli(*args: str, results: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "okdph.cli", *args, "--results", str(results)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trained(output: str) -> int:
    match = re.search(r"trained (\d+) runs, (\d+) left to other workers, (\d+) failed", output)
    assert match, output
    assert match.group(3) == "0", output
    return int(match.group(1))


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]


def _leftovers(results: Path) -> list[str]:
    runs = results / "runs"
    return sorted(p.name for p in runs.iterdir() if p.suffix in (".lock", ".tmp", ".pt") or ".stale-" in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_concurrent_sweeps_train_every_run_exactly_once(tmp_path, workers):
    results = tmp_path / "results"
    procs = [_cli(*SWEEP, results=results) for _ in range(workers)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    trained = [_trained(out) for out, _ in outputs]
    assert sum(trained) == SWEEP_RUNS, f"runs trained per worker: {trained}"
    records = _records(results)
    assert len(records) == SWEEP_RUNS and all(r["status"] == "complete" for r in records)
    assert _leftovers(results) == []
    # and once more: everything is recorded, nothing trains
    again = _cli(*SWEEP, results=results)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0 and "6 already recorded, 0 to train" in out, err[-2000:]


@pytest.mark.slow
def test_a_killed_workers_lock_is_reclaimed_and_its_run_completes(tmp_path):
    results = tmp_path / "results"
    ids = _cli(*SWEEP, "--dry-run", results=results).communicate(timeout=600)[0]
    run_id = next(line for line in ids.splitlines() if line.startswith("dml-resnet32"))
    lock = results / "runs" / f"{run_id}.lock"
    # the same run as the sweep's, alone, killed while it trains
    victim = subprocess.Popen(
        [sys.executable, "-m", "okdph.cli", "train", "--method", "dml", "--profile", "pipeline", "--students",
         run_id.split("-n")[1][0], "--out", str(results / "runs"), "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    holder = read_lock(lock)
    assert holder is not None and holder["pid"] == victim.pid
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert lock.exists(), "a killed worker leaves its lock behind"

    sweep = _cli(*SWEEP, results=results)
    out, err = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, err[-2000:]
    assert _trained(out) == SWEEP_RUNS
    assert all(r["status"] == "complete" for r in _records(results)) and len(_records(results)) == SWEEP_RUNS
    assert _leftovers(results) == []


@pytest.mark.slow
def test_a_diverging_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """A NaN loss injected into the three-student runs: their records say where, the table says how
    many runs diverged, the other runs complete."""
    from baselines.dml import DML

    original = DML.forward_train

    def poisoned(self, images, targets, *, epoch, step):
        heads, losses = original(self, images, targets, epoch=epoch, step=step)
        if self.num_models == 3 and step == 2:
            losses = {**losses, "ce/student0": losses["ce/student0"] * float("nan")}
        return heads, losses

    monkeypatch.setattr(DML, "forward_train", poisoned)
    torch.set_num_threads(1)
    summary = run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False), methods=["dml"], seeds=1,
                        results=tmp_path / "results")
    assert summary.failed == [] and summary.trained == SWEEP_RUNS
    by_students = {r["students"]: [] for r in _records(tmp_path / "results")}
    for record in _records(tmp_path / "results"):
        by_students[record["students"]].append(record["status"])
    assert by_students[3] == ["diverged at epoch 0, step 2"] * 2
    assert by_students[2] == by_students[4] == ["complete"] * 2
    assert "diverged" in summary.markdown
