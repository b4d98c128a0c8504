"""Files a run leaves beside its record, all written atomically and read with `weights_only=True`
(docs/verification.md#resume-and-preemption): never executed as code.

- `<run_id>.ckpt.pt`: the resume checkpoint (everything needed to continue exactly), replaced at every
  epoch end and when the run is preempted; removed once the record is written. A pack of runs keeps
  one, `pack-<P>-<digest>.ckpt.pt`, in the same format.
- `<run_id>.traj/epoch0005.pt`: trajectory points, the students' weights every `--save-every` epochs
  (`epoch0000.pt` is the initialisation), for the PAC-Bayes bound and the loss landscape
  (okdph.analysis).
"""
from __future__ import annotations

import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from okdph.engine.record import atomic_write
from okdph.errors import PREEMPTED_EXIT, CheckpointError, ConfigError, Preempted  # noqa: F401  (old home)

CHECKPOINT_FORMAT = 2  # 2: one format for single runs and packs
TRAJECTORY_FORMAT = 1


def atomic_torch_save(path: Path, obj) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


# What each kind of file is, and what to do when it cannot be read (the user sees one line).
_REMEDY = {
    "resume checkpoint": "it is the resume checkpoint of an interrupted run, not a result: delete it to start "
                         "the run over",
    "trajectory point": "it is a trajectory point (weights kept by --save-every for the analyses): delete the "
                        "run's .traj folder and train the run again with --save-every",
}


