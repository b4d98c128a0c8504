"""Run records: one JSON file per run, written atomically, with its provenance (docs/protocol.md#run-records)."""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import okdph
from okdph.errors import ConfigError, DamagedRecord

SCHEMA_VERSION = 1


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write, *, binary: bool = False) -> None:
    """Call `write(handle)` on a temporary file in the same folder, fsync, then rename over `path`:
    a reader sees the old file or the new one, never a truncated one. The file gets the mode any
    new file gets (0666 less the umask): mkstemp creates 0600, which would keep colleagues out of
    a shared results folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename is None:  # a write into an open file ("File too large", a full disk) names no file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finite_or_null(value):
    """`value` with every non-finite float (a diverged loss) as None: strict JSON has no NaN or
    Infinity, and a reader in another language would choke on Python's tokens for them. The record
    says why in its status ("diverged at epoch e, step s")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def atomic_write_json(path: Path, data: dict) -> None:
    """`data` as strict JSON (non-finite floats written as null), atomically."""
    def write(handle):
        json.dump(finite_or_null(data), handle, indent=1, sort_keys=False, allow_nan=False)
        handle.write("\n")

    atomic_write(path, write)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_accuracy(value) -> bool:
    """A finite number of percent, 0 to 100 (a NaN, 1000 or -5 is an edited or broken record)."""
    return _is_number(value) and math.isfinite(value) and 0.0 <= value <= 100.0


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 30 else text[:27] + "..."


# The type of each top-level field a record may hold (docs/protocol.md#run-records); checked when present.
_FIELD_TYPES = {"schema": int, "run_id": str, "status": str, "method": str, "seed": int, "created": str,
                "hparams": dict, "history": dict, "metrics": dict, "timing": dict, "provenance": dict,
                "resumes": list, "pacbayes": dict}


def record_problem(record) -> str | None:
    """Why a parsed record cannot be used (a field of the wrong type: "acc": "high", history null,
    ...), or None. Checks what the tables, report and analyses read; a field that is absent is not
    a problem (older and minimal records lack some)."""
    if not isinstance(record, dict) or "run_id" not in record or "schema" not in record:
        return "not an okdph-bench run record (no run_id and schema)"
    for key, kind in _FIELD_TYPES.items():
        value = record.get(key, kind())
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key} is {_shown(value)}, not {'a number' if kind is int else 'a ' + kind.__name__}"
    run_id = record["run_id"]
    if "method" in record and not run_id.startswith(f"{record['method']}-"):
        return f"method is {_shown(record['method'])}, but the run id '{run_id}' is of another method"
    if "seed" in record and f"-seed{record['seed']}-" not in run_id:
        return f"seed is {record['seed']}, but the run id '{run_id}' names another seed"
    metrics = record.get("metrics", {})
    # A finished run (its status says so, or it has results at all) has both reported numbers.
    required = ("paper", "final") if record.get("status") == "complete" or metrics else ()
    for name in ("paper", "final"):
        if name in required and name not in metrics:
            return f"metrics.{name} is missing from a {record.get('status', 'finished')} run"
        if name in metrics and not (isinstance(metrics[name], dict) and _is_accuracy(metrics[name].get("acc"))):
            return f"metrics.{name} is {_shown(metrics[name])}, not an accuracy in [0, 100]"
    bound = metrics.get("pacbayes")
    if bound is not None and not (_is_number(bound) or isinstance(bound, dict) and _is_number(bound.get("value"))):
        return f"metrics.pacbayes is {_shown(bound)}, not a number"
    curves = record.get("history", {}).get("test_acc", {})
    if not isinstance(curves, dict) or not all(isinstance(c, list) and all(map(_is_accuracy, c))
                                               for c in curves.values()):
        return f"history.test_acc is {_shown(curves)}, not lists of accuracies in [0, 100] per head"
    return _recipe_problem(record)


def _recipe_problem(record: dict) -> str | None:
    """A record trained with another recipe than its profile has now (the smoke recipe is
    recalibrated from time to time; the run id names the profile, not the recipe) would be shown
    under the current recipe's header: it is no record of this run. Fields the record lacks (older
    records) and runs whose recipe cannot be resolved here are not judged."""
    from okdph.engine.recipe import resolve_recipe

    held = record.get("recipe")
    names = ("profile", "dataset", "backbone")
    if not isinstance(held, dict) or not all(isinstance(record.get(k), str) for k in names):
        return None
    try:
        now = resolve_recipe(record["profile"], record["dataset"], record.get("epochs"), record["backbone"]).to_dict()
    except (ConfigError, TypeError, ValueError):
        return None
    changed = [k for k in held if k in now and held[k] != now[k]]
    if not changed:
        return None
    was = ", ".join(f"{k} {_shown(held[k])}" for k in changed)
    return (f"it was trained with another {record['profile']} recipe ({was}; now "
            f"{', '.join(f'{k} {_shown(now[k])}' for k in changed)})")


def load_record(path: Path) -> dict:
    """A record file, parsed and checked (`record_problem`); DamagedRecord (one line naming the
    file and what is wrong with it) otherwise."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedRecord(f"record '{path}' is unreadable: {exc}") from None
    problem = record_problem(record)
    if problem:
        raise DamagedRecord(f"record '{path}' is damaged: {problem}")
    return record


def read_record(path: Path, run_id: str | None = None) -> dict:
    """A record file, checked: readable, an okdph-bench record with fields of the right types
    (else DamagedRecord), and the run `run_id` when given (the file name says which run it must
    be; else ConfigError: a record of another run is never set aside nor overwritten)."""
    path = Path(path)
    record = load_record(path)
    expected = run_id or path.stem
    if record["run_id"] != expected:
        raise ConfigError(f"record '{path}' is of run '{record['run_id']}', not '{expected}' "
                          "(a record from another configuration); move it away")
    return record


def set_aside(path: Path) -> Path:
    """Rename a damaged record to `<name>.corrupt` (`.corrupt1`, ... if taken) beside it: kept for
    inspection, never deleted, and out of the records (`*.json`). Returns the new path."""
    path = Path(path)
    target, n = path.with_name(path.name + ".corrupt"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt{n}")
    os.replace(path, target)
    return target


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
