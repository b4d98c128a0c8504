"""Executors with real (tiny) runs: CPU worker processes, SLURM through submitit's local backend,
and data-parallel training under torchrun on CPU (gloo, 2 processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import replace

import pytest

from okdph.bench import executors, runner, slurm
from okdph.bench.choices import Execution, TableChoices
from okdph.bench.experiments import cell_config, get_table
from okdph.bench.store import ResultStore
from okdph.engine.run import RunConfig


def _pipeline_configs(store, methods=("dml",), count=2):
    table = get_table("3")
    cells = [c for c in table.cells if c.method in methods and c.dataset == "cifar10"][:count]
    return [cell_config(c, profile="pipeline", out_dir=str(store.runs_dir)) for c in cells]


@pytest.mark.slow
def test_local_cpu_workers_share_one_queue(tmp_path):
    store = ResultStore(tmp_path)
    configs = _pipeline_configs(store, count=2)
    outcomes = executors.run_local(configs, ["cpu", "cpu"], progress=False)
    assert sorted(o.run_id for o in outcomes) == sorted(c.run_id() for c in configs)
    assert all(o.error is None for o in outcomes)
    assert all(c.record_path().exists() for c in configs)


def test_workers_take_the_longest_runs_first():
    from okdph.bench.experiments import expand, unique_configs

    configs = unique_configs(expand(get_table("3"), profile="smoke", methods=["dml", "one"]))
    order = [(c.backbone, c.students, c.method) for g in executors.longest_first([[c] for c in configs]) for c in g]
    # VGG16 (12 epochs) before ResNet32 (5), 4 students before 2; ties keep the table's order
    assert order[:2] == [("vgg16", 4, "dml"), ("vgg16", 4, "one")] and order[-2:] == [("resnet32", 2, "dml"),
                                                                                      ("resnet32", 2, "one")]
    # a pack counts its runs: 6 ResNet32 runs of 2 students for 5 epochs outweigh one VGG16 run of 4 for 12
    assert executors.longest_first([[configs[0]] * 6, [configs[-1]]])[0] == [configs[0]] * 6


def test_parse_gpus():
    assert executors.parse_gpus(None, 0) == ["cpu"]
    assert executors.parse_gpus(None, 0, jobs=2) == ["cpu", "cpu"]
    assert executors.parse_gpus("all", 2) == ["cuda:0", "cuda:1"]
    assert executors.parse_gpus("1", 2) == ["cuda:1"]
    with pytest.raises(ValueError, match="GPU 3 not available; valid: 0, 1"):
        executors.parse_gpus("0,3", 2)


@pytest.mark.slow
def test_slurm_executor_through_submitit_local_backend(tmp_path, monkeypatch):
    """One job per packed group; each job writes its runs' records; the table renders after --wait."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the local jobs share this machine's cores
    execution = Execution(executor="slurm", pack_size=3, slurm_cluster="local", wait=True, progress=False,
                          slurm_parameters={"timeout_min": 20, "slurm_partition": "ignored-locally"})
    summary = runner.run_table(TableChoices.of("3", profile="pipeline"), execution, methods=["dml"], results=tmp_path)
    assert summary.runs == 6 and len(summary.jobs) == 2          # 6 runs packed 3 per job
    assert summary.trained == 6 and not summary.failed
    assert len(list((tmp_path / "runs").glob("*.json"))) == 6
    assert "(n=1)" in summary.markdown and (tmp_path / "tables" / "table3-pipeline.md").exists()
    assert (tmp_path / "slurm").is_dir()  # submitit's logs and pickles


