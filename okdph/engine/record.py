"""Run records: one JSON file per run, written atomically, with its provenance (docs/protocol.md#run-records)."""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import okdph

SCHEMA_VERSION = 1


def atomic_write(path: Path, write, *, binary: bool = False) -> None:
    """Call `write(handle)` on a temporary file in the same folder, fsync, then rename over `path`:
    a reader sees the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    def write(handle):
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")

    atomic_write(path, write)


def read_record(path: Path, run_id: str | None = None) -> dict:
    """A record file, checked: JSON, an okdph-bench record, and the run `run_id` when given (the
    file name says which run it must be). One ConfigError line otherwise."""
    from okdph.strategy import ConfigError

    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"record '{path}' is unreadable: {exc}") from None
    if not isinstance(record, dict) or "run_id" not in record or "schema" not in record:
        raise ConfigError(f"'{path}' is not an okdph-bench run record")
    expected = run_id or path.stem
    if record["run_id"] != expected:
        raise ConfigError(f"record '{path}' is of run '{record['run_id']}', not '{expected}' "
                          "(a record from another configuration); move it away")
    return record


# What differs between two executions of the same run by necessity: clocks, machine, resumes.
_CIRCUMSTANCES = ("timing", "provenance", "created", "resumes")
_CIRCUMSTANTIAL_HISTORY = ("epoch_s", "train_s")


def outcome(record: dict) -> dict:
    """The part of a record that a deterministic run must reproduce bit for bit (everything but
    timings, provenance and the resume log); what the resume tests compare."""
    kept = {k: v for k, v in record.items() if k not in _CIRCUMSTANCES}
    kept["history"] = {k: v for k, v in record["history"].items() if k not in _CIRCUMSTANTIAL_HISTORY}
    return kept


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The suite's git commit, with "+dirty" when the work tree has changes; None outside git.

    Read once per process (train_run asks before training): the code a process runs is what was
    checked out when it started, not what the work tree holds when a later record is written."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def provenance(device: torch.device) -> dict:
    """Everything needed to trace a number back to the code and machine that produced it."""
    cuda = device.type == "cuda"
    return {
        "okdph_version": okdph.__version__,
        "git": git_revision(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def summarise(test_acc: dict[str, list[float]], deployed_head: str) -> dict:
    """The two reported metrics of a run (docs/protocol.md#which-number-is-reported).

    paper: best epoch of the max over all heads, as every official script reports;
    final: the deployed head at the last epoch, what a user would actually ship.
    """
    per_head = {}
    for head, accs in test_acc.items():
        best_epoch = max(range(len(accs)), key=lambda e: accs[e])
        per_head[head] = {"best": accs[best_epoch], "best_epoch": best_epoch, "final": accs[-1]}
    best_head = max(per_head, key=lambda h: per_head[h]["best"])
    last = len(test_acc[deployed_head]) - 1
    return {
        "paper": {"acc": per_head[best_head]["best"], "epoch": per_head[best_head]["best_epoch"],
                  "head": best_head},
        "final": {"acc": test_acc[deployed_head][-1], "epoch": last, "head": deployed_head},
        "per_head": per_head,
    }
