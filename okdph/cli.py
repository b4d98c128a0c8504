"""`okdph-bench`: the command line. Each command parses its options and calls one library function.

    okdph-bench train --method okdph --profile smoke            # a real run on the embedded digits
    okdph-bench train --method dml --backbone vgg16 --dataset cifar100 --data-root ~/data
    okdph-bench list
    okdph-bench run --table 3 --profile smoke                   # all of supplement Table 3, minutes on CPU
    okdph-bench run --table main-cifar --gpus 0,1,2,3           # five seeds per cell, one worker per GPU
    okdph-bench run --table 4 --executor slurm --slurm slurm_partition=gpu
    okdph-bench plan --table 3 > runs.sh                        # one command per run, any scheduler
    okdph-bench table 3 --metric final                          # re-render from the records
    okdph-bench report                                          # results/REPORT.md with learning curves
    okdph-bench regress                                         # tiny runs of every method vs expectations
"""
from __future__ import annotations

import sys

import click

from okdph.errors import PREEMPTED_EXIT, ConfigError, DataError, Preempted
from okdph.names import FIDELITIES, PROFILES

USER_ERROR_EXIT = 2


class UserError(click.ClickException):
    """A bad input: printed as one line, exit code 2, no traceback (unless --debug)."""

    exit_code = USER_ERROR_EXIT

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _user_errors(func, debug: bool):
    """Run `func`; a user error becomes one line and exit 2 (the traceback only with --debug), a
    preempted run one line and exit 75 (its checkpoint is on disk: rerun the same command)."""
    try:
        return func()
    except (ConfigError, DataError) as exc:
        if debug:
            raise
        raise UserError(str(exc).splitlines()[0]) from None
    except Preempted as exc:
        click.echo(f"preempted: {exc}", err=True)
        sys.exit(PREEMPTED_EXIT)


