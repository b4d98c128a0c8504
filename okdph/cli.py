"""`okdph-bench`: the command line. Each command parses its options and calls one library function.

    okdph-bench train --method okdph --profile smoke            # a real run on the embedded digits
    okdph-bench train --method dml --backbone vgg16 --dataset cifar100 --data-root ~/data
    okdph-bench list                                            # names and tables; --methods: hyper-parameters
    okdph-bench runs                                            # the records of results/runs/, oldest first
    okdph-bench run --table 3 --profile smoke                   # all of supplement Table 3, minutes on CPU
    okdph-bench run --table main-cifar --gpus 0,1,2,3           # five seeds per cell, one worker per GPU
    okdph-bench run --table 4 --executor slurm --slurm slurm_partition=gpu
    okdph-bench plan --table 3 > runs.sh                        # one command per run, any scheduler
    okdph-bench table 3 --metric final                          # re-render from the records
    okdph-bench report                                          # results/REPORT.md with learning curves
    okdph-bench compare reference/table3.json results           # accuracy regressions between result sets
    okdph-bench regress                                         # tiny runs of every method vs expectations
    okdph-bench pacbayes results/runs/okdph-….json --write      # Table 5's bound into the record
    okdph-bench landscape --ours results/runs/okdph-….json --other results/runs/dml-….json

How it behaves:
- Every closed set of names (methods, backbones, datasets, tables, ...) is a `click.Choice` over
  okdph.names, and a command imports the library only when it runs: `--help` and `list` import no torch.
- Errors a user can fix (okdph.errors) are handled once, by the group: one line on stderr, exit 2.
  Every command takes `--debug`, which shows their traceback instead; a preempted run prints how to
  resume and exits 75 (PREEMPTED_EXIT).
- `--debug` and `--quiet` (no progress bar, on the commands that draw one) are declared once each and
  written after the command, as in `okdph-bench train ... --quiet --debug`.
- Every command reads and writes the results folder `results/` (train: its runs/); what can be checked
  before the first run is checked first; Ctrl-C is handled as a preemption (exit 75, how to resume).
- `list --methods` imports the methods (and torch) to show their hyper-parameters; plain `list` does not.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

import click

from okdph import names
from okdph.config import RunConfig
from okdph.analysis.options import (DEFAULT_EPSILON, DEFAULT_MAX_ITERATIONS, DEFAULT_SAMPLES, DEFAULT_SEED,
                                    DEFAULT_TOLERANCE, DEFAULT_VARIANT, VARIANTS)
from okdph.errors import PREEMPTED_EXIT, USER_ERRORS, Preempted

USER_ERROR_EXIT = 2
_DEBUG = "okdph.debug"  # ctx.meta key (meta is shared by a command's context and the group's)


class UserError(click.ClickException):
    """A bad input the command itself finds: one line, exit code 2 (as the group prints every error)."""

    exit_code = USER_ERROR_EXIT


def _remember_debug(ctx: click.Context, param, value: bool) -> None:
    ctx.meta[_DEBUG] = value


class Command(click.Command):
    """A command of the group: it takes --debug, declared here once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_remember_debug,
                                        help="Show the traceback of a user error."))


