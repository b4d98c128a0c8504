"""`okdph-bench run --table ID`: expand a table into runs, skip those already recorded, train the
rest on an executor, and render the table from the records (docs/architecture.md#data-flow-of-one-table).

    smoke = TableChoices.of("3", profile="smoke")
    run_table(smoke, Execution(jobs=2))        # the README's first command
    render_table(smoke)                        # `okdph-bench table 3 --profile smoke`
    plan_table(TableChoices.of("3"))           # one shell command per run, for any scheduler
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from okdph.bench import executors
from okdph.bench.choices import Execution, TableChoices
from okdph.bench.experiments import Table, expand, get_table, unique_configs
from okdph.bench.render import collect, write_table
from okdph.bench.store import ResultStore
from okdph.engine.checkpoint import trajectory_dir
from okdph.engine.recipe import resolve_recipe, stand_in_dataset
from okdph.engine.run import RunConfig, validate
from okdph.errors import ConfigError
from okdph.names import EXECUTORS
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


def _plan(choices: TableChoices, execution: Execution, *, seeds, methods, results
          ) -> tuple[list, list[RunConfig], ResultStore]:
    store = ResultStore.of(results)
    runs = expand(choices.table, profile=choices.profile, seeds=seeds, methods=methods, fidelity=choices.fidelity,
                  engine=choices.engine or "auto", data_root=execution.data_root, download=execution.download,
                  out_dir=str(store.runs_dir))
    configs = unique_configs(runs)
    for cfg in configs:  # every name and value checked before any work starts
        validate(cfg)
    if choices.table.metric in ANALYSED_METRICS:  # keep the weights the analysis needs: init and last epoch
        configs = [replace(cfg, save_every=resolve_recipe(cfg.profile, cfg.resolved_dataset(), cfg.epochs,
                                                          cfg.backbone).epochs)
                   for cfg in configs]
    return runs, configs, store


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


def run_table(choices: TableChoices, execution: Execution = Execution(), *, seeds: int | list[int] | None = None,
              methods=None, results="results") -> RunSummary:
    """Train every run of a table that has no record yet (`seeds` per cell, of `methods`, default
    all), then write <results>/tables/<stem>.md|csv|json. SLURM runs are rendered when
    `execution.wait` (else later with `okdph-bench table`)."""
    started = time.perf_counter()
    if execution.executor == "slurm" and not execution.dry_run:  # SLURM reachable, or one line before any work
        from okdph.bench import slurm

        slurm.check_available(execution.slurm_cluster)
    table = choices.table
    runs, configs, store = _plan(choices, execution, seeds=seeds, methods=methods, results=results)
    seeds_per_cell = max(1, len(runs) // max(1, len({r.cell for r in runs})))
    if execution.executor == "local" and execution.packed and seeds_per_cell < 2:  # else ignored
        raise ConfigError(f"--pack {execution.pack_size} trains a cell's seeds as one pack, but each cell here has "
                          "one seed; add --seeds N or drop --pack")
    pending = [cfg for cfg in configs if _must_train(cfg, store, table.metric)]
    summary = RunSummary(table.id, choices.profile, len({r.cell for r in runs}), len(configs),
                         len(configs) - len(pending), pending=[c.run_id() for c in pending],
                         damaged=[str(path) for path in store.damaged])
    if execution.dry_run:
        summary.seconds = time.perf_counter() - started
        return summary
    analysed = [cfg for cfg in configs if table.metric in ANALYSED_METRICS and cfg not in pending
                and _needs_analysis(cfg, table.metric)]
    check_before_run(store, pending + analysed, slurm=execution.executor == "slurm")
    train = _train_local if execution.executor == "local" else _train_on_slurm
    if not train(pending, configs, table, execution, summary, store, seeds_per_cell):
        summary.seconds = time.perf_counter() - started  # submitted, not waited for
        return summary
    store.refresh()
    cells = collect(choices, store)
    if any(r.recorded for r in cells):  # every run failed: no table of empty cells
        try:
            summary.outputs, summary.markdown = _write(choices, store, cells)
        except OSError as exc:  # the records are on disk: say so, or the line reads as if all was lost
            where = f" ({exc.filename})" if exc.filename else ""
            raise OSError(exc.errno, f"{exc.strerror or exc}{where}; the table was not written, but the "
                          f"{summary.trained} runs trained now are recorded in {store.runs_dir} "
                          "(`okdph-bench table` renders them)") from exc
    summary.seconds = time.perf_counter() - started
    return summary


def _train_local(pending, configs, table, execution: Execution, summary: RunSummary, *_) -> bool:
    """Train `pending` here (worker processes, GPUs, packs), then compute an analysed metric."""
    import torch

    devices = executors.parse_gpus(execution.gpus, torch.cuda.device_count(), execution.jobs)
    # read before training: afterwards the load average still counts the workers for a minute
    cpu_threads = len(devices) * default_threads(len(devices))
    outcomes = executors.run_local(pending, devices, progress=execution.progress, desc=table.id,
                                   pack_size=execution.pack_size or 1)
    summary.trained = sum(o.error is None and o.skipped is None for o in outcomes)
    summary.skipped = [(o.run_id, o.skipped) for o in outcomes if o.skipped]
    summary.failed = [(o.run_id, o.error) for o in outcomes if o.error]
    if table.metric in ANALYSED_METRICS:
        summary.analysed, failed = _analyse(configs, table.metric, device=devices[0], data_root=execution.data_root,
                                            progress=execution.progress, cpu_threads=cpu_threads)
        summary.failed += failed
    return True


def _train_on_slurm(pending, configs, table, execution: Execution, summary: RunSummary, store: ResultStore,
                    seeds_per_cell: int) -> bool:
    """Submit `pending` as SLURM jobs; with `wait`, collect their outcomes and compute an analysed
    metric here. False when the jobs were submitted and not waited for (nothing to render yet)."""
    if not pending:
        return True
    from okdph.bench import slurm

    submitted = slurm.submit(pending, folder=store.root / "slurm", pack_size=execution.pack_size or seeds_per_cell,
                             packed=execution.packed, parameters=execution.slurm_parameters or None,
                             cluster=execution.slurm_cluster)
    summary.jobs = [job.job_id for job in submitted]
    if not execution.wait:
        return False
    for job in submitted:
        for outcome in slurm.outcomes(job):
            if outcome.error:
                summary.failed.append((outcome.run_id, outcome.error))
            elif outcome.skipped:
                summary.skipped.append((outcome.run_id, outcome.skipped))
            else:
                summary.trained += 1
    if table.metric in ANALYSED_METRICS:  # here, after the jobs: on this machine's first GPU or CPU
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        summary.analysed, failed = _analyse(configs, table.metric, device=device, data_root=execution.data_root,
                                            progress=execution.progress)
        summary.failed += failed
    return True


def _write(choices: TableChoices, store: ResultStore, results, out_dir=None) -> tuple[dict[str, Path], str]:
    paths = write_table(choices, results, out_dir or store.tables_dir, runs_dir=store.runs_dir)
    return paths, paths["md"].read_text()


def profiles_with_records(table: Table, store: ResultStore, fidelity: str = "official") -> list[str]:
    """The profiles (in PROFILES order) under which some cell of `table` has a record."""
    from okdph.names import PROFILES

    return [p for p in PROFILES if p in table.profiles
            and any(r.recorded for r in collect_any_engine(TableChoices(table, p, fidelity, engine=None), store))]


def collect_any_engine(choices: TableChoices, store: ResultStore) -> list:
    """`collect`, or for a table whose cells mix engines, every engine's records (only counted)."""
    try:
        return collect(choices, store)
    except ConfigError:
        return [r for engine in sorted({r.get("engine") for r in store.records()})
                for r in collect(replace(choices, engine=engine), store)]


