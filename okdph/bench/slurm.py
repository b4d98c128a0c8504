"""The SLURM executor, through submitit: one job per packed group of runs, requeued on preemption.

A job trains its runs one after another and skips those whose record exists, so a requeued job
(after preemption or a timeout, submitit calls `checkpoint`) goes on with the runs not yet done.
Jobs of one submission go out as one array job. Tests use submitit's `local` backend, which runs
the same job objects as local processes; they ask for it by name (`cluster="local"`). Without a name
the backend is SLURM or nothing: submitit's automatic choice would fall back to local processes on
a machine without SLURM, which trains detached on the user's machine after the command returned.
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

from okdph.bench.executors import Outcome, group_packs, train_group
from okdph.engine.run import RunConfig, is_done, removed_if_left_empty


class PackedJob:
    """A picklable callable that submitit runs on a node: the runs of one group, in order, or with
    `packed` a cell's seeds as one pack on the fast engine."""

    def __init__(self, configs: list[RunConfig], packed: bool = False):
        self.configs = list(configs)
        self.packed = packed

    def __call__(self) -> list[Outcome]:
        outcomes, todo = [], []
        for cfg in self.configs:
            if is_done(cfg):  # done before a requeue, or by another job
                outcomes.append(Outcome(cfg.run_id(), skipped="recorded before this job ran"))
            else:
                todo.append(cfg)
        # With packing, a cell's seeds on the fast engine train as one pack (okdph.engine.packed).
        for group in group_packs(todo, len(todo) if self.packed else 1):
            outcomes += train_group(group)
        return outcomes

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or timeout (SIGUSR1), once the run in flight has written
        its resume checkpoint (engine/checkpoint.py StopRequest hands the signal over): resubmit the
        same group; finished runs are skipped and the interrupted one resumes where it stopped."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def pack(configs: list[RunConfig], size: int) -> list[list[RunConfig]]:
    """Consecutive groups of `size` runs (runs of one cell are consecutive in an expansion)."""
    size = max(1, size)
    return [configs[i:i + size] for i in range(0, len(configs), size)]


def check_available(cluster: str | None = None) -> str:
    """The submitit backend to submit to: `cluster` when named ("slurm", or "local"/"debug" for
    tests), else "slurm" once SLURM is reachable (`sbatch` on PATH); ConfigError otherwise.
    Called before any work, so a machine without SLURM is one line and nothing is written."""
    from okdph.errors import ConfigError

    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ConfigError("--executor slurm needs submitit, which is not installed; use --executor local "
                          "or `okdph-bench plan`") from None
    if cluster is not None:
        return cluster
    for command in ("sbatch", "srun"):  # submitit submits with the one and starts the job with the other
        if shutil.which(command) is None:
            raise ConfigError(f"--executor slurm needs SLURM, but '{command}' is not on PATH; run it on a SLURM "
                              "login node, or use --executor local or `okdph-bench plan` for another scheduler")
    return "slurm"


def submit(configs: list[RunConfig], *, folder, pack_size: int = 5, packed: bool = False,
           parameters: dict | None = None, cluster: str | None = None) -> list:
    """Submit one job per group; returns the submitit jobs. `parameters` go to
    `AutoExecutor.update_parameters` (e.g. slurm_partition, timeout_min, gpus_per_node); `cluster`
    picks a submitit backend ("slurm", or "local"/"debug" for tests); None is SLURM, which must be
    reachable (`check_available`)."""
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    from okdph.errors import ConfigError

    folder = Path(folder)
    # A refused submission leaves the folder as it was: its files, then the folders made for it.
    with removed_if_left_empty(folder), _additions_removed_on_failure(folder):
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=check_available(cluster))
        params = {"timeout_min": 24 * 60, "gpus_per_node": 1, "cpus_per_task": 8, "name": "okdph-bench"}
        params.update(parameters or {})
        if executor.cluster != "slurm":  # local/debug take only the generic parameters
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
            if executor.cluster != "debug":
                params["gpus_per_node"] = 0
        try:
            executor.update_parameters(**params)
        except ValueError as exc:  # a parameter submitit does not know, with the list of those it does
            raise ConfigError(f"--slurm: {str(exc).splitlines()[0]}") from None
        groups = pack(configs, pack_size)
        try:
            # submitit prints sbatch's stderr before raising; the error line below carries it instead
            with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                jobs = [executor.submit(PackedJob(group, packed)) for group in groups]
        except (FailedJobError, FailedSubmissionError, RuntimeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next((line for line in lines if "error" in line.lower()), lines[0] if lines else type(exc).__name__)
            raise ConfigError(f"SLURM refused the submission: {reason}") from None
    return jobs


def outcomes(job) -> list[Outcome]:
    """What a finished job reports per run. A job that ended without a result (SLURM killed it for
    memory or time, its node failed, it was cancelled, or it crashed outside a run) fails each of
    its runs with one line: the scheduler's state or the job's last error line, and its log."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.result()
    except (FailedJobError, UncompletedJobError) as exc:
        text = str(exc).split("You can check full logs")[0]  # submitit's trailer: we name the log below
        state = re.search(r"\(state: ([^)]+)\)", text)
        lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
        why = f"state {state.group(1)}" if state else (lines[-1] if lines else type(exc).__name__)
        error = f"SLURM job {job.job_id} ended without a result ({why}); its log: {job.paths.stderr}"
        return [Outcome(cfg.run_id(), error=error) for cfg in job.submission().function.configs]


@contextlib.contextmanager
def _additions_removed_on_failure(folder: Path):
    """What the block adds under `folder` (submitit's files of jobs that never started) is removed
    again, deepest first, when it fails."""
    before = set(folder.rglob("*")) if folder.exists() else set()
    try:
        yield
    except BaseException:
        after = set(folder.rglob("*")) if folder.exists() else set()
        for path in sorted(after - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