def _one_line(exc: BaseException) -> str:
    """The line of an error a user needs: the first of its message; for one raised in a DataLoader
    worker, which torch raises again with the worker's traceback in the message, the last (the
    original message, without its exception's name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return lines[0] if lines else type(exc).__name__


class Group(click.Group):
    """The `okdph-bench` group: every error a user can fix is one line on stderr and exit 2 (usage
    errors such as an unknown option or a value outside its choices too, without click's usage
    block); a preempted run is one line and exit 75."""

    command_class = Command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if ctx.meta.get(_DEBUG):
                raise
            raise UserError(_one_line(exc)) from None
        except BrokenPipeError:  # stdout closed early (`okdph-bench plan ... | head`): not an error of ours
            raise
        except OSError as exc:  # the file system said no (a folder turned read-only, a full disk): one line
            if ctx.meta.get(_DEBUG):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise UserError(f"{exc.strerror or exc}{where}; --debug shows where") from None
        except Preempted as exc:  # its checkpoint is on disk: rerunning the same command resumes
            click.echo(f"preempted: {exc}", err=True)
            ctx.exit(PREEMPTED_EXIT)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:  # bare `okdph-bench`: the help, as a request for it, not a usage error
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:  # one line: click lists a missing choice's values one per line
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort): as a preemption
            click.echo("interrupted: rerun the same command to continue (recorded runs are skipped, a run in "
                       "flight resumes from its last checkpoint)", err=True)
            sys.exit(PREEMPTED_EXIT)
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")  # nothing more to flush into the closed pipe at exit
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # --help and --version return 0


def _use_default_threads() -> None:
    """CPU threads for this process's training or analysis: okdph.threads.default_threads (never
    one per core regardless of the load: that collapses on a shared machine)."""
    import torch

    from okdph.threads import default_threads

    torch.set_num_threads(default_threads())


def _parse_sets(values: tuple[str, ...], option: str = "--set") -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option} expects key=value, got '{item}'")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite: click's FloatRange lets nan (and inf without a max)
    through, which then fails after minutes of work instead of at the command line."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


POSITIVE = FiniteFloat(min=0, min_open=True)
MAX_SEEDS = 100  # per cell (the paper averages 5): more is a typo, and 84 cells × 10^5 seeds plan for hours
AT_LEAST_ONE = click.IntRange(min=1)
MAX_PROCESSES = 1024  # --jobs and --torchrun: more processes than any one machine runs is a typo
PROCESSES = click.IntRange(1, MAX_PROCESSES)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")


def _gpu_list(ctx, param, text: str | None) -> str | None:
    """`--gpus` as written: 'all', 'cpu' or GPU indices like 0,1, checked before a dry run too."""
    from okdph.bench.executors import gpu_indices
    from okdph.errors import ConfigError

    if text is not None and text.strip().lower() not in ("all", "cpu"):
        try:
            gpu_indices(text)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).removeprefix("--gpus ")) from None
    return text


class MethodChoice(click.Choice):
    """The installed methods; where none is (a checkout run without `pip install -e .`), the one
    line that says so instead of "'dml' is not one of ."."""

    def convert(self, value, param, ctx):
        if not self.choices:
            self.fail(names.NOT_INSTALLED, param, ctx)
        return super().convert(value, param, ctx)


class DatasetChoice(click.Choice):
    """The built-in datasets in --help (read without torch); at use, every registered one
    (okdph.data.info.register_dataset), so that a dataset added in code is accepted too."""

    def convert(self, value, param, ctx):
        from okdph.data.info import dataset_names

        self.choices = dataset_names()
        return super().convert(value, param, ctx)


METHOD = MethodChoice(names.strategy_names())
TABLE = click.Choice(names.table_choices(), case_sensitive=False)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="okdph-bench")
def main():
    """Online knowledge distillation benchmark: OKDPH (CVPR 2023) and its baselines on one engine."""


def _click_type(cli: dict):
    """The click type of a RunConfig field's option (okdph.config.option's `kind` and `choices`)."""
    if cli["choices"] is not None:
        return click.Choice(cli["choices"])
    return {"str": str, "int": int, "float": FiniteFloat(), "positive": POSITIVE, "method": METHOD,
            "dataset": DatasetChoice(names.DATASETS), "seed": click.IntRange(0, 2 ** 32 - 1),
            "folder": click.Path(file_okay=False), "sets": str}[cli["kind"]]


def config_options(config_cls):
    """The options of every field of `config_cls` (a RunConfig) that declares one, in field order:
    what `okdph-bench train` takes. A field added to RunConfig appears here with no other edit."""
    def decorate(command):
        for f in reversed(dataclasses.fields(config_cls)):
            cli = f.metadata.get("cli")
            if not cli:
                continue
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            flag, multiple = cli["kind"] == "bool", cli["kind"] == "sets"
            # no default where there is none (click 8.3 counts an explicit None as one)
            default = {} if required or multiple else {"default": f.default}
            shown = default.get("default") not in (None, False)
            command = click.option(*cli["flags"], f.name, required=required, is_flag=flag, multiple=multiple,
                                   type=None if flag else _click_type(cli), metavar=cli["metavar"],
                                   show_default=shown, help=cli["help"] or None, **default)(command)
        return command
    return decorate


def config_from_options(config_cls, options: dict):
    """`config_cls` from the parsed options of `config_options` (popped from `options`)."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli") and f.name in options:
            value = options.pop(f.name)
            values[f.name] = _parse_sets(value) if f.metadata["cli"]["kind"] == "sets" else value
    return config_cls(**values)


