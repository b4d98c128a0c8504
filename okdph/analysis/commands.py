"""`okdph-bench pacbayes` and `okdph-bench landscape`: thin click commands over okdph.analysis
(registered in okdph/cli.py). Figures go to results/figures/analysis/ by default, where
`okdph-bench report` finds them.

    okdph-bench pacbayes results/runs/okdph-….json --write           # Table 5's value into the record
    okdph-bench pacbayes results/runs/vgg16-*.json --per-epoch         # Fig. 1
    okdph-bench landscape --ours results/runs/okdph-….json --other results/runs/dml-….json
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from okdph.analysis.options import (
    DEFAULT_EPSILON,
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_SAMPLES,
    DEFAULT_SEED,
    DEFAULT_TOLERANCE,
    DEFAULT_VARIANT,
    VARIANTS,
)
from okdph.bench.store import ResultStore

FIGURES = ResultStore("results").analysis_dir   # where `okdph-bench report` looks for them


def _device(name: str) -> str:
    from okdph.engine.run import resolve_device

    return str(resolve_device(name))


def _bounds(text: str | None):
    if text is None:
        return None
    from okdph.cli import UserError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--bounds expects x0,x1,y0,y1 (four numbers), got '{text}'")
    return values


@click.command()
@click.argument("records", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="RUN_RECORD...")
@click.option("--variant", type=click.Choice(VARIANTS), default=DEFAULT_VARIANT, show_default=True,
              help="magnitude: σ_i = α|w_i| (reproduces Table 5's scale); init: ‖w − w0‖²/(4σ²); orig: ‖w‖²/(4σ²).")
@click.option("--samples", type=int, default=DEFAULT_SAMPLES, show_default=True, help="Monte-Carlo perturbations.")
@click.option("--epsilon", type=float, default=DEFAULT_EPSILON, show_default=True,
              help="Target mean training-loss increase.")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
              help="Stop when |increase − ε| is below this.")
@click.option("--max-iterations", type=int, default=DEFAULT_MAX_ITERATIONS, show_default=True)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the noise directions.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 1024].")
@click.option("--per-epoch", is_flag=True, help="Every saved epoch, plotted against the epoch (Fig. 1).")
@click.option("--out", "out_png", default=None, type=click.Path(dir_okay=False),
              help=f"--per-epoch figure [default: {FIGURES}/pacbayes-<backbone>-<dataset>.png].")
@click.option("--write", is_flag=True, help="Store the bound in each record (metrics.pacbayes, ×10^-6).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def pacbayes(records, variant, samples, epsilon, tolerance, max_iterations, seed, device, data_root, batch_size,
             per_epoch, out_png, write, quiet, debug):
    """PAC-Bayes bound of each run's deployed student (needs `train --save-every`)."""
    from okdph.analysis import pacbayes as pb
    from okdph.cli import _user_errors
    from okdph.data.info import display_name as data_display_name
    from okdph.models import display_name as backbone_display_name
    from okdph.strategy import display_name as strategy_display_name

    series = []
    for path in records:
        started = time.perf_counter()
        record, bounds = _user_errors(lambda path=path: pb.run_bounds(
            path, variant=variant, per_epoch=per_epoch, device=_device(device), data_root=data_root,
            samples=samples, epsilon=epsilon, tolerance=tolerance, max_iterations=max_iterations, seed=seed,
            batch_size=batch_size, progress=not quiet), debug)
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
        out = Path(out_png) if out_png else FIGURES / f"pacbayes-{first['backbone']}-{first['dataset']}.png"
        title = f"{backbone_display_name(first['backbone'])}, {data_display_name(first['dataset'])}"
        path = pb.plot_per_epoch([(label, bounds) for label, bounds, _ in series], out, title=title)
        click.echo(f"wrote {path} (+ {path.with_suffix('.json').name})")


@click.command()
@click.option("--ours", required=True, type=click.Path(dir_okay=False), help="The OKDPH run record.")
@click.option("--other", "others", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A Base/DML/KDCL run record; repeat for one panel each.")
@click.option("--out", "out_png", default=None, type=click.Path(dir_okay=False),
              help=f"PNG [default: {FIGURES}/landscape-<backbone>-<dataset>.png]; the data beside it (.npz).")
@click.option("--grid-step", type=float, default=None,
              help="Grid spacing in PCA units [default: 1, finer when the trajectories span < 20].")
@click.option("--bounds", default=None, metavar="X0,X1,Y0,Y1", help="Grid bounds [default: trajectories ± 15%].")
@click.option("--fit", default="other-S1,other-S2,ours-S1", show_default=True,
              help="Trajectories the PCA is fitted on (of other-S1, other-S2, ours-S1, ours-S2).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--data-root", default="data", show_default=True, type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 1024].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors.")
def landscape(ours, others, out_png, grid_step, bounds, fit, device, data_root, batch_size, quiet, debug):
    """Loss landscape around the students' trajectories (needs `train --save-every` on both runs)."""
    import json

    from okdph.analysis import landscape as ls
    from okdph.cli import _user_errors

    grid_bounds = _bounds(bounds)

    def default_out() -> Path:
        from okdph.analysis.evaluate import load_run_trajectory

        meta = load_run_trajectory(ours)[0].meta
        return FIGURES / f"landscape-{meta['backbone']}-{meta['dataset']}.png"

    started = time.perf_counter()
    out = Path(out_png) if out_png else _user_errors(default_out, debug)
    png, data_paths = _user_errors(lambda: ls.landscape(
        ours, others, out, device=_device(device), data_root=data_root, bounds=grid_bounds, step=grid_step,
        fit=tuple(r.strip() for r in fit.split(",") if r.strip()), batch_size=batch_size, progress=not quiet),
        debug)
    for path in data_paths:
        land = ls.Landscape.load(path)
        finite = land.loss[land.done]
        click.echo(f"{path.name}: {land.loss.shape[1]} × {land.loss.shape[0]} points, step {land.info['step']:.4g}, "
                   f"loss {finite.min():.3f}-{finite.max():.3f}, PCA {json.dumps([round(e, 3) for e in land.info['explained']])}"
                   + "".join(f"; {n}" for n in land.info.get("notes", [])))
    click.echo(f"wrote {png} (+ {', '.join(p.name for p in data_paths)}) in {time.perf_counter() - started:.1f} s")