def _parse_sets(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got '{item}'")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


class _OneLineErrors(click.Group):
    """Usage errors (a missing or unknown option, a value that is not one of the choices) are one
    line and exit 2, like every other user error; click's own layout adds the usage and a hint."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # --help and --version return 0


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="okdph-bench")
def main():
    """Online knowledge distillation benchmark: OKDPH (CVPR 2023) and its baselines on one engine."""


@main.command()
@click.option("--method", required=True, help="Strategy name (see `okdph-bench list`).")
@click.option("--backbone", default="resnet32", show_default=True)
@click.option("--dataset", default=None, help="cifar10, cifar100, digits, synthetic10, synthetic100, imagenet "
              "[default: digits with --profile smoke]")
@click.option("--setting", default="standard", show_default=True, help="standard, noisy, limited10, limited1")
@click.option("--students", "--branches", "students", default=2, show_default=True, type=int,
              help="Students, or branches for the multi-branch methods.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Hyper-parameter override, repeatable.")
@click.option("--fidelity", type=click.Choice(FIDELITIES), default="official", show_default=True)
@click.option("--profile", type=click.Choice(PROFILES), default="paper", show_default=True)
@click.option("--epochs", type=int, default=None, help="Override the profile's epochs (milestones scale).")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--width", type=float, default=None, help="Channel multiplier [default: 1, smoke 0.25].")
@click.option("--engine", default="auto", show_default=True, help="auto (fast on CUDA), reference or fast.")
@click.option("--precision", default="fp32", show_default=True, help="fp32; bf16 (autocast, fast engine); fp64 (reference engine: exact CPU checks).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--deterministic", is_flag=True, help="Bitwise-repeatable CPU runs, deterministic cuDNN.")
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--download", is_flag=True, help="Download CIFAR if missing (off by default).")
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: 8 for CIFAR/ImageNet, else 0].")
@click.option("--train-samples", type=int, default=None, metavar="N",
              help="Train on the first N training images [default: all; the smoke profile's cut].")
@click.option("--out", "out_dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--skip-recorded", is_flag=True, help="Do nothing if this run's record already exists.")
@click.option("--save-every", type=int, default=None, metavar="E",
              help="Keep the students' weights every E epochs in <out>/<run>.traj/ (PAC-Bayes, landscape).")
@click.option("--checkpoint-every", type=int, default=1, show_default=True, metavar="E",
              help="Resume checkpoint every E epochs (0: never); a rerun of the same command resumes.")
@click.option("--ddp", is_flag=True, help="One process of a torchrun job: data-parallel over its processes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def train(method, backbone, dataset, setting, students, sets, fidelity, profile, epochs, seed, width,
          engine, precision, device, deterministic, data_root, download, workers, train_samples, out_dir,
          skip_recorded, save_every, checkpoint_every, ddp, quiet, debug):
    """Train one run and write its JSON record."""
    from okdph.engine.distributed import is_main_process
    from okdph.engine.run import AlreadyRecorded, RunConfig, is_done, train_run

    cfg = RunConfig(method=method, backbone=backbone, dataset=dataset, setting=setting, students=students,
                    overrides=_parse_sets(sets), fidelity=fidelity, profile=profile, epochs=epochs,
                    seed=seed, width=width, engine=engine, precision=precision, deterministic=deterministic, device=device,
                    data_root=data_root, download=download, workers=workers, train_samples=train_samples,
                    out_dir=out_dir, ddp=ddp,
                    save_every=save_every, checkpoint_every=checkpoint_every)
    from okdph.engine.lock import RunLocked

    if skip_recorded and _user_errors(lambda: is_done(cfg), debug):
        click.echo(f"recorded: {cfg.record_path()}")
        return
    try:
        record = _user_errors(lambda: train_run(cfg, progress=not quiet, skip_recorded=skip_recorded), debug)
    except AlreadyRecorded:
        click.echo(f"recorded: {cfg.record_path()}")
        return
    except RunLocked as exc:  # another live worker trains it: nothing to do with --skip-recorded
        if skip_recorded:
            click.echo(f"held elsewhere: {exc}")
            return
        raise UserError(f"{exc}; it is being trained elsewhere") from None
    if ddp and not is_main_process():
        return
    paper, final = record["metrics"]["paper"], record["metrics"]["final"]
    click.echo(f"{record['status']}: {record['run_id']}")
    click.echo(f"  best (max over heads, best epoch): {paper['acc']:.2f}% ({paper['head']}, epoch {paper['epoch']})")
    click.echo(f"  final ({final['head']}, last epoch): {final['acc']:.2f}%")
    click.echo(f"  {record['timing']['wall_s']:.1f} s, {record['timing']['train_samples_per_s']:.0f} samples/s"
               f" -> {cfg.record_path()}")


@main.command(name="list")
def list_cmd():
    """Methods, backbones, datasets, settings and augmentation views."""
    from okdph import names
    from okdph.models import list_backbones
    from okdph.strategy import list_strategies

    click.echo("methods:   " + ", ".join(list_strategies()))
    click.echo("backbones: " + ", ".join(list_backbones()))
    click.echo("datasets:  " + ", ".join(names.DATASETS))
    click.echo("settings:  " + ", ".join(names.SETTINGS))
    click.echo("views:     " + ", ".join(names.VIEWS))
    click.echo("profiles:  " + ", ".join(PROFILES))
    click.echo("fidelity:  " + ", ".join(FIDELITIES))


# --------------------------------------------------------------------------------------------------
# The benchmark harness (okdph.bench): paper tables as data, runs, tables, report, regression check

_TABLE_HELP = "3, 4, 5, main-cifar, main-imagenet or main-noisy-limited."
_METRIC_HELP = "paper: best epoch, max over heads (as published); final: deployed head, last epoch."


def _parse_params(values: tuple[str, ...]) -> dict:
    """`--slurm key=value` pairs for submitit; numbers become ints."""
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in _parse_sets(values)}


@main.command()
@click.option("--table", "table_name", required=True, help=_TABLE_HELP)
@click.option("--profile", default="paper", show_default=True, help="paper, quick or smoke.")
@click.option("--seeds", type=int, default=None, help="Runs per cell, seeds 42, 43, … [default: 5; smoke 1].")
@click.option("--executor", default="local", show_default=True, help="local or slurm.")
@click.option("--gpus", default=None, help="local: GPUs to use, e.g. 0,1 (one worker each), 'all' or 'cpu' "
              "[default: all visible, else CPU].")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="local, CPU: worker processes of one thread each (1: in this process).")
@click.option("--method", "methods", multiple=True, help="Only this method's cells; repeatable.")
@click.option("--fidelity", type=click.Choice(FIDELITIES), default="official", show_default=True)
@click.option("--engine", default="auto", show_default=True, help="auto, reference or fast.")
@click.option("--metric", default="paper", show_default=True, help=_METRIC_HELP)
@click.option("--dry-run", is_flag=True, help="List the runs still to do; train nothing.")
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--download", is_flag=True, help="Download CIFAR if missing.")
@click.option("--pack", type=int, default=None,
              help="Train up to N seeds of a cell as one pack on the fast engine (one process, one step); "
                   "slurm: also the runs per job [default: no packing; slurm jobs of one cell's seeds].")
@click.option("--slurm", "slurm_params", multiple=True, metavar="KEY=VALUE",
              help="slurm: a submitit parameter, e.g. slurm_partition=gpu or timeout_min=720; repeatable.")
@click.option("--wait", is_flag=True, help="slurm: wait for the jobs, then write the table.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def run(table_name, profile, seeds, executor, gpus, jobs, methods, fidelity, engine, metric, dry_run, results,
        data_root, download, pack, slurm_params, wait, quiet, debug):
    """Run a paper table: every cell × seed not yet recorded, then results/tables/<ID>.md (+ .csv, .json)."""
    from okdph.bench.runner import run_table

    summary = _user_errors(lambda: run_table(
        table_name, profile=profile, seeds=seeds, methods=methods, fidelity=fidelity, engine=engine,
        executor=executor, gpus=gpus, jobs=jobs, dry_run=dry_run, metric=metric, results=results, data_root=data_root,
        download=download, progress=not quiet, pack_size=pack, slurm_parameters=_parse_params(slurm_params),
        wait=wait), debug)
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


@main.command()
@click.argument("table_name", metavar="ID")
@click.option("--profile", default="paper", show_default=True, help="paper, quick or smoke.")
@click.option("--fidelity", type=click.Choice(FIDELITIES), default="official", show_default=True)
@click.option("--engine", default=None, help="Only this engine's records (needed where a cell has several).")
@click.option("--metric", default="paper", show_default=True, help=_METRIC_HELP)
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def table(table_name, profile, fidelity, engine, metric, results, debug):
    """Re-render table ID from the records (nothing is trained)."""
    from okdph.bench.runner import render_table

    paths, text = _user_errors(lambda: render_table(table_name, profile=profile, fidelity=fidelity, metric=metric,
                                                    engine=engine, results=results), debug)
    click.echo(text)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command()
@click.option("--table", "table_name", required=True, help=_TABLE_HELP)
@click.option("--profile", default="paper", show_default=True, help="paper, quick or smoke.")
@click.option("--seeds", type=int, default=None, help="Runs per cell [default: 5; smoke 1].")
@click.option("--method", "methods", multiple=True, help="Only this method's cells; repeatable.")
@click.option("--fidelity", type=click.Choice(FIDELITIES), default="official", show_default=True)
@click.option("--engine", default="auto", show_default=True, help="auto, reference or fast.")
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--download", is_flag=True, help="Download CIFAR if missing.")
@click.option("--torchrun", "ddp_procs", type=int, default=None, metavar="N",
              help="Wrap each command in torchrun with N processes (--ddp), for ImageNet.")
@click.option("--all", "include_recorded", is_flag=True, help="Also the runs already recorded.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def plan(table_name, profile, seeds, methods, fidelity, engine, results, data_root, download, ddp_procs,
         include_recorded, debug):
    """Print one self-contained `okdph-bench train` command per run, for any scheduler."""
    from okdph.bench.runner import plan_table

    commands = _user_errors(lambda: plan_table(
        table_name, profile=profile, seeds=seeds, methods=methods, fidelity=fidelity, engine=engine,
        results=results, data_root=data_root, download=download, ddp_procs=ddp_procs,
        include_recorded=include_recorded), debug)
    click.echo(f"# {len(commands)} runs of table {table_name} ({profile}); each skips itself once recorded")
    click.echo("\n".join(commands))


@main.command()
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--metric", default="paper", show_default=True, help=_METRIC_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def report(results, metric, debug):
    """Write results/REPORT.md: every table that has records, with a learning-curve PNG per cell."""
    from okdph.bench.report import write_report

    path = _user_errors(lambda: write_report(results, metric=metric), debug)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--update", is_flag=True, help="Rewrite the expectations from this run (on purpose only).")
@click.option("--expected", default="results/regression/expected.json", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--method", "methods", multiple=True, help="Only this method; repeatable.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def regress(update, expected, methods, debug):
    """Tiny deterministic CPU runs of every registered method on digits, compared with the expectations."""
    from okdph.bench.regress import regress as run_regress

    result = _user_errors(lambda: run_regress(expected, update=update, methods=methods or None), debug)
    for line in result.lines:
        click.echo(line)
    if not result.ok:
        raise SystemExit(1)


# Generalization analyses (okdph/analysis): PAC-Bayes bound and loss landscape
from okdph.analysis.commands import landscape as _landscape_cmd, pacbayes as _pacbayes_cmd  # noqa: E402

main.add_command(_pacbayes_cmd)
main.add_command(_landscape_cmd)


if __name__ == "__main__":
    main()