@main.command()
@config_options(RunConfig)
@click.option("--force", is_flag=True, help="Train again even if this run's record exists (it is replaced).")
@click.option("--skip-recorded", is_flag=True,
              help="For schedulers: also exit 0 when another worker holds the run (a recorded run is always skipped).")
@quiet_option
def train(force, skip_recorded, quiet, **options):
    """Train one run and write its JSON record; a run already recorded is skipped (--force trains it again)."""
    from okdph.engine.distributed import is_main_process
    from okdph.engine.lock import RunLocked
    from okdph.engine.record import read_record
    from okdph.engine.run import AlreadyRecorded, is_done, train_run
    from okdph.errors import DamagedRecord

    cfg = config_from_options(RunConfig, options)
    _use_default_threads()
    skip = not force
    if skip and is_done(cfg):
        click.echo(f"recorded: {cfg.record_path()} exists, nothing to do (--force trains the run again)")
        return
    if cfg.record_path().exists():
        try:
            read_record(cfg.record_path(), cfg.run_id())
        except DamagedRecord as exc:  # trained again; train_run sets the file aside, never deletes it
            click.echo(f"warning: {exc}; training the run again, the file is kept as "
                       f"{cfg.record_path().name}.corrupt", err=True)
    try:
        record = train_run(cfg, progress=not quiet, skip_recorded=skip)
    except AlreadyRecorded:
        click.echo(f"recorded: {cfg.record_path()} (by another worker meanwhile)")
        return
    except RunLocked as exc:  # another live worker trains it: nothing to do with --skip-recorded
        if skip_recorded:
            click.echo(f"held elsewhere: {exc}")
            return
        raise UserError(f"{exc}; it is being trained elsewhere") from None
    if cfg.ddp and not is_main_process():
        return
    paper, final = record["metrics"]["paper"], record["metrics"]["final"]
    click.echo(f"{record['status']}: {record['run_id']}")
    click.echo(f"  best (max over heads, best epoch): {paper['acc']:.2f}% ({paper['head']}, epoch {paper['epoch']})")
    click.echo(f"  final ({final['head']}, last epoch): {final['acc']:.2f}%")
    click.echo(f"  {record['timing']['wall_s']:.1f} s, {record['timing']['train_samples_per_s']:.0f} samples/s"
               f" -> {cfg.record_path()}")


@main.command(name="list")
@click.option("--methods", "show_methods", is_flag=True,
              help="Each method's hyper-parameters and their defaults (imports the methods, hence torch: seconds).")
def list_cmd(show_methods):
    """Methods, backbones, datasets, settings, views, profiles, fidelities and tables (no torch);
    with --methods, each method's hyper-parameters with their defaults."""
    if not names.strategy_names():
        raise UserError(names.NOT_INSTALLED)
    if show_methods:
        from okdph.strategy import config_to_dict, display_name, get_strategy

        for name in names.strategy_names():
            try:
                params = config_to_dict(get_strategy(name).Config())
            except Exception as exc:  # a third-party method that does not import: its line says why
                click.echo(f"{name}: unavailable ({(str(exc).splitlines() or [type(exc).__name__])[0]})")
                continue
            click.echo(f"{name} ({display_name(name)}): "
                       + (", ".join(f"{k}={v}" for k, v in params.items()) or "no hyper-parameters"))
        click.echo("change one with: okdph-bench train --method NAME --set KEY=VALUE")
        return
    click.echo("methods:   " + ", ".join(names.strategy_names()) + "  (hyper-parameters: list --methods)")
    click.echo("backbones: " + ", ".join(names.BACKBONES))
    click.echo("datasets:  " + ", ".join(names.DATASETS))
    click.echo("settings:  " + ", ".join(names.SETTINGS))
    click.echo("views:     " + ", ".join(names.VIEWS))
    click.echo("profiles:  " + ", ".join(names.PROFILES))
    click.echo("fidelity:  " + ", ".join(names.FIDELITIES))
    click.echo("tables:")
    for table_id, aliases in names.table_names().items():
        known_as = f" ({', '.join(aliases)})" if aliases else ""
        click.echo(f"  {table_id}{known_as}: {names.table_titles()[table_id]}")


# --------------------------------------------------------------------------------------------------
# The benchmark harness (okdph.bench): paper tables as data, runs, tables, report, regression check

