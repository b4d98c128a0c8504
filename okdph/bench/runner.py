"""`okdph-bench run --table ID`: expand a table into runs, skip those already recorded, train the
rest on an executor, and render the table from the records (docs/architecture.md#data-flow-of-one-table).

    run_table("3", profile="smoke")            # the README's first command
    render_table("3", profile="smoke")         # `okdph-bench table 3 --profile smoke`
    plan_table("3", profile="paper")           # one shell command per run, for any scheduler
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from okdph.bench import executors
from okdph.bench.experiments import Table, expand, get_table, unique_configs
from okdph.bench.render import check_metric, collect, write_table
from okdph.bench.stats import check_std
from okdph.bench.store import ResultStore
from okdph.engine.checkpoint import trajectory_dir
from okdph.engine.recipe import resolve_recipe, stand_in_dataset
from okdph.engine.run import RunConfig, validate
from okdph.errors import ConfigError
from okdph.names import DEFAULT_STD, EXECUTORS
from okdph.threads import default_threads

# Metrics computed after training (Table 5's PAC-Bayes bound): a table whose metric is one of these
# trains its runs with trajectory points (`save_every` = the run's epochs: the initialisation and
# the final weights) and, once trained, computes the metric into every record that lacks it.
ANALYSED_METRICS = ("pacbayes",)
# The embedded-data profiles (smoke, pipeline) stop the σ search within 1e-2 of ε (Jiang et al. 2020's
# tolerance, about half the steps) instead of the default 1e-4, after at most 15 loss evaluations
# (barely trained networks often have no clean crossing); the record says which was used.
EMBEDDED_SEARCH = {"tolerance": 1e-2, "max_iterations": 15}


@dataclass
class RunSummary:
    table: str
    profile: str
    cells: int
    runs: int                                    # distinct runs of the expansion
    recorded: int                                # skipped: their record already existed
    pending: list[str] = field(default_factory=list)   # run ids still to train (dry run)
    trained: int = 0
    analysed: int = 0                            # records that got their analysed metric (Table 5)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, one-line error)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run id, why): another worker had it
    damaged: list[str] = field(default_factory=list)   # damaged records found: not counted, trained again
    jobs: list[str] = field(default_factory=list)      # SLURM job ids
    outputs: dict[str, Path] = field(default_factory=dict)
    markdown: str = ""
    seconds: float = 0.0


def _plan(table_name: str, *, profile: str, seeds, methods, fidelity: str, engine: str, results,
          data_root: str, download: bool) -> tuple[Table, list, list[RunConfig], ResultStore]:
    table = get_table(table_name)
    store = ResultStore.of(results)
    runs = expand(table, profile=profile, seeds=seeds, methods=methods, fidelity=fidelity, engine=engine,
                  data_root=data_root, download=download, out_dir=str(store.runs_dir))
    configs = unique_configs(runs)
    for cfg in configs:  # every name and value checked before any work starts
        validate(cfg)
    if table.metric in ANALYSED_METRICS:  # keep the weights the analysis needs: init and last epoch
        configs = [replace(cfg, save_every=resolve_recipe(cfg.profile, cfg.resolved_dataset(), cfg.epochs,
                                                          cfg.backbone).epochs)
                   for cfg in configs]
    return table, runs, configs, store


def _record(cfg: RunConfig) -> dict | None:
    try:
        return json.loads(cfg.record_path().read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _needs_analysis(cfg: RunConfig, metric: str) -> bool:
    record = _record(cfg)
    return (record is not None and record.get("status") == "complete"
            and (record.get("metrics") or {}).get(metric) is None)


def _must_train(cfg: RunConfig, store: ResultStore, metric: str) -> bool:
    """Not recorded yet; or, for an analysed metric, recorded without the metric and without the
    trajectory to compute it (e.g. trained by another table): trained again, with trajectory."""
    if not store.is_recorded(cfg):
        return True
    return (metric in ANALYSED_METRICS and _needs_analysis(cfg, metric)
            and not trajectory_dir(cfg.record_path()).is_dir())


def _analyse(configs: list[RunConfig], metric: str, *, device: str, data_root: str, progress: bool,
             cpu_threads: int | None = None) -> tuple[int, list[tuple[str, str]]]:
    """Compute `metric` into every complete record of `configs` that lacks it; (done, failed). On
    the CPU with `cpu_threads` threads: those of all the training workers, which are done by now."""
    import torch

    from okdph.analysis.pacbayes import compute_and_write

    todo = [cfg for cfg in configs if _needs_analysis(cfg, metric)]
    done, failed = 0, []
    threads = torch.get_num_threads()
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        for cfg in todo:
            try:
                options = EMBEDDED_SEARCH if stand_in_dataset(cfg.profile) else {}
                compute_and_write(cfg.record_path(), device=device, data_root=data_root, progress=progress,
                                  **options)
                done += 1
            except Exception as exc:  # one run's failure must not stop the others; the summary lists it
                failed.append((cfg.run_id(), f"{metric}: {type(exc).__name__}: {str(exc).strip()[:200]}"))
    finally:
        torch.set_num_threads(threads)
    return done, failed


def check_before_run(store: ResultStore, configs: list[RunConfig], *, slurm: bool = False) -> None:
    """What every run of a table needs, checked once before the first one trains: the results
    folder takes records and tables (and SLURM's logs), and the data of `configs` is there. One
    ConfigError/DataError line otherwise, and nothing written; not once per run, after minutes."""
    from okdph.data import check_files

    store.check_writable(store.runs_dir, store.tables_dir, *([store.root / "slurm"] if slurm else []))
    for dataset, root, download in sorted({(c.resolved_dataset(), str(c.data_root), c.download) for c in configs}):
        check_files(dataset, root, download)


def run_table(table_name: str, *, profile: str = "paper", seeds: int | list[int] | None = None, methods=None,
              fidelity: str = "official", engine: str = "auto", executor: str = "local",
              gpus: str | None = None, jobs: int | None = 1, dry_run: bool = False, metric: str = "paper",
              results="results",
              data_root: str = "data", download: bool = False, progress: bool = True,
              pack_size: int | None = None, slurm_parameters: dict | None = None, slurm_cluster: str | None = None,
              wait: bool = False, std: str = DEFAULT_STD) -> RunSummary:
    """Train every run of a table that has no record yet, then write results/tables/<stem>.md|csv|json.

    executor "local": in this process on CPU or one GPU, one worker process per GPU with several
    (`gpus`), or `jobs` CPU worker processes; with `pack_size` > 1 that many seeds of a cell train as
    one pack on the fast engine (okdph.engine.packed). "slurm": one submitit job per `pack_size` runs
    (default: one cell's seeds, one after another; packed when `pack_size` is given), rendered when
    `wait` (else later with `okdph-bench table`). `std`: the std convention the table shows."""
    started = time.perf_counter()
    check_metric(metric)
    check_std(std)
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}'; valid: {', '.join(EXECUTORS)}")
    if pack_size is not None and pack_size < 1:
        raise ConfigError(f"--pack must be >= 1 run, got {pack_size}")
    if executor != "slurm" and (slurm_parameters or wait):  # would be ignored without a word
        raise ConfigError(f"{'--slurm' if slurm_parameters else '--wait'} applies to --executor slurm only; "
                          "add --executor slurm or drop it")
    if executor == "slurm" and not dry_run:  # SLURM reachable, or one line before any work
        from okdph.bench import slurm

        slurm.check_available(slurm_cluster)
    table, runs, configs, store = _plan(table_name, profile=profile, seeds=seeds, methods=methods,
                                        fidelity=fidelity, engine=engine, results=results,
                                        data_root=data_root, download=download)
    seeds_per_cell = max(1, len(runs) // max(1, len({r.cell for r in runs})))
    if executor == "local" and pack_size is not None and pack_size > 1 and seeds_per_cell < 2:  # else ignored
        raise ConfigError(f"--pack {pack_size} trains a cell's seeds as one pack, but each cell here has one seed; "
                          "add --seeds N or drop --pack")
    pending = [cfg for cfg in configs if _must_train(cfg, store, table.metric)]
    summary = RunSummary(table.id, profile, len({r.cell for r in runs}), len(configs),
                         len(configs) - len(pending), pending=[c.run_id() for c in pending],
                         damaged=[str(path) for path in store.damaged])
    if dry_run:
        summary.seconds = time.perf_counter() - started
        return summary
    analysed = [cfg for cfg in configs if table.metric in ANALYSED_METRICS and cfg not in pending
                and _needs_analysis(cfg, table.metric)]
    check_before_run(store, pending + analysed, slurm=executor == "slurm")

    if executor == "local":
        import torch

        devices = executors.parse_gpus(gpus, torch.cuda.device_count(), jobs)
        # read before training: afterwards the load average still counts the workers for a minute
        cpu_threads = len(devices) * default_threads(len(devices))
        outcomes = executors.run_local(pending, devices, progress=progress, desc=table.id, pack_size=pack_size or 1)
        summary.trained = sum(o.error is None and o.skipped is None for o in outcomes)
        summary.skipped = [(o.run_id, o.skipped) for o in outcomes if o.skipped]
        summary.failed = [(o.run_id, o.error) for o in outcomes if o.error]
        if table.metric in ANALYSED_METRICS:
            summary.analysed, failed = _analyse(configs, table.metric, device=devices[0], data_root=data_root,
                                                progress=progress, cpu_threads=cpu_threads)
            summary.failed += failed
    elif pending:
        from okdph.bench import slurm

        submitted = slurm.submit(pending, folder=store.root / "slurm", pack_size=pack_size or seeds_per_cell,
                                 packed=pack_size is not None and pack_size > 1,
                                 parameters=slurm_parameters, cluster=slurm_cluster)
        summary.jobs = [job.job_id for job in submitted]
        if not wait:
            summary.seconds = time.perf_counter() - started
            return summary
        for job in submitted:
            for outcome in job.result():
                if outcome.error:
                    summary.failed.append((outcome.run_id, outcome.error))
                elif outcome.skipped:
                    summary.skipped.append((outcome.run_id, outcome.skipped))
                else:
                    summary.trained += 1
        if table.metric in ANALYSED_METRICS:  # here, after the jobs: on this machine's first GPU or CPU
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            summary.analysed, failed = _analyse(configs, table.metric, device=device, data_root=data_root,
                                                progress=progress)
            summary.failed += failed

    store.refresh()
    cells = collect(table, store, profile=profile, fidelity=fidelity, metric=metric, std=std)
    if any(r.recorded for r in cells):  # every run failed: no table of empty cells
        try:
            summary.outputs, summary.markdown = _write(table, store, cells, profile=profile, fidelity=fidelity,
                                                       metric=metric)
        except OSError as exc:  # the records are on disk: say so, or the line reads as if all was lost
            where = f" ({exc.filename})" if exc.filename else ""
            raise OSError(exc.errno, f"{exc.strerror or exc}{where}; the table was not written, but the "
                          f"{summary.trained} runs trained now are recorded in {store.runs_dir} "
                          "(`okdph-bench table` renders them)") from exc
    summary.seconds = time.perf_counter() - started
    return summary


def _write(table: Table, store: ResultStore, results, *, profile: str, fidelity: str,
           metric: str, out_dir=None) -> tuple[dict[str, Path], str]:
    paths = write_table(table, results, out_dir or store.tables_dir, profile=profile, fidelity=fidelity,
                        metric=metric, runs_dir=store.runs_dir)
    return paths, paths["md"].read_text()


def profiles_with_records(table: Table, store: ResultStore, fidelity: str = "official") -> list[str]:
    """The profiles (in PROFILES order) under which some cell of `table` has a record."""
    from okdph.names import PROFILES

    return [p for p in PROFILES if p in table.profiles
            and any(r.recorded for r in collect_any_engine(table, store, profile=p, fidelity=fidelity))]


def collect_any_engine(table: Table, store: ResultStore, **options) -> list:
    """`collect`, or for a table whose cells mix engines, every engine's records (only counted)."""
    try:
        return collect(table, store, **options)
    except ConfigError:
        return [r for engine in sorted({r.get("engine") for r in store.records()})
                for r in collect(table, store, engine=engine, **options)]


def default_profile(table_name: str, *, fidelity: str = "official", results="results") -> str:
    """The profile `okdph-bench table` renders when none is given: paper if it has records, else
    the first profile (quick, smoke) that has; paper when none has (render_table then says so)."""
    recorded = profiles_with_records(get_table(table_name), ResultStore.of(results), fidelity)
    return recorded[0] if recorded else "paper"


def render_table(table_name: str, *, profile: str = "paper", fidelity: str = "official", metric: str = "paper",
                 engine: str | None = None, results="results", out_dir=None, std: str = DEFAULT_STD
                 ) -> tuple[dict[str, Path], str]:
    """Re-render a table from the records, training nothing, into `out_dir` (default: the results
    folder's tables/); returns the paths and the Markdown. No records for the profile:
    ConfigError naming the profiles that have some, nothing written."""
    store = ResultStore.of(results)
    table = get_table(table_name)
    out_dir = Path(out_dir) if out_dir is not None else store.tables_dir
    store.check_writable(out_dir)
    results_ = collect(table, store, profile=profile, fidelity=fidelity, engine=engine, metric=metric, std=std)
    if not any(r.recorded for r in results_):
        recorded = profiles_with_records(table, store, fidelity)
        where = (f"records exist for profile {', '.join(recorded)} (pass --profile {recorded[0]})" if recorded
                 else f"train some with okdph-bench run --table {table.aliases[0] if table.aliases else table.id}")
        raise ConfigError(f"no records of {table.id} for profile '{profile}', fidelity '{fidelity}' in "
                          f"{store.runs_dir}; {where}")
    return _write(table, store, results_, profile=profile, fidelity=fidelity, metric=metric, out_dir=out_dir)


def plan_table(table_name: str, *, profile: str = "paper", seeds: int | list[int] | None = None, methods=None,
               fidelity: str = "official", engine: str = "auto", results="results", data_root: str = "data",
               download: bool = False, ddp_procs: int | None = None, include_recorded: bool = False) -> list[str]:
    """One self-contained `okdph-bench train` command per run not yet recorded (all with
    `include_recorded`), for any scheduler; each command skips its run if the record exists."""
    table, runs, configs, store = _plan(table_name, profile=profile, seeds=seeds, methods=methods,
                                        fidelity=fidelity, engine=engine, results=results,
                                        data_root=data_root, download=download)
    return [executors.train_command(cfg, ddp_procs=ddp_procs) for cfg in configs
            if include_recorded or not store.is_recorded(cfg)]


__all__ = ["EXECUTORS", "RunSummary", "default_profile", "plan_table", "render_table", "run_table"]