def test_a_requeued_job_skips_the_runs_it_finished(tmp_path):
    store = ResultStore(tmp_path)
    configs = _pipeline_configs(store, count=2)
    job = slurm.PackedJob(configs)
    # the first run finished before the preemption
    configs[0].record_path().parent.mkdir(parents=True)
    finished = {"acc": 50.0, "epoch": 0, "head": "student0"}
    configs[0].record_path().write_text(json.dumps({"schema": 1, "run_id": configs[0].run_id(), "status": "complete",
                                                   "metrics": {"paper": finished, "final": finished}}))
    resubmission = job.checkpoint()
    import submitit

    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    assert resubmission.function is job                      # the same group goes back in the queue
    trained = []
    job_module_train = slurm.train_group
    try:
        slurm.train_group = lambda group: [trained.append(c.run_id()) or executors.Outcome(c.run_id()) for c in group]
        outcomes = job()
    finally:
        slurm.train_group = job_module_train
    assert trained == [configs[1].run_id()] and len(outcomes) == 2
    assert slurm.pack(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.slow
def test_a_preempted_slurm_job_checkpoints_requeues_and_resumes(tmp_path, monkeypatch):
    """submitit's preemption signal reaches the run first: it checkpoints mid-run, hands the signal
    to submitit, which requeues the job; the requeued job resumes the run and its record equals an
    uninterrupted one (submitit's local backend runs the same job objects as local processes)."""
    import time

    import submitit

    from okdph.engine.record import outcome
    from okdph.engine.run import train_run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = RunConfig(method="okdph", overrides=(("interval", "2b"),), profile="pipeline", epochs=4, train_samples=96,
                    deterministic=True, device="cpu", out_dir=str(tmp_path / "runs"))
    executor = submitit.AutoExecutor(folder=tmp_path / "slurm" / "%j", cluster="local")
    executor.update_parameters(timeout_min=20, gpus_per_node=0)
    job = executor.submit(slurm.PackedJob([cfg]))
    deadline = time.monotonic() + 300
    while not cfg.checkpoint_path().exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cfg.checkpoint_path().exists() and not cfg.record_path().exists()
    # SLURM signals the job's tasks before a preemption or the time limit (--signal); the local
    # backend's own _interrupt() signals its controller, which does not forward it, so signal the task.
    task = _children(job._process.pid)
    assert len(task) == 1
    os.kill(task[0], submitit.JobEnvironment._usr_sig())
    outcomes = job.result()
    assert [o.error for o in outcomes] == [None]
    record = json.loads(cfg.record_path().read_text())
    assert len(record["resumes"]) == 1
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job (OMP_NUM_THREADS=1): reductions split by thread count
    try:
        clean = train_run(replace(cfg, out_dir=str(tmp_path / "clean")), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert outcome(record) == outcome(clean)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(stat))
    return found


@pytest.mark.slow
def test_ddp_on_cpu_with_two_gloo_processes(tmp_path):
    """`okdph-bench train --ddp` under torchrun: one record, written by rank 0, with the whole test
    set counted over both shards and the global batch split over the processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "okdph.cli", "train", "--ddp", "--method", "dml", "--profile", "pipeline", "--device", "cpu",
           "--width", "0.125", "--out", str(tmp_path), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "complete" and record["timing"]["execution"] == {
        "engine": "reference", "world_size": 2, "backend": "gloo", "batch_per_process": 16}
    assert record["data"]["test_size"] == 180 and set(record["history"]["test_acc"]) == {"student0", "student1"}
    assert done.stdout.count("complete: ") == 1                   # only rank 0 reports
    # the same run id as a single-process run of the same configuration: DDP is not part of identity
    # (the engine is: --engine auto picks the reference engine under DDP, the fast one alone)
    single = RunConfig(method="dml", profile="pipeline", device="cpu", width=0.125, engine="reference",
                       out_dir=str(tmp_path))
    assert path.name == f"{single.run_id()}.json"


def _meters_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from okdph.engine.distributed import _Shard, sum_counts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    summed, count = sum_counts({"ce": torch.tensor(1.5 * (rank + 1)), "student0": torch.tensor(10 * (rank + 1))},
                               5 + rank)
    shard = list(_Shard(5, rank, world))
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"ce": float(summed["ce"]), "student0": float(summed["student0"]), "count": count,
                   "shard": shard}, handle)


@pytest.mark.slow
def test_meters_are_summed_and_the_test_set_sharded_over_processes(tmp_path):
    import torch.multiprocessing as tmp_mp

    tmp_mp.spawn(_meters_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert (got["ce"], got["student0"], got["count"]) == (4.5, 30.0, 11)
    assert ranks[0]["shard"] == [0, 2, 4] and ranks[1]["shard"] == [1, 3]   # each test item once


def test_a_job_packs_a_cells_seeds_only_when_asked(tmp_path):
    store = ResultStore(tmp_path)
    base = _pipeline_configs(store, count=2)
    configs = [replace(base[0], seed=42), replace(base[0], seed=43), base[1]]  # two seeds of one cell + another
    groups = []
    original = slurm.train_group
    try:
        slurm.train_group = lambda group: groups.append([(c.backbone, c.seed) for c in group]) or [
            executors.Outcome(c.run_id()) for c in group]
        slurm.PackedJob(configs, packed=True)()
        packed, groups[:] = list(groups), []
        slurm.PackedJob(configs)()
    finally:
        slurm.train_group = original
    cell = base[0].backbone
    assert packed == [[(cell, 42), (cell, 43)], [(base[1].backbone, base[1].seed)]]
    assert groups == [[(cell, 42)], [(cell, 43)], [(base[1].backbone, base[1].seed)]]


def test_slurm_is_asked_for_by_name_never_picked_by_submitit(tmp_path, monkeypatch):
    """Without SLURM, submitit's automatic choice would be local processes: refused instead; a
    backend named by a test (local) stays available; with sbatch on PATH the backend is slurm."""
    from okdph.errors import ConfigError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="'sbatch' is not on PATH"):
        slurm.check_available(None)
    with pytest.raises(ConfigError, match="'sbatch' is not on PATH"):
        slurm.submit([], folder=tmp_path / "slurm")
    assert not (tmp_path / "slurm").exists()
    assert slurm.check_available("local") == "local"
    for command in ("sbatch", "srun"):
        with pytest.raises(ConfigError, match=f"'{command}' is not on PATH"):
            slurm.check_available(None)
        fake = tmp_path / command
        fake.write_text("#!/bin/sh\nexit 1\n")
        fake.chmod(0o755)
    assert slurm.check_available(None) == "slurm"


@pytest.mark.parametrize("ending", ["out of memory", "crashed outside a run"])
def test_a_job_that_ended_without_a_result_fails_its_runs_in_one_line(tmp_path, ending):
    """What `run --executor slurm --wait` reports for a job SLURM killed or that crashed: each of
    its runs failed, with the state or the last error line and the job's log, not a traceback."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    configs = [RunConfig(method="dml", profile="pipeline", seed=seed, out_dir=str(tmp_path)) for seed in (42, 43)]
    log = tmp_path / "1234_0_log.err"
    if ending == "out of memory":
        exc = UncompletedJobError(f"Job 1234 (task: 0) with path {tmp_path}/1234_0_result.pkl\nhas not produced "
                                  "any output (state: OUT_OF_MEMORY)\nError stream produced:\n----\n"
                                  "slurmstepd: error: Detected 1 oom_kill event")
    else:
        exc = FailedJobError("Job (task=0) failed during processing with trace:\n----------------------\n"
                             "Traceback (most recent call last):\n  File \"x.py\", line 1\nMemoryError: boom\n"
                             f"----------------------\nYou can check full logs with 'job.stderr(0)' and "
                             f"'job.stdout(0)'or at paths:\n  - {log}\n  - {tmp_path}/1234_0_log.out")

    class EndedJob:
        job_id = "1234"
        paths = types.SimpleNamespace(stderr=log)

        def result(self):
            raise exc

        def submission(self):
            return types.SimpleNamespace(function=slurm.PackedJob(configs))

    outcomes = slurm.outcomes(EndedJob())
    assert [o.run_id for o in outcomes] == [cfg.run_id() for cfg in configs]
    why = "state OUT_OF_MEMORY" if ending == "out of memory" else "MemoryError: boom"
    assert {o.error for o in outcomes} == {f"SLURM job 1234 ended without a result ({why}); its log: {log}"}