_TABLE_HELP = ("A table of okdph/bench/tables/, by its id or an alias, any case: "
               + ", ".join(" = ".join((t, *aliases)) for t, aliases in names.table_names().items()) + ".")
_METRIC_HELP = "paper: best epoch, max over heads (as published); final: deployed head, last epoch."
# Options several commands share, declared once.
results_option = click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False),
                              help="The results folder (runs/, tables/, figures/).")
data_root_option = click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))


def methods_option(what: str = ""):
    """--method, repeatable: only that method's cells or runs."""
    what = f"Only this method's {what}" if what else "Only this method"
    return click.option("--method", "methods", type=METHOD, multiple=True, help=f"{what}; repeatable.")


std_option = click.option("--std", type=click.Choice(names.STD_CONVENTIONS), default=names.DEFAULT_STD,
                          show_default=True, help="The std a table shows: sample (n - 1) or population (n, as the "
                                                  "official logs print it); the CSV/JSON hold both.")


def _store(results: str, *, existing: bool = False):
    """The result store of a --results folder, naming each damaged record it meets on stderr (once).
    `existing`: for commands that only read it, a missing folder is an error ("0 runs" or an empty
    report would read as an empty folder, not a mistyped one)."""
    from okdph.bench.store import ResultStore

    store = ResultStore(results, report=lambda line: click.echo(f"warning: {line}", err=True))
    if existing and not store.root.is_dir():
        store.check_folder()  # a file where a folder should be says so
        raise UserError(f"results folder '{store.root}' does not exist")
    return store


def _seed_list(ctx, param, text: str | None) -> list[int] | None:
    """`--seed-list 42,43,50` -> [42, 43, 50]."""
    if text is None:
        return None
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise click.BadParameter(f"expects seeds like 42,43, got '{text}'")
    return seeds


def _seeds(count: int | None, listed: list[int] | None):
    """What run and plan pass on as `seeds`: the count, or the explicit list."""
    if count is not None and listed is not None:
        raise UserError("pass --seeds (a count from 42) or --seed-list (the seeds), not both")
    return listed if listed is not None else count


seed_list_option = click.option("--seed-list", "seed_list", callback=_seed_list, metavar="S,S,...",
                                help="Exactly these seeds per cell, e.g. 42,43 (instead of --seeds).")


def sweep_options(command):
    """--table, --profile, --seeds and --seed-list, declared once for `run` and `plan`: which runs
    a table sweep takes."""
    options = [
        click.option("--table", "table_name", required=True, type=TABLE, metavar="ID", help=_TABLE_HELP),
        click.option("--profile", type=click.Choice(names.PROFILES), default="paper", show_default=True),
        click.option("--seeds", type=click.IntRange(1, MAX_SEEDS), default=None,
                     help=f"Runs per cell, seeds 42, 43, … (at most {MAX_SEEDS}) [default: 5; smoke 1]."),
        seed_list_option,
    ]
    for option in reversed(options):  # as stacked decorators apply them: the first listed shows first
        command = option(command)
    return command


def _parse_params(values: tuple[str, ...]) -> dict:
    """`--slurm key=value` pairs for submitit; numbers become ints."""
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in _parse_sets(values, "--slurm")}


@main.command()
@sweep_options
@click.option("--executor", type=click.Choice(names.EXECUTORS), default="local", show_default=True)
@click.option("--gpus", default=None, callback=_gpu_list,
              help="local: GPUs to use, e.g. 0,1 (one worker each), 'all' or 'cpu' [default: all visible, else CPU].")
@click.option("--jobs", type=PROCESSES, default=None,
              help="local, CPU: worker processes (1: in this process), each with the free cores / N threads "
                   "(OMP_NUM_THREADS sets them instead) [default: one per free core, one thread each].")
@methods_option("cells")
@click.option("--fidelity", type=click.Choice(names.FIDELITIES), default="official", show_default=True)
@click.option("--engine", type=click.Choice(names.ENGINES), default="auto", show_default=True)
@click.option("--metric", type=click.Choice(names.METRICS), default="paper", show_default=True, help=_METRIC_HELP)
@click.option("--dry-run", is_flag=True, help="List the runs still to do; train nothing.")
@results_option
@data_root_option
@click.option("--download", is_flag=True, help="Download CIFAR if missing.")
@click.option("--pack", type=int, default=None,
              help="Train up to N seeds of a cell as one pack on the fast engine (one process, one step); "
                   "slurm: also the runs per job [default: no packing; slurm jobs of one cell's seeds].")
