"""Where runs execute: in this process, in one worker process per GPU, on SLURM (okdph.bench.slurm),
or anywhere else through one self-contained shell command per run (`train_command`, which
`okdph-bench plan` prints).

Every executor calls `okdph.engine.run.train_run`, which writes the record atomically; a run that
fails is reported and the others go on.
"""
from __future__ import annotations

import dataclasses

import multiprocessing as mp
import queue
import shlex
import traceback
from dataclasses import dataclass, replace
from typing import Callable

from tqdm import tqdm

from okdph.engine.lock import RunLocked
from okdph.engine.run import AlreadyRecorded, RunConfig, train_run
from okdph.errors import Preempted


@dataclass
class Outcome:
    run_id: str
    error: str | None = None     # one line; None when the run wrote its record
    skipped: str | None = None   # not trained here: another worker holds it, or recorded it meanwhile


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def train_one(cfg: RunConfig, progress: bool = False) -> Outcome:
    """Train one run of a sweep (skipped if recorded meanwhile); a failure becomes a one-line error,
    a run another worker holds or has recorded meanwhile is reported as skipped. Preemption
    propagates: the worker must stop."""
    try:
        train_run(cfg, progress=progress, skip_recorded=True)
        return Outcome(cfg.run_id())
    except Preempted:
        raise
    except (RunLocked, AlreadyRecorded) as exc:
        return Outcome(cfg.run_id(), skipped=str(exc))
    except Exception as exc:  # one run's failure must not stop a sweep; the summary lists it
        return Outcome(cfg.run_id(), _error_line(exc))


def train_packed_one(cfgs: list[RunConfig], progress: bool = False) -> list[Outcome]:
    """Train runs that differ only in their seed as one pack (okdph.engine.packed); outcomes as
    `train_one`'s. A failure fails every run of the pack."""
    from okdph.engine.run import train_packed

    try:
        records = train_packed(cfgs, progress=progress, skip_recorded=True)
    except Preempted:
        raise
    except Exception as exc:
        return [Outcome(cfg.run_id(), _error_line(exc)) for cfg in cfgs]
    return [Outcome(cfg.run_id()) if cfg.run_id() in records
            else Outcome(cfg.run_id(), skipped="held by another worker or recorded meanwhile") for cfg in cfgs]


def group_packs(configs: list[RunConfig], size: int) -> list[list[RunConfig]]:
    """Runs in groups of at most `size` that differ only in their seed (a cell's seeds), in order."""
    from okdph.engine.run import pack_key

    groups: dict[tuple, list[RunConfig]] = {}
    for cfg in configs:
        groups.setdefault(pack_key(cfg), []).append(cfg)
    size = max(1, size)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def longest_first(groups: list[list[RunConfig]]) -> list[list[RunConfig]]:
    """Groups in decreasing order of their epochs × networks × runs, ties in table order: workers that
    take the next group from a queue finish together when the long runs go first (a long run taken
    last leaves the other workers idle; Table 3 smoke ended with one VGG16 run alone for its last
    minute and a half in table order)."""
    from okdph.engine.recipe import resolve_recipe

    def work(group: list[RunConfig]) -> int:
        cfg = group[0]
        epochs = resolve_recipe(cfg.profile, cfg.resolved_dataset(), cfg.epochs, cfg.backbone).epochs
        return epochs * cfg.students * len(group)

    return sorted(groups, key=work, reverse=True)


def train_group(cfgs: list[RunConfig], progress: bool = False) -> list[Outcome]:
    """A group from `group_packs`: one pack on the fast engine, else one run after another."""
    if len(cfgs) > 1 and cfgs[0].resolved_engine() == "fast" and not cfgs[0].ddp:
        return train_packed_one(cfgs, progress)
    return [train_one(cfg, progress) for cfg in cfgs]