def default_profile(table_name: str, *, fidelity: str = "official", results="results") -> str:
    """The profile `okdph-bench table` renders when none is given: paper if it has records, else
    the first profile (quick, smoke) that has; paper when none has (render_table then says so)."""
    recorded = profiles_with_records(get_table(table_name), ResultStore.of(results), fidelity)
    return recorded[0] if recorded else "paper"


def render_table(choices: TableChoices, *, results="results", out_dir=None) -> tuple[dict[str, Path], str]:
    """Re-render a table from the records, training nothing, into `out_dir` (default: the results
    folder's tables/); returns the paths and the Markdown. No records for the profile:
    ConfigError naming the profiles that have some, nothing written."""
    store = ResultStore.of(results)
    table = choices.table
    out_dir = Path(out_dir) if out_dir is not None else store.tables_dir
    store.check_writable(out_dir)
    results_ = collect(choices, store)
    if not any(r.recorded for r in results_):
        recorded = profiles_with_records(table, store, choices.fidelity)
        where = (f"records exist for profile {', '.join(recorded)} (pass --profile {recorded[0]})" if recorded
                 else f"train some with okdph-bench run --table {table.aliases[0] if table.aliases else table.id}")
        raise ConfigError(f"no records of {table.id} for profile '{choices.profile}', fidelity '{choices.fidelity}' "
                          f"in {store.runs_dir}; {where}")
    return _write(choices, store, results_, out_dir=out_dir)


def plan_table(choices: TableChoices, execution: Execution = Execution(), *, seeds: int | list[int] | None = None,
               methods=None, results="results", include_recorded: bool = False) -> list[str]:
    """One self-contained `okdph-bench train` command per run not yet recorded (all with
    `include_recorded`), for any scheduler; each command skips its run if the record exists."""
    _, configs, store = _plan(choices, execution, seeds=seeds, methods=methods, results=results)
    return [executors.train_command(cfg, ddp_procs=execution.ddp_procs) for cfg in configs
            if include_recorded or not store.is_recorded(cfg)]


__all__ = ["EXECUTORS", "Execution", "RunSummary", "TableChoices", "default_profile", "plan_table", "render_table",
           "run_table"]