@click.option("--slurm", "slurm_params", multiple=True, metavar="KEY=VALUE",
              help="slurm: a submitit parameter, e.g. slurm_partition=gpu or timeout_min=720; repeatable.")
@click.option("--wait", is_flag=True, help="slurm: wait for the jobs, then write the table.")
@std_option
@quiet_option
def run(table_name, profile, seeds, seed_list, executor, gpus, jobs, methods, fidelity, engine, metric, dry_run,
        results, data_root, download, pack, slurm_params, wait, std, quiet):
    """Run a paper table: every cell × seed not yet recorded, then results/tables/<ID>.md (+ .csv, .json)."""
    from okdph.bench.runner import Execution, TableChoices, run_table

    choices = TableChoices.of(table_name, profile=profile, fidelity=fidelity, engine=engine, metric=metric, std=std)
    execution = Execution(executor, gpus=gpus, jobs=jobs, pack_size=pack, slurm_parameters=_parse_params(slurm_params),
                          wait=wait, data_root=data_root, download=download, progress=not quiet, dry_run=dry_run)
    summary = run_table(choices, execution, seeds=_seeds(seeds, seed_list), methods=methods, results=_store(results))
    click.echo(f"{summary.table} ({summary.profile}): {summary.cells} cells, {summary.runs} runs, "
               f"{summary.recorded} already recorded, {len(summary.pending)} to train")
    if dry_run:
        click.echo("\n".join(summary.pending))
        return
    if summary.jobs:
        click.echo(f"submitted {len(summary.jobs)} jobs: {', '.join(summary.jobs)}")
        if not wait:
            click.echo(f"when they finish: okdph-bench table {table_name} --profile {profile}")
            return
    analysed = f", {summary.analysed} bounds computed" if summary.analysed else ""
    click.echo(f"trained {summary.trained} runs, {len(summary.skipped)} left to other workers, "
               f"{len(summary.failed)} failed{analysed}, {summary.seconds:.0f} s")
    if summary.markdown:
        click.echo("\n" + summary.markdown)
        click.echo("wrote " + ", ".join(str(p) for p in summary.outputs.values()))
    for run_id, error in summary.failed:
        click.echo(f"failed: {run_id}: {error}", err=True)
    if summary.failed:
        raise SystemExit(1)


@main.command(epilog=f"ID: {_TABLE_HELP}")
@click.argument("table_name", type=TABLE, metavar="ID")
@click.option("--profile", type=click.Choice(names.PROFILES), default=None,
              help="[default: paper, or else the first profile with records of this table]")
@click.option("--fidelity", type=click.Choice(names.FIDELITIES), default="official", show_default=True)
@click.option("--engine", type=click.Choice([e for e in names.ENGINES if e != "auto"]), default=None,
              help="Only this engine's records (needed where a cell has several).")
@click.option("--metric", type=click.Choice(names.METRICS), default="paper", show_default=True, help=_METRIC_HELP)
@results_option
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the .md, .csv and .json [default: <results>/tables].")
@std_option
def table(table_name, profile, fidelity, engine, metric, results, out_dir, std):
    """Re-render a table from the records (nothing is trained)."""
    from okdph.bench.runner import TableChoices, default_profile, render_table

    store = _store(results)
    if profile is None:
        profile = default_profile(table_name, fidelity=fidelity, results=store)
        if profile != "paper":  # say so: the table shown is not the paper profile's
            click.echo(f"profile {profile}: the first with records of this table (--profile to choose)", err=True)
    choices = TableChoices.of(table_name, profile=profile, fidelity=fidelity, engine=engine, metric=metric, std=std)
    paths, text = render_table(choices, results=store, out_dir=out_dir)
    click.echo(text)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command()
@sweep_options
@methods_option("cells")
@click.option("--fidelity", type=click.Choice(names.FIDELITIES), default="official", show_default=True)
@click.option("--engine", type=click.Choice(names.ENGINES), default="auto", show_default=True)
@results_option
@data_root_option
@click.option("--download", is_flag=True, help="Download CIFAR if missing.")
@click.option("--torchrun", "ddp_procs", type=PROCESSES, default=None, metavar="N",
              help="Wrap each command in torchrun with N processes (--ddp), for ImageNet.")