def gpu_indices(gpus: str) -> list[int]:
    """`--gpus 0,2` as written -> [0, 2] (which exist is checked where the runs start, so that a dry
    run can plan for another machine)."""
    from okdph.errors import ConfigError

    parts = [g.strip() for g in gpus.split(",") if g.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise ConfigError(f"--gpus expects GPU indices like 0,1 or 'all' or 'cpu', got '{gpus}'")
    return [int(part) for part in parts]


def parse_gpus(gpus: str | None, cuda_count: int, jobs: int | None = None) -> list[str]:
    """The devices of the local workers: `--gpus 0,2` -> ["cuda:0", "cuda:2"]; "all" or nothing ->
    every visible GPU; no GPU or "cpu" -> `jobs` CPU workers (1: this process; None: one per free
    core, okdph.threads.default_jobs)."""
    from okdph.errors import ConfigError
    from okdph.threads import default_jobs

    if jobs is None:
        jobs = default_jobs()
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    if gpus is None or gpus.strip().lower() == "all":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"] * jobs
    if gpus.strip().lower() == "cpu":
        return ["cpu"] * jobs
    ids = gpu_indices(gpus)
    bad = [i for i in ids if not i < cuda_count]
    if bad:
        raise ConfigError(f"GPU {bad[0]} not available; valid: "
                          f"{', '.join(map(str, range(cuda_count))) or 'none (use --gpus cpu)'}")
    return [f"cuda:{i}" for i in ids]


def run_local(configs: list[RunConfig], devices: list[str], *, progress: bool = True, desc: str = "runs",
              on_done: Callable[[Outcome], None] | None = None, pack_size: int = 1) -> list[Outcome]:
    """Run `configs` on `devices`: in this process when there is one device, else one worker
    process per device (spawned, so CUDA initialises cleanly), each taking the next group of runs
    from a shared queue. One progress bar counts the runs across all workers. With `pack_size` > 1,
    up to that many seeds of a cell train as one pack on the fast engine (`group_packs`).

    A CPU worker (this process included) runs `okdph.threads.default_threads(workers)` threads:
    OMP_NUM_THREADS when set, else the free cores shared among the workers, at least one. More
    threads than free cores collapse: OpenMP threads that wait for a core taken by another process
    spin (README, "On a shared machine")."""
    from okdph.threads import default_threads

    cpu_threads = default_threads(len(devices))
    outcomes: list[Outcome] = []
    bar = tqdm(total=len(configs), desc=desc, unit="run", disable=not progress or not configs, dynamic_ncols=True)

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        bar.update(1)
        failed = sum(o.error is not None for o in outcomes)
        bar.set_postfix_str(f"last {outcome.run_id[:40]}" + (f", {failed} failed" if failed else ""))
        if on_done:
            on_done(outcome)

    try:
        if len(devices) == 1:
            _run_here(configs, devices[0], cpu_threads, pack_size, progress, finish, bar)
        else:
            _run_in_workers(configs, devices, cpu_threads, pack_size, finish, done=lambda: len(outcomes))
    finally:
        bar.close()
    return outcomes


def _run_here(configs, device: str, cpu_threads: int, pack_size: int, progress: bool, finish, bar) -> None:
    """One device: every group of runs in this process, one after another."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        for group in group_packs(configs, pack_size):
            bar.set_postfix_str(f"now {group[0].run_id()[:40]}" + (f" +{len(group) - 1}" if len(group) > 1 else ""))
            group = [replace(cfg, device=device) if cfg.device == "auto" else cfg for cfg in group]
            for outcome in train_group(group, progress=progress and group[0].profile != "pipeline"):
                finish(outcome)
    finally:
        torch.set_num_threads(threads)


def _run_in_workers(configs, devices: list[str], cpu_threads: int, pack_size: int, finish, done) -> None:
    """One spawned worker process per device, each taking the next group (longest first) from a
    shared queue, until every run has an outcome or every worker stopped early (preempted)."""
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for group in longest_first(group_packs(configs, pack_size)):
        tasks.put(group)
    workers = [ctx.Process(target=_worker, args=(device, tasks, results, cpu_threads), daemon=True)
               for device in devices]
    for w in workers:
        tasks.put(None)  # one stop sign per worker
        w.start()
    try:
        while done() < len(configs):
            try:
                finish(results.get(timeout=1.0))
            except queue.Empty:
                if not any(w.is_alive() for w in workers):  # all stopped early (preempted)
                    break
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.terminate()


def _worker(device: str, tasks, results, cpu_threads: int = 1) -> None:
    """A worker process: train groups of runs on `device` until the stop sign."""
    import torch

    if device == "cpu":
        torch.set_num_threads(cpu_threads)  # CPU workers share the cores: no oversubscription
    while True:
        group = tasks.get()
        if group is None:
            return
        group = [replace(cfg, device=device) for cfg in group]
        done: list[Outcome] = []
        try:
            for outcome in train_group(group):
                done.append(outcome)
                results.put(outcome)
        except Preempted as exc:  # checkpointed; this worker stops, a rerun resumes
            for cfg in group[len(done):]:
                results.put(Outcome(cfg.run_id(), f"Preempted: {exc}"))
            return
        except BaseException:  # never leave the parent waiting for an outcome
            line = traceback.format_exc().strip().splitlines()[-1]
            for cfg in group[len(done):]:
                results.put(Outcome(cfg.run_id(), line))


# --------------------------------------------------------------------------------------------------
# plan: one shell command per run


def train_command(cfg: RunConfig, *, ddp_procs: int | None = None) -> str:
    """A self-contained `okdph-bench train` command that trains exactly `cfg` (the same run id, the
    same record path) and does nothing when the record already exists. Its options come from the
    fields' declarations (okdph.config.option: `plan`), the dataset resolved. With `ddp_procs`, the
    command runs under torchrun on that many GPUs."""
    args = ["train"]
    for f in dataclasses.fields(cfg):
        cli = f.metadata.get("cli")
        value = getattr(cfg, f.name)
        if not cli or cli["plan"] == "never" or (cli["plan"] == "if_set" and value == f.default):
            continue
        flag = cli["flags"][0]
        if f.name == "dataset":
            value = cfg.resolved_dataset()
        if cli["kind"] == "bool":
            args += [flag] if value else []
        elif cli["kind"] == "sets":
            for key, item in value:
                args += [flag, f"{key}={item}"]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    args += ["--skip-recorded", "--quiet"]
    if ddp_procs:
        return shlex.join(["torchrun", "--standalone", f"--nproc_per_node={ddp_procs}", "--no-python",
                           "okdph-bench"] + args + ["--ddp"])
    return shlex.join(["okdph-bench"] + args)
