"""How many CPU threads a training process uses by default, importable without torch.

torch starts with one thread per core. On a shared machine that collapses: OpenMP threads that wait
for a core another process holds spin (measured in the README). The default therefore follows what
the user or the machine says:

1. `OMP_NUM_THREADS`, when set (the user's choice, or a scheduler's, e.g. SLURM's cpus-per-task setup);
2. else the cores this process may run on (its CPU affinity), less those other processes keep busy
   (the 1-minute load average, rounded; a container sees the host's, which errs towards fewer
   threads), shared by the `jobs` training processes of this command (`run --jobs N`); at least 1.

Every record says how many threads its run used (`provenance.cpu_threads`): CPU results depend on it.
"""
from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_cores() -> int:
    """The cores this process may run on (usable_cores) less those other processes keep busy
    (the 1-minute load average, rounded); at least 1."""
    cores = usable_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        busy = 0
    return max(1, cores - busy)


def chosen_threads() -> int | None:
    """The threads OMP_NUM_THREADS asks for, or None where it is unset or meaningless."""
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(chosen) if chosen.isdigit() and int(chosen) > 0 else None


def default_threads(jobs: int = 1) -> int:
    """CPU threads for each of `jobs` training processes of this command (see the module docstring)."""
    return chosen_threads() or max(1, free_cores() // max(1, jobs))


def default_jobs() -> int:
    """CPU worker processes of `okdph-bench run` unless `--jobs` says: one per free core, each on one
    thread. Small CPU runs use a core better as a process of their own than as a second thread of
    another (docs/verification.md#cpu-speed). With OMP_NUM_THREADS set, the free cores divided by it."""
    return max(1, free_cores() // (chosen_threads() or 1))