@click.option("--all", "include_recorded", is_flag=True, help="Also the runs already recorded.")
def plan(table_name, profile, seeds, seed_list, methods, fidelity, engine, results, data_root, download, ddp_procs,
         include_recorded):
    """Print one self-contained `okdph-bench train` command per run, for any scheduler."""
    from okdph.bench.runner import Execution, TableChoices, plan_table

    commands = plan_table(TableChoices.of(table_name, profile=profile, fidelity=fidelity, engine=engine),
                          Execution(data_root=data_root, download=download, ddp_procs=ddp_procs),
                          seeds=_seeds(seeds, seed_list), methods=methods, results=_store(results),
                          include_recorded=include_recorded)
    click.echo(f"# {len(commands)} runs of table {table_name} ({profile}); each skips itself once recorded")
    click.echo("\n".join(commands))


@main.command()
@results_option
@click.option("--metric", type=click.Choice(names.METRICS), default="paper", show_default=True, help=_METRIC_HELP)
@std_option
def report(results, metric, std):
    """Write results/REPORT.md: every table that has records, drawn as a figure too, with a learning-curve
    PNG per cell."""
    from okdph.bench.report import write_report

    click.echo(f"wrote {write_report(_store(results, existing=True), metric=metric, std=std)}")


@main.command()
@click.argument("baseline", metavar="BASELINE")
@click.argument("candidate", metavar="CANDIDATE")
@click.option("--table", "table_name", type=TABLE, default=None, metavar="ID",
              help="Only this table [default: every table the two sides share].")
@click.option("--metric", type=click.Choice(names.METRICS), default="paper", show_default=True, help=_METRIC_HELP)
@click.option("--alpha", type=float, default=names.COMPARE_ALPHA, show_default=True,
              help="Significance level of Welch's two-sided t-test per cell.")
@click.option("--min-effect", type=float, default=names.COMPARE_MIN_EFFECT, show_default=True,
              help="Smallest change of a mean, in points, that can be a regression or an improvement.")
@click.option("--max-drop", type=float, default=names.SINGLE_SEED_MAX_DROP, show_default=True,
              help="A cell with one run on a side (no test possible) regressed when worse by more than this many "
                   "points; calibrated on the smoke table (docs/protocol.md#one-run-per-cell).")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the Markdown report there.")
def compare(baseline, candidate, table_name, metric, alpha, min_effect, max_drop, out_path):
    """Compare two result sets cell by cell (each a results folder or a table JSON); exit 1 if a cell regressed.

    BASELINE is the reference (e.g. a committed table JSON under results/reference/), CANDIDATE the new results."""
    from okdph.bench.compare import compare as compare_results

    result = compare_results(baseline, candidate, table=table_name, metric=metric, alpha=alpha,
                             min_effect=min_effect, max_drop=max_drop)
    text = result.markdown()
    if out_path:  # before printing: a path that cannot be written is one line, not a report and a line
        try:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(text)
        except OSError as exc:
            raise UserError(f"cannot write --out {out_path}: {exc.strerror or exc}") from None
    click.echo(text)
    if out_path:
        click.echo(f"wrote {out_path}")
    click.echo(result.summary())
    if result.regressed:
        raise SystemExit(1)


def _age(created: str, now) -> str:
    from datetime import datetime

    try:
        seconds = (now - datetime.fromisoformat(created)).total_seconds()
    except (TypeError, ValueError):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return "now"


@main.command()
@results_option
@methods_option("runs")
@click.option("--profile", "profiles", type=click.Choice(names.PROFILES), multiple=True,
              help="Only this profile's runs; repeatable.")