def _load_failure(exc: Exception) -> str:
    """Why torch.load failed, in a few words: torch's messages run to paragraphs (and the
    weights-only one suggests loading the file unsafely, which this suite never does)."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed"):
        return "it holds objects other than tensors and plain data, which are never loaded (they could run code)"
    first = text.split(". ")[0].rstrip(".") or type(exc).__name__
    return first if len(first) <= 160 else first[:160].rsplit(" ", 1)[0] + " ..."  # whole words only


def safe_load(path: Path, *, kind: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True; any failure is one CheckpointError line naming the file,
    what it is and what to do."""
    path = Path(path)
    remedy = _REMEDY.get(kind, "delete it")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{kind} '{path}' does not exist") from None
    except Exception as exc:  # truncated zip, pickle of arbitrary objects, not a torch file at all
        raise CheckpointError(f"{kind} '{path}' is unreadable (truncated or not an okdph-bench file: "
                              f"{_load_failure(exc)}); {remedy}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise CheckpointError(f"'{path}' is not an okdph-bench {kind}; {remedy}")
    return data


# --------------------------------------------------------------------------------------------------
# RNG states (all of them: the run's result must not depend on where it was interrupted)


def capture_rng(device: torch.device) -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------
# Trajectory points


def trajectory_dir(record_path: Path) -> Path:
    record_path = Path(record_path)
    return record_path.with_name(record_path.stem + ".traj")


def save_trajectory_point(directory: Path, epoch: int, strategy, meta: dict) -> Path:
    """The students' weights (parameters and BN buffers, one state dict per student, CPU) after
    `epoch` epochs. `meta` says how to rebuild a student: backbone, num_classes, width, dataset."""
    if not strategy.has_students():
        raise ConfigError(f"--save-every needs a method with separate students; '{strategy.name}' has none")
    states = [{k: v.detach().to("cpu", copy=True) for k, v in s.items()}
              for s in strategy.student_group().member_states()]
    path = Path(directory) / f"epoch{epoch:04d}.pt"
    atomic_torch_save(path, {"kind": "trajectory point", "format": TRAJECTORY_FORMAT, "epoch": epoch,
                             **meta, "students": states})
    return path


@dataclass
class TrajectoryPoint:
    epoch: int
    meta: dict                       # backbone, num_classes, width, dataset, setting, run_id, ...
    students: list[dict[str, Tensor]]


def load_trajectory_point(path: Path) -> TrajectoryPoint:
    data = safe_load(path, kind="trajectory point")
    if data.get("format") != TRAJECTORY_FORMAT:
        raise CheckpointError(f"trajectory point '{path}' has format {data.get('format')}, "
                              f"this version reads {TRAJECTORY_FORMAT}")
    meta = {k: v for k, v in data.items() if k not in ("kind", "format", "epoch", "students")}
    return TrajectoryPoint(epoch=int(data["epoch"]), meta=meta, students=data["students"])


def load_trajectory(directory: Path) -> list[TrajectoryPoint]:
    """Every saved point of a run, in epoch order."""
    directory = Path(directory)
    files = sorted(directory.glob("epoch*.pt"))
    if not files:
        raise CheckpointError(f"no trajectory points in '{directory}'; train the run with --save-every E")
    return [load_trajectory_point(f) for f in files]


# --------------------------------------------------------------------------------------------------
# Resume checkpoints


def _differences(saved: dict, current: dict) -> list[str]:
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def save_resume_checkpoint(path: Path, cfgs, *, engine, histories: list[dict], runs: list[dict],
                           device: torch.device) -> None:
    """Everything the runs (one, or a pack) need to continue exactly: the engine's state (the
    strategies with their networks, HWM, EMA models and gates; optimizers, schedules, data order,
    the epoch in flight), every global RNG, and each run's history and counters so far."""
    atomic_torch_save(path, {
        "kind": "resume checkpoint", "format": CHECKPOINT_FORMAT,
        "run_ids": [c.run_id() for c in cfgs], "identities": [c.identity() for c in cfgs],
        "histories": histories, "runs": runs, "engine": engine.state_dict(), "rng": capture_rng(device),
    })


def load_resume_checkpoint(path: Path, cfgs) -> dict:
    """A checkpoint of exactly these runs (same identities), or one CheckpointError line."""
    data = safe_load(path, kind="resume checkpoint")
    if data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint '{path}' has format {data.get('format')}, this version reads "
                              f"{CHECKPOINT_FORMAT}; delete it to start the run afresh")
    identities = [c.identity() for c in cfgs]
    if data.get("run_ids") != [c.run_id() for c in cfgs] or data.get("identities") != identities:
        saved = data.get("identities") or [{}]
        diff = sorted({k for mine, theirs in zip(identities, saved) for k in _differences(theirs, mine)}
                      if len(saved) == len(identities) else {"runs"})
        raise CheckpointError(f"checkpoint '{path}' belongs to another configuration (differs in: "
                              f"{', '.join(diff) or 'run id'}); delete it or pass the same options")
    return data


# --------------------------------------------------------------------------------------------------
# Preemption

class StopRequest:
    """SIGTERM, SIGUSR1 and SIGUSR2 (SLURM's pre-timeout signals) and SIGINT (Ctrl-C) ask the run
    to stop after the step.

    Callable: True once a signal arrived. `hand_over` is called after the checkpoint is on disk:
    it gives the signal to the handler that was installed before (submitit's, which requeues the
    job), and otherwise raises Preempted: Ctrl-C ends like SIGTERM, with the checkpoint written and
    how to resume. A second Ctrl-C before the step ends interrupts at once (KeyboardInterrupt).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")  # SLURM --signal: USR1 by habit, USR2 under submitit

    def __init__(self, immediate: bool = False):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        # During set-up (data, networks, engine) there is nothing to checkpoint and no step to wait
        # for: a signal raises Preempted at once, and the run's lock and folder are released on the way out.
        self.immediate = immediate

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread; a worker thread trains without them
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.immediate:
            self.signum = signum
            self.hand_over(f"stopped by {self.signal_name} during set-up, before the first step; "
                           "rerun the same command to start the run")
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def hand_over(self, message: str):
        previous = self.previous.get(self.signum)
        self.restore()
        # Python's own SIGINT handler would raise KeyboardInterrupt: the message would not say how to resume
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)
        raise Preempted(message)
