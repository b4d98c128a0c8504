"""Fault injection: interrupted runs resume exactly (docs/verification.md#resume-and-preemption).

An interrupted deterministic CPU run, restarted with the same configuration, must end with a record
whose outcome (everything but timings, provenance and the resume log) is bitwise equal to that of an
uninterrupted run. Interruptions: SIGTERM/SIGUSR1 delivered at a chosen step (in-process), SIGKILL of
a training process at random moments, SIGTERM to the `okdph-bench train` command.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from okdph.engine import run as runmod
from okdph.engine.checkpoint import PREEMPTED_EXIT, CheckpointError, Preempted
from okdph.engine.record import outcome
from okdph.engine.run import RunConfig, train_run

from conftest import stop_at

# 96 digits images, batch 32: 3 steps an epoch, 3 epochs. Small enough for many interruptions.
TINY = dict(profile="pipeline", epochs=3, train_samples=96, deterministic=True, device="cpu")

# (method, engine, overrides): batch-level fusion (OKDPH 2b: fusion at steps 0 and 2), the paper's
# Dirichlet HWM (global RNG), EMA state (PCL), a gate (ONE), a separately optimised module (FFL).
CASES = [
    ("okdph", "reference", (("interval", "2b"),)),
    ("okdph", "fast", (("interval", "2b"),)),
    ("pcl", "reference", ()),
    ("pcl", "fast", ()),
    ("dml", "reference", ()),
    ("one", "fast", ()),
    ("ffl", "reference", ()),
]


def tiny(method: str, engine: str, overrides=(), **kw) -> RunConfig:
    return RunConfig(method=method, engine=engine, overrides=tuple(overrides), **{**TINY, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    """The training subprocesses run with OMP_NUM_THREADS=1: in-process runs must use the same
    thread count, since intra-op reductions split differently with more threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Outcomes of the uninterrupted runs, computed once per configuration."""
    cache = {}

    def get(cfg: RunConfig) -> dict:
        key = cfg.run_id()
        if key not in cache:
            out = tmp_path_factory.mktemp("clean")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cache[key] = outcome(train_run(replace(cfg, out_dir=str(out)), progress=False))
            finally:
                torch.set_num_threads(threads)
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method,engine,overrides", CASES)
def test_signal_at_random_steps_resumes_bitwise(method, engine, overrides, tmp_path, monkeypatch, uninterrupted):
    cfg = tiny(method, engine, overrides, out_dir=str(tmp_path))
    expected = uninterrupted(cfg)
    rng = random.Random(f"{method}-{engine}")
    # A run asks 12 times (after each of 3 steps and at each of 3 epoch ends); a resumed run asks
    # again from 1, so the second stop is counted from the first resume.
    first = rng.randint(1, 8)
    points = [first, rng.randint(1, 11 - first)]
    for point in points:
        with monkeypatch.context() as patch:
            stop_at(patch, point)
            with pytest.raises(Preempted, match="SIGTERM"):
                train_run(cfg, progress=False)
        assert cfg.checkpoint_path().exists() and not cfg.record_path().exists()
    record = train_run(cfg, progress=False)
    assert len(record["resumes"]) == len(points)
    assert outcome(record) == expected
    assert not cfg.checkpoint_path().exists(), "the checkpoint is removed once the record is written"


def test_preemption_hands_the_signal_to_the_previous_handler(tmp_path, monkeypatch):
    """Under submitit, SIGUSR1 belongs to its requeue handler: the run checkpoints first, then calls it."""
    seen = []

    def requeue(signum, frame):
        seen.append((signum, cfg.checkpoint_path().exists()))
        raise SystemExit(0)  # submitit's handler requeues and exits

    cfg = tiny("dml", "reference", out_dir=str(tmp_path))
    previous = signal.signal(signal.SIGUSR1, requeue)
    try:
        stop_at(monkeypatch, 2, signal.SIGUSR1)
        with pytest.raises(SystemExit):
            train_run(cfg, progress=False)
        assert signal.getsignal(signal.SIGUSR1) is requeue, "the run restores the handlers it replaced"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [(signal.SIGUSR1, True)]


def test_ctrl_c_checkpoints_says_how_to_resume_and_the_resume_says_from_where(tmp_path, monkeypatch, capsys,
                                                                             uninterrupted):
    """Ctrl-C (SIGINT) stops after the step like SIGTERM: checkpoint written, Preempted (exit 75 at
    the command line) with how to resume; the rerun says it resumes, from which checkpoint and
    step, and ends as an uninterrupted run."""
    cfg = tiny("dml", "reference", out_dir=str(tmp_path))
    before = signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN in a process started in the background
    with monkeypatch.context() as patch:
        stop_at(patch, 2, signal.SIGINT)
        with pytest.raises(Preempted, match=r"stopped by SIGINT at epoch 0, step 2; rerun the same command to "
                                            r"resume from .*\.ckpt\.pt"):
            train_run(cfg, progress=False)
    assert signal.getsignal(signal.SIGINT) == before, "Ctrl-C has its handler back"
    capsys.readouterr()
    record = train_run(cfg, progress=False)
    assert f"resuming {cfg.run_id()} from {cfg.checkpoint_path()}: epoch 0, step 2" in capsys.readouterr().err
    assert outcome(record) == uninterrupted(cfg)


def test_ctrl_c_at_the_command_line_exits_75_with_how_to_resume(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from okdph.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runmod, "train_run", interrupted)
    result = CliRunner().invoke(main, ["train", "--method", "dml", "--profile", "pipeline", "--out", str(tmp_path)],
                                standalone_mode=True)
    assert result.exit_code == PREEMPTED_EXIT
    assert result.stderr.strip().splitlines()[-1].startswith("interrupted: rerun the same command to continue")


def test_the_progress_bar_shows_each_step(tmp_path, monkeypatch):
    """Not only each epoch: a long epoch shows its steps (at most once a second; here every step)."""
    shown = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix_str(self, text):
            shown.append(text)

        def close(self):
            pass

    monkeypatch.setattr(runmod, "tqdm", Bar)
    monkeypatch.setattr(runmod, "PROGRESS_EVERY_S", 0.0)
    train_run(tiny("dml", "reference", out_dir=str(tmp_path), epochs=1), progress=True)
    assert [t for t in shown if t.startswith("step ")] == ["step 1", "step 2", "step 3"]
    assert shown[-1].startswith("epoch 1 done, acc ")


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    a = tiny("dml", "reference", out_dir=str(tmp_path), checkpoint_every=1)
    b = replace(a, seed=43)
    runmod.save_resume_checkpoint(a.checkpoint_path(), [a], engine=_NoEngine(), histories=[{}], runs=[{}],
                                  device=torch.device("cpu"))
    os.replace(a.checkpoint_path(), b.checkpoint_path())
    with pytest.raises(CheckpointError, match="another configuration.*seed"):
        train_run(b, progress=False)


class _NoEngine:
    def state_dict(self):
        return {}


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a checkpoint at all"])
def test_truncated_or_foreign_checkpoint_is_one_line(tmp_path, content):
    cfg = tiny("dml", "reference", out_dir=str(tmp_path))
    cfg.checkpoint_path().parent.mkdir(parents=True, exist_ok=True)
    cfg.checkpoint_path().write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable") as info:
        train_run(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert cfg.checkpoint_path().read_bytes() == content, "nothing recorded is touched"


def test_checkpoint_holding_code_is_never_executed(tmp_path):
    """weights_only=True: a pickle that would run code on load is refused."""
    cfg = tiny("dml", "reference", out_dir=str(tmp_path))
    marker = tmp_path / "executed"
    cfg.checkpoint_path().parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "resume checkpoint", "payload": _Exploit(str(marker))}, cfg.checkpoint_path())
    with pytest.raises(CheckpointError, match="unreadable"):
        train_run(cfg, progress=False)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# --------------------------------------------------------------------------------------------------
# Real processes: SIGKILL at random moments, SIGTERM to the command line


def _train_command(cfg: RunConfig) -> list[str]:
    sets = [a for key, value in cfg.overrides for a in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "okdph.cli", "train", "--method", cfg.method, "--engine", cfg.engine,
            "--profile", "pipeline", "--epochs", str(cfg.epochs), "--deterministic", "--device", "cpu",
            "--train-samples", str(cfg.train_samples), "--out", cfg.out_dir, "--quiet", *sets]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bitwise(tmp_path, uninterrupted):
    """Kill the training process at random moments until a run completes; every restart continues
    from the last checkpoint (or from scratch before the first) and the final record matches."""
    rng = random.Random(7)
    totals = {"kills": 0, "resumed_from_checkpoint": 0, "runs": 0}
    for method, engine, overrides in [("okdph", "reference", (("interval", "2b"),)), ("pcl", "fast", ())]:
        cfg = tiny(method, engine, overrides, out_dir=str(tmp_path / method))
        expected = uninterrupted(cfg)
        kills = 0
        while not cfg.record_path().exists():
            proc = subprocess.Popen(_train_command(cfg), env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            if kills < 6:
                # Half the kills come at any moment after the start (model building, the first
                # epoch), half after a checkpoint exists (mid-epoch, during a checkpoint write, ...).
                marker = cfg.checkpoint_path() if kills % 2 else cfg.lock_path()
                deadline = time.monotonic() + 120
                while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 1.5 if kills % 2 else 4.0))
                if proc.poll() is None:
                    had_checkpoint = cfg.checkpoint_path().exists()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    totals["resumed_from_checkpoint"] += had_checkpoint
                    continue
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()[-2000:]
        record = json.loads(cfg.record_path().read_text())
        assert outcome(record) == expected, f"{method}/{engine} after {kills} kills"
        assert not cfg.checkpoint_path().exists() and not cfg.lock_path().exists()
        totals["kills"] += kills
        totals["runs"] += 1
    print("fault injection:", totals)
    assert totals["kills"] >= 10 and totals["resumed_from_checkpoint"] >= 4


@pytest.mark.slow
def test_sigterm_to_the_command_checkpoints_exits_75_and_resumes(tmp_path, uninterrupted):
    cfg = tiny("okdph", "reference", (("interval", "2b"),), out_dir=str(tmp_path), epochs=4)
    proc = subprocess.Popen(_train_command(cfg), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not cfg.checkpoint_path().exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # after the first epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err.decode()
    message = err.decode().strip().splitlines()
    assert len(message) == 1 and message[0].startswith("preempted:") and "rerun the same command" in message[0]
    assert cfg.checkpoint_path().exists() and not cfg.record_path().exists()
    done = subprocess.run(_train_command(cfg), env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert f"resuming {cfg.run_id()} from {cfg.checkpoint_path()}: epoch " in done.stderr.decode()
    record = json.loads(cfg.record_path().read_text())
    assert len(record["resumes"]) == 1
    assert outcome(record) == uninterrupted(cfg)