@click.option("--ids", is_flag=True, help="Each run's id (its record's file name) instead of its cell.")
def runs(results, methods, profiles, ids):
    """The runs of a results folder, oldest first: method, cell, seed, status, accuracy, age."""
    from datetime import datetime, timezone

    from tabulate import tabulate

    store = _store(results, existing=True)
    rows = [r for r in store.listing() if (not methods or r["method"] in methods)
            and (not profiles or r["profile"] in profiles)]
    now = datetime.now(timezone.utc)
    bounds = any(r["pacbayes"] is not None for r in rows)

    def number(value) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [[r["method"], r["run_id"] if ids else r["cell"], "" if r["seed"] is None else r["seed"], r["status"],
              number(r["paper"]), number(r["final"]),
              *([number(r["pacbayes"]) + (" (not converged)" if r["converged"] is False else "")] if bounds else []),
              _age(r["created"], now)] for r in rows]
    headers = ["method", "run" if ids else "cell", "seed", "status", "paper", "final",
               *(["pac-bayes"] if bounds else []), "age"]
    if lines:
        click.echo(tabulate(lines, headers=headers, tablefmt="simple", disable_numparse=True))
    counts = {}
    for r in rows:
        key = "diverged" if r["status"].startswith("diverged") else r["status"]
        counts[key] = counts.get(key, 0) + 1
    click.echo(f"{len(rows)} runs in {store.runs_dir}" + (": " + ", ".join(f"{n} {s}" for s, n in counts.items())
                                                         if counts else ""))


@main.command()
@click.option("--update", is_flag=True, help="Rewrite the expectations from this run (on purpose only).")
@click.option("--expected", default="results/regression/expected.json", show_default=True,
              type=click.Path(dir_okay=False))
@methods_option()
def regress(update, expected, methods):
    """Tiny deterministic CPU runs of every registered method on digits, compared with the expectations."""
    from okdph.bench.regress import regress as run_regress

    result = run_regress(expected, update=update, methods=methods or None)
    for line in result.lines:
        click.echo(line)
    if not result.ok:
        raise SystemExit(1)


# --------------------------------------------------------------------------------------------------
# Generalization analyses (okdph.analysis): PAC-Bayes bound and loss landscape. Figures go to
# results/figures/analysis/ by default, where `okdph-bench report` finds them.

_FIGURES_HELP = "results/figures/analysis"  # ResultStore("results").analysis_dir, spelt out for --help


def _figures_dir() -> Path:
    from okdph.bench.store import ResultStore

    return ResultStore("results").analysis_dir


def _device(name: str) -> str:
    from okdph.engine.run import resolve_device

    return str(resolve_device(name))


def _bounds(text: str | None):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--bounds expects x0,x1,y0,y1 (four numbers), got '{text}'")
    return values


@main.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="RUN_RECORD...")
@click.option("--variant", type=click.Choice(VARIANTS), default=DEFAULT_VARIANT, show_default=True,
              help="magnitude: σ_i = α|w_i| (reproduces Table 5's scale); init: ‖w − w0‖²/(4σ²); "
                   "orig: ‖w‖²/(4σ²).")
@click.option("--samples", type=AT_LEAST_ONE, default=DEFAULT_SAMPLES, show_default=True,
              help="Monte-Carlo perturbations.")
@click.option("--epsilon", type=POSITIVE, default=DEFAULT_EPSILON, show_default=True,
              help="Target mean training-loss increase.")
@click.option("--tolerance", type=POSITIVE, default=DEFAULT_TOLERANCE, show_default=True,
              help="Stop when |increase − ε| is below this.")
