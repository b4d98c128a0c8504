"""`okdph-bench`: the command line. Each command parses its options and calls one library function.

    okdph-bench train --method okdph --profile smoke            # a real run on the embedded digits
    okdph-bench train --method dml --backbone vgg16 --dataset cifar100 --data-root ~/data
    okdph-bench list
"""
from __future__ import annotations

import sys

import click

from okdph.engine.recipe import PROFILES
from okdph.strategy import FIDELITIES, ConfigError

USER_ERROR_EXIT = 2


class UserError(click.ClickException):
    """A bad input: printed as one line, exit code 2, no traceback (unless --debug)."""

    exit_code = USER_ERROR_EXIT

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _user_errors(func, debug: bool):
    from okdph.data import DataError

    try:
        return func()
    except (ConfigError, DataError) as exc:
        if debug:
            raise
        raise UserError(str(exc).splitlines()[0]) from None


def _parse_sets(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got '{item}'")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--precision", default="fp32", show_default=True, help="fp32 or bf16 (autocast; fast engine).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--deterministic", is_flag=True, help="Bitwise-repeatable CPU runs, deterministic cuDNN.")
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--download", is_flag=True, help="Download CIFAR if missing (off by default).")
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: 8 for CIFAR/ImageNet, else 0].")
@click.option("--out", "out_dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def train(method, backbone, dataset, setting, students, sets, fidelity, profile, epochs, seed, width,
          engine, precision, device, deterministic, data_root, download, workers, out_dir, quiet, debug):
    """Train one run and write its JSON record."""
    from okdph.engine.run import RunConfig, train_run

    cfg = RunConfig(method=method, backbone=backbone, dataset=dataset, setting=setting, students=students,
                    overrides=_parse_sets(sets), fidelity=fidelity, profile=profile, epochs=epochs,
                    seed=seed, width=width, engine=engine, precision=precision, deterministic=deterministic, device=device,
                    data_root=data_root, download=download, workers=workers, out_dir=out_dir)
    record = _user_errors(lambda: train_run(cfg, progress=not quiet), debug)
    paper, final = record["metrics"]["paper"], record["metrics"]["final"]
    click.echo(f"{record['status']}: {record['run_id']}")
    click.echo(f"  best (max over heads, best epoch): {paper['acc']:.2f}% ({paper['head']}, epoch {paper['epoch']})")
    click.echo(f"  final ({final['head']}, last epoch): {final['acc']:.2f}%")
    click.echo(f"  {record['timing']['wall_s']:.1f} s, {record['timing']['train_samples_per_s']:.0f} samples/s"
               f" -> {cfg.record_path()}")


@main.command(name="list")
def list_cmd():
    """Methods, backbones, datasets, settings and augmentation views."""
    from okdph import data as okdata
    from okdph.data.transforms import VIEWS
    from okdph.models import list_backbones
    from okdph.strategy import list_strategies

    click.echo("methods:   " + ", ".join(list_strategies()))
    click.echo("backbones: " + ", ".join(list_backbones()))
    click.echo("datasets:  " + ", ".join(okdata.DATASETS))
    click.echo("settings:  " + ", ".join(okdata.SETTINGS))
    click.echo("views:     " + ", ".join(VIEWS))
    click.echo("profiles:  " + ", ".join(PROFILES))
    click.echo("fidelity:  " + ", ".join(FIDELITIES))


if __name__ == "__main__":
    sys.exit(main())
