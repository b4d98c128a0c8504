"""A shared machine: the CPU thread default follows OMP_NUM_THREADS, the free cores and --jobs, and
records are written with the process umask (not mkstemp's 0600)."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from click.testing import CliRunner

from okdph import threads
from okdph.cli import main
from okdph.engine.record import atomic_write_json


def _machine(monkeypatch, env, cores, load):
    """A machine with `cores` usable cores, this load average and OMP_NUM_THREADS `env` (None: unset)."""
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


@pytest.mark.parametrize("env,cores,load,jobs,expected", [
    ("3", 16, 0.0, 1, 3),       # the user's (or the scheduler's) choice wins
    ("3", 16, 0.0, 4, 3),
    (None, 2, 0.1, 1, 2),       # an idle machine: every core
    (None, 2, 1.2, 1, 1),       # another process keeps a core busy: the other one
    (None, 2, 7.0, 1, 1),       # overloaded: one thread, never zero
    (None, 16, 0.0, 4, 4),      # --jobs 4: the cores shared among the workers
    (None, 2, 0.0, 4, 1),
    ("0", 8, 0.0, 2, 4),        # a meaningless setting is ignored
])
def test_default_threads(monkeypatch, env, cores, load, jobs, expected):
    _machine(monkeypatch, env, cores, load)
    assert threads.default_threads(jobs) == expected


DEFAULT_JOBS = threads.default_jobs  # before conftest's autouse fixture pins it to 1 for every test


@pytest.mark.parametrize("env,cores,load,expected", [
    (None, 2, 0.1, 2),          # an idle machine: a worker per core, one thread each
    (None, 2, 1.2, 1),          # another process keeps a core busy
    (None, 2, 7.0, 1),          # overloaded: one worker, never zero
    ("2", 8, 0.0, 4),           # OMP_NUM_THREADS threads per worker
])
def test_default_jobs(monkeypatch, env, cores, load, expected):
    _machine(monkeypatch, env, cores, load)
    assert DEFAULT_JOBS() == expected


def test_run_without_jobs_starts_the_default_workers(monkeypatch):
    from okdph.bench.executors import parse_gpus

    monkeypatch.setattr(threads, "default_jobs", lambda: 2)
    assert parse_gpus(None, 0, None) == ["cpu", "cpu"]
    assert parse_gpus(None, 0, 1) == ["cpu"]  # --jobs 1: this process
    assert parse_gpus("cpu", 4, None) == ["cpu", "cpu"]


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_uses_the_default_and_its_record_says_so(tmp_path, monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "default_threads", lambda jobs=1: 3)
    result = CliRunner().invoke(main, ["train", "--method", "dml", "--profile", "pipeline", "--epochs", "1",
                                       "--train-samples", "64", "--width", "0.125", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.json")
    assert json.loads(path.read_text())["provenance"]["cpu_threads"] == 3


def test_run_local_trains_with_the_default_for_its_workers(monkeypatch, keep_threads):
    from okdph.bench import executors
    from okdph.engine.run import RunConfig

    monkeypatch.setattr(threads, "default_threads", lambda jobs=1: {1: 2, 2: 1}[jobs])
    seen = []
    monkeypatch.setattr(executors, "train_group", lambda group, progress=False: seen.append(
        torch.get_num_threads()) or [executors.Outcome(c.run_id()) for c in group])
    torch.set_num_threads(1)
    executors.run_local([RunConfig(method="dml", profile="pipeline", device="cpu")], ["cpu"], progress=False)
    assert seen == [2] and torch.get_num_threads() == 1  # and restored afterwards


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_records_get_the_umask_mode(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "record.json", {"a": 1})
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == mode