@click.option("--max-iterations", type=AT_LEAST_ONE, default=DEFAULT_MAX_ITERATIONS, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULT_SEED, show_default=True,
              help="Seed of the noise directions.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@data_root_option
@click.option("--batch-size", type=AT_LEAST_ONE, default=None,
              help="Images per forward pass [default: 1024 on a GPU, 128 on the CPU].")
@click.option("--per-epoch", is_flag=True, help="Every saved epoch, plotted against the epoch (Fig. 1).")
@click.option("--out", "out_png", default=None, type=click.Path(dir_okay=False),
              help=f"--per-epoch figure [default: {_FIGURES_HELP}/pacbayes-<backbone>-<dataset>.png].")
@click.option("--write", is_flag=True, help="Store the bound in each record (metrics.pacbayes, ×10^-6).")
@quiet_option
def pacbayes(records, variant, samples, epsilon, tolerance, max_iterations, seed, device, data_root, batch_size,
             per_epoch, out_png, write, quiet):
    """PAC-Bayes bound of each run's deployed student (needs `train --save-every`)."""
    from okdph.analysis import pacbayes as pb
    from okdph.data.info import display_name as data_display_name
    from okdph.engine.record import load_record
    from okdph.models import display_name as backbone_display_name
    from okdph.strategy import display_name as strategy_display_name

    for path in records:  # a damaged record is one line before the first bound is computed
        if Path(path).is_file():
            load_record(path)
    _use_default_threads()
    series = []
    for path in records:
        started = time.perf_counter()
        record, bounds = pb.run_bounds(
            path, variant=variant, per_epoch=per_epoch, device=_device(device), data_root=data_root,
            samples=samples, epsilon=epsilon, tolerance=tolerance, max_iterations=max_iterations, seed=seed,
            batch_size=batch_size, progress=not quiet)
        seconds = time.perf_counter() - started
        for b in bounds if per_epoch else bounds[-1:]:
            r = b.result
            flag = "" if r.converged else f" (not converged: Δloss {r.loss_increase:.4f})"
            click.echo(f"{record['run_id']} epoch {b.epoch}: bound {r.value:.4f} ×10^6 ({variant}, "
                       f"{r.scale_name} {r.scale:.5g}, KL {r.kl_term:.4g} + log {r.log_term:.2f}, "
                       f"d {r.num_params}, {r.iterations} steps){flag}")
        if write:
            pb.write_bound(path, record, bounds, student=pb.deployed_student(record), seconds=seconds)
            click.echo(f"  wrote metrics.pacbayes to {path} ({seconds:.1f} s)")
        series.append((f"{strategy_display_name(record['method'])} seed {record.get('seed')}", bounds, record))
    if per_epoch:
        first = series[0][2]
        out = Path(out_png) if out_png else _figures_dir() / f"pacbayes-{first['backbone']}-{first['dataset']}.png"
        title = f"{backbone_display_name(first['backbone'])}, {data_display_name(first['dataset'])}"
        path = pb.plot_per_epoch([(label, bounds) for label, bounds, _ in series], out, title=title)
        click.echo(f"wrote {path} (+ {path.with_suffix('.json').name})")


@main.command()
@click.option("--ours", required=True, type=click.Path(dir_okay=False), help="The OKDPH run record.")
@click.option("--other", "others", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A Base/DML/KDCL run record; repeat for one panel each.")
@click.option("--out", "out_png", default=None, type=click.Path(dir_okay=False),
              help=f"PNG [default: {_FIGURES_HELP}/landscape-<backbone>-<dataset>.png]; the data beside it (.npz).")
@click.option("--grid-step", type=POSITIVE, default=None,
              help="Grid spacing in PCA units [default: 1, finer when the trajectories span < 20].")
@click.option("--bounds", default=None, metavar="X0,X1,Y0,Y1", help="Grid bounds [default: trajectories ± 15%].")
@click.option("--fit", default="other-S1,other-S2,ours-S1", show_default=True,
              help="Trajectories the PCA is fitted on (of other-S1, other-S2, ours-S1, ours-S2).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@data_root_option
@click.option("--batch-size", type=AT_LEAST_ONE, default=None,
              help="Images per forward pass [default: 1024 on a GPU, 128 on the CPU].")
@quiet_option
def landscape(ours, others, out_png, grid_step, bounds, fit, device, data_root, batch_size, quiet):
    """Loss landscape around the students' trajectories (needs `train --save-every` on both runs)."""
    import json

    from okdph.analysis import landscape as ls
    from okdph.analysis.evaluate import load_run_trajectory

    grid_bounds = _bounds(bounds)
    _use_default_threads()
    started = time.perf_counter()
    if out_png:
        out = Path(out_png)
    else:
        meta = load_run_trajectory(ours)[0].meta
        out = _figures_dir() / f"landscape-{meta['backbone']}-{meta['dataset']}.png"
    png, data_paths = ls.landscape(
        ours, others, out, device=_device(device), data_root=data_root, bounds=grid_bounds, step=grid_step,
        fit=tuple(r.strip() for r in fit.split(",") if r.strip()), batch_size=batch_size, progress=not quiet)
    for path in data_paths:
        land = ls.Landscape.load(path)
        finite = land.loss[land.done]
        click.echo(f"{path.name}: {land.loss.shape[1]} × {land.loss.shape[0]} points, step {land.info['step']:.4g}, "
                   f"loss {finite.min():.3f}-{finite.max():.3f}, "
                   f"PCA {json.dumps([round(e, 3) for e in land.info['explained']])}"
                   + "".join(f"; {n}" for n in land.info.get("notes", [])))
    click.echo(f"wrote {png} (+ {', '.join(p.name for p in data_paths)}) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
