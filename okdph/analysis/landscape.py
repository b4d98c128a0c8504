"""Loss landscape around the training trajectories (OKDPH Figs. 2-5 of the supplement;
docs/protocol.md#loss-landscape, after the official experiment/landscape/grid_loss.py and draw.ipynb).

    okdph-bench train --method okdph ... --save-every 5 --out results/runs      # both runs, same setup
    okdph-bench train --method dml   ... --save-every 5 --out results/runs
    okdph-bench landscape --ours results/runs/okdph-….json --other results/runs/dml-….json

Procedure, as the official code does it:
1. Four trajectories, each the flattened trainable parameters of one student at every saved epoch,
   in the official order: other-S1, other-S2 (the Base/DML/KDCL run), ours-S1, ours-S2 (OKDPH).
   BN buffers are kept aside, never projected. A Base run has one student: its other-S2 is absent,
   and everything below uses the trajectories that exist.
2. 2-D PCA (torch SVD of the centred rows) fitted on other-S1, other-S2 and ours-S1 (ours-S2 is
   left out: it ends almost where ours-S1 does); every point is projected onto the two axes.
   Sign convention: each axis is flipped so that its largest-magnitude entry is positive.
3. A grid at integer multiples of `step` in PCA coordinates over the trajectories' extent plus a
   margin (or given bounds). Each grid point g is the fitted checkpoint c nearest to it in 2-D,
   moved by the 2-D offset along the unit axes: w = w_c + (g − p_c)_x·pc1 + (g − p_c)_y·pc2, with
   c's BN buffers. The default step is the paper's 1.0, made finer when the extent is under
   MIN_SIDE − 1 units (short runs move little).
4. Training-set cross-entropy and accuracy at every grid point: no augmentation, eval mode; many
   grid points are evaluated together (evaluate.stacked_loss). Finished points are saved in the
   data file (`<png stem>-<other method>.npz`) after every batch of points, so an interrupted
   landscape resumes where it stopped (only when the runs, fit and grid are the same).
5. Drawing (draw.ipynb): contour of the loss clipped at 4.0 (10 classes) or 6.0 (100), level
   spacing 0.03 or 0.04, coolwarm; trajectories ours-S1 indigo, ours-S2 deeppink, other-S1
   darkgreen, other-S2 darkorange; epoch-0 points crimson; one panel per other run, with a "Loss"
   colorbar. The official notebook interpolates grid and extra path points onto a 101×101 mesh
   (Delaunay); the grid here is regular, so it is contoured directly and no path points are added.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from okdph.data.info import display_name as data_display_name
from okdph.engine.record import load_record
from okdph.errors import ConfigError
from okdph.models import display_name as backbone_display_name
from okdph.strategy import display_name as strategy_display_name

ROLES = ("other-S1", "other-S2", "ours-S1", "ours-S2")   # the official row order
DEFAULT_FIT = ("other-S1", "other-S2", "ours-S1")         # grid_loss.py's rows 0:180
COLORS = {"ours-S1": "indigo", "ours-S2": "deeppink", "other-S1": "darkgreen", "other-S2": "darkorange"}
START_COLOR = "crimson"                                   # the epoch-0 points
PAPER_STEP = 1.0                                          # the official unit grid
MIN_SIDE = 21                                             # the default step never gives fewer points a side
MARGIN = 0.15                                             # bounds: extent ± this fraction of its span
MAX_POINTS = 40_000                                       # refuse larger grids (pass a larger --grid-step)
DEFAULT_POINTS_PER_SAVE = 64                              # grid points evaluated between cache writes
DATA_FORMAT = 1


def default_clip(num_classes: int) -> float:
    """Loss clip of the contour plot: 4.0 for CIFAR-10, 6.0 for CIFAR-100 (draw.ipynb)."""
    return 4.0 if num_classes <= 10 else 6.0


def default_spacing(num_classes: int) -> float:
    """Contour level spacing: 0.03 for CIFAR-10, 0.04 for CIFAR-100 (draw.ipynb)."""
    return 0.03 if num_classes <= 10 else 0.04


# --------------------------------------------------------------------------------------------------
# PCA


@dataclass
class PCA2:
    mean: Tensor      # (d,)
    axes: Tensor      # (2, d), orthonormal rows: pc1, pc2
    explained: list[float]  # fraction of the fitted rows' variance along each axis

    def project(self, rows: Tensor) -> Tensor:
        """(n, d) -> (n, 2) coordinates."""
        return (rows - self.mean) @ self.axes.T


def fit_pca(rows: Tensor) -> PCA2:
    """Two principal axes of `rows` (n, d), n >= 2, by SVD of the centred rows (sklearn's PCA
    computes the same, up to the sign of each axis; the sign is fixed here, see the docstring)."""
    if rows.shape[0] < 2:
        raise ConfigError("the PCA needs at least two fitted checkpoints; save more epochs (--save-every)")
    mean = rows.mean(dim=0)
    _, singular, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    axes = vh[:2].clone()
    if axes.shape[0] < 2:  # two rows only: one direction of variance; the second axis is any orthogonal one
        raise ConfigError("the PCA needs checkpoints spanning two directions; save more epochs (--save-every)")
    for k in range(2):
        if axes[k, axes[k].abs().argmax()] < 0:
            axes[k] = -axes[k]
    variance = singular.pow(2)
    explained = (variance[:2] / variance.sum()).tolist() if variance.sum() > 0 else [0.0, 0.0]
    return PCA2(mean, axes, explained)


# --------------------------------------------------------------------------------------------------
# Grid


def grid_axes(coords: np.ndarray, bounds: tuple[float, float, float, float] | None = None,
              step: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The grid's x and y values, integer multiples of `step`, and the step. Without `bounds`,
    the extent of `coords` (n, 2) ± MARGIN of its span; without `step`, PAPER_STEP, or finer so
    that the longer side has at least MIN_SIDE points."""
    if bounds is None:
        lo, hi = coords.min(axis=0), coords.max(axis=0)
        pad = np.maximum(MARGIN * (hi - lo), 1e-6)
        x0, y0 = lo - pad
        x1, y1 = hi + pad
    else:
        x0, x1, y0, y1 = bounds
        if not (x1 > x0 and y1 > y0):
            raise ConfigError(f"grid bounds need x0 < x1 and y0 < y1, got {bounds}")
    if step is None:
        step = min(PAPER_STEP, max(x1 - x0, y1 - y0) / (MIN_SIDE - 1))
    if not step > 0:
        raise ConfigError(f"grid step must be > 0, got {step}")
    xs = np.arange(math.floor(x0 / step), math.ceil(x1 / step) + 1) * step
    ys = np.arange(math.floor(y0 / step), math.ceil(y1 / step) + 1) * step
    if len(xs) * len(ys) > MAX_POINTS:
        raise ConfigError(f"the grid has {len(xs)} × {len(ys)} points (at most {MAX_POINTS}); "
                          f"pass a larger --grid-step or tighter --bounds")
    return xs, ys, float(step)


def grid_weights(points: Tensor, pca: PCA2, fit_rows: Tensor, fit_coords: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of grid points (P, 2): each the nearest fitted checkpoint plus the 2-D offset along
    the unit axes. Returns (P, d) weights and the (P,) index of the checkpoint used."""
    nearest = torch.cdist(points.to(fit_coords), fit_coords).argmin(dim=1)
    offset = points.to(fit_coords) - fit_coords[nearest]                    # (P, 2)
    return fit_rows[nearest] + offset @ pca.axes, nearest


# --------------------------------------------------------------------------------------------------
# Trajectories of two runs


@dataclass
class Trajectory:
    role: str                    # one of ROLES
    label: str                   # for the legend: "OKDPH S1"
    epochs: list[int]
    rows: Tensor                 # (n, d) flattened trainable parameters, one row per epoch
    buffers: list[dict]          # BN buffers of each epoch


@dataclass
class Trajectories:
    meta: dict                   # the architecture and data (from the ours run)
    names: list[str]             # trainable parameter names, in flattening order
    template: dict               # one parameter dict (shapes, for unflattening)
    runs: dict                   # role prefix ("ours", "other") -> run id
    items: list[Trajectory]
    notes: list[str] = field(default_factory=list)


_SAME = ("backbone", "num_classes", "width", "dataset", "setting", "train_size")


def load_trajectories(ours_record, other_record, device) -> Trajectories:
    """The students' trajectories of both runs, in the official order, on `device`."""
    from okdph.analysis.evaluate import (
        build_network,
        flatten,
        load_run_trajectory,
        split_state,
        trainable_names,
    )

    loaded = {"other": load_run_trajectory(other_record), "ours": load_run_trajectory(ours_record)}
    meta = loaded["ours"][0].meta
    for key in _SAME:
        if loaded["other"][0].meta.get(key) != meta.get(key):
            raise ConfigError(f"--ours and --other differ in {key} ({meta.get(key)} vs "
                              f"{loaded['other'][0].meta.get(key)}): a shared landscape needs the same setup")
    names = trainable_names(build_network(meta, "cpu"))
    items, notes, template = [], [], None
    for role in ROLES:
        prefix, student = role.split("-S")
        points = loaded[prefix]
        index = int(student) - 1
        if index >= len(points[0].students):
            notes.append(f"{role} absent: the {points[0].meta['method']} run has "
                         f"{len(points[0].students)} student(s)")
            continue
        rows, buffers = [], []
        for point in points:
            params, bufs = split_state(point.students[index], names)
            template = template or params
            rows.append(flatten(params, names))
            buffers.append({n: v.to(device) for n, v in bufs.items()})
        method = points[0].meta["method"]
        items.append(Trajectory(role, f"{strategy_display_name(method)} S{student}", [p.epoch for p in points],
                                torch.stack(rows).to(device), buffers))
    runs = {prefix: pts[0].meta.get("run_id") for prefix, pts in loaded.items()}
    return Trajectories(meta, names, template, runs, items, notes)


# --------------------------------------------------------------------------------------------------
# The landscape of one (ours, other) pair


@dataclass
class Landscape:
    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray              # (len(ys), len(xs)); NaN where not evaluated yet
    acc: np.ndarray
    done: np.ndarray              # bool, same shape
    coords: dict[str, np.ndarray]  # role -> (n, 2) projected trajectory
    epochs: dict[str, list[int]]
    labels: dict[str, str]
    info: dict                    # fingerprint, explained variance, fit, clip, spacing, title, notes

    def save(self, path) -> Path:
        """Atomically, as .npz (arrays) with `info` as a JSON string: the cache and the redraw data."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"xs": self.xs, "ys": self.ys, "loss": self.loss, "acc": self.acc, "done": self.done,
                  "info": np.array(json.dumps({**self.info, "format": DATA_FORMAT, "roles": list(self.coords),
                                               "epochs": self.epochs, "labels": self.labels}))}
        arrays.update({f"coords/{role}": c for role, c in self.coords.items()})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> Landscape:
        with np.load(Path(path), allow_pickle=False) as data:
            info = json.loads(str(data["info"]))
            if info.get("format") != DATA_FORMAT:
                raise ConfigError(f"landscape data '{path}' has format {info.get('format')}, expected {DATA_FORMAT}")
            coords = {role: data[f"coords/{role}"] for role in info["roles"]}
            return cls(data["xs"], data["ys"], data["loss"], data["acc"], data["done"].astype(bool), coords,
                       {k: list(v) for k, v in info["epochs"].items()}, info["labels"], info)


def compute_landscape(ours_record, other_record, data_path, *, device="cpu", data_root="data",
                      bounds=None, step: float | None = None, fit=DEFAULT_FIT, batch_size: int | None = None,
                      points_per_save: int = DEFAULT_POINTS_PER_SAVE, progress: bool = True) -> Landscape:
    """The loss landscape of one pair of runs, resumed from / saved to `data_path` (.npz)."""
    device = torch.device(device)
    traj = load_trajectories(ours_record, other_record, device)
    fitted = [t for t in traj.items if t.role in fit]
    unknown = [r for r in fit if r not in ROLES]
    if unknown:
        raise ConfigError(f"unknown trajectory '{unknown[0]}' to fit; valid: {', '.join(ROLES)}")
    if not fitted:
        raise ConfigError(f"none of the trajectories to fit ({', '.join(fit)}) exists")
    notes = list(traj.notes)
    if len(fitted) < len(fit):
        notes.append("PCA fitted on " + ", ".join(t.role for t in fitted))
    fit_rows = torch.cat([t.rows for t in fitted])
    fit_buffers = [b for t in fitted for b in t.buffers]
    pca = fit_pca(fit_rows)
    coords = {t.role: pca.project(t.rows).cpu().numpy().astype(np.float64) for t in traj.items}
    fit_coords = pca.project(fit_rows)
    xs, ys, step = grid_axes(np.concatenate(list(coords.values())), bounds, step)

    fingerprint = {"runs": traj.runs, "fit": [t.role for t in fitted],
                   "epochs": {t.role: t.epochs for t in traj.items}, "xs": xs.round(9).tolist(),
                   "ys": ys.round(9).tolist(), "train_size": traj.meta.get("train_size"),
                   "dataset": traj.meta.get("dataset")}
    num_classes = int(traj.meta["num_classes"])
    info = {"fingerprint": fingerprint, "step": step, "explained": pca.explained, "notes": notes,
            "clip": default_clip(num_classes), "spacing": default_spacing(num_classes), "meta": traj.meta,
            "title": _title(traj)}
    shape = (len(ys), len(xs))
    land = Landscape(xs, ys, np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, bool), coords,
                     {t.role: t.epochs for t in traj.items}, {t.role: t.label for t in traj.items}, info)
    data_path = Path(data_path)
    _resume(land, data_path, fingerprint)
    todo = [(iy, ix) for iy in range(shape[0]) for ix in range(shape[1]) if not land.done[iy, ix]]
    if todo:
        _evaluate_points(land, todo, traj, pca, fit_rows, fit_coords, fit_buffers, data_path, device=device,
                         data_root=data_root, batch_size=batch_size, points_per_save=points_per_save,
                         progress=progress)
    land.save(data_path)
    return land


def _resume(land: Landscape, data_path: Path, fingerprint: dict) -> None:
    """The points already computed into `data_path` for the same grid and runs, if any."""
    if not data_path.exists():
        return
    try:
        cached = Landscape.load(data_path)
    except (OSError, ValueError, KeyError, ConfigError):
        return  # unreadable or foreign: start again
    if cached.info.get("fingerprint") == fingerprint:
        land.loss, land.acc, land.done = cached.loss, cached.acc, cached.done


def _evaluate_points(land: Landscape, todo, traj, pca, fit_rows, fit_coords, fit_buffers, data_path: Path, *,
                     device, data_root, batch_size, points_per_save: int, progress: bool) -> None:
    """Loss and accuracy at the grid points `todo`, `points_per_save` at a time, saved after each."""
    from okdph.analysis.evaluate import build_network, load_train_images, stacked_loss, unflatten

    net = build_network(traj.meta, device)
    data = load_train_images(traj.meta, data_root, device)
    bar = tqdm(total=land.done.size, initial=int(land.done.sum()), desc="landscape", unit="pt",
               disable=not progress, leave=False)
    for start in range(0, len(todo), points_per_save):
        cells = todo[start:start + points_per_save]
        points = torch.tensor([[land.xs[ix], land.ys[iy]] for iy, ix in cells], dtype=torch.float64)
        weights, nearest = grid_weights(points, pca, fit_rows, fit_coords)
        buffers = {n: torch.stack([fit_buffers[i][n] for i in nearest.tolist()]) for n in fit_buffers[0]}
        loss, acc = stacked_loss(net, unflatten(weights, traj.template, traj.names), buffers, data,
                                 stacked_buffers=True, batch_size=batch_size)
        for (iy, ix), l_value, a_value in zip(cells, loss.tolist(), acc.tolist()):
            land.loss[iy, ix], land.acc[iy, ix], land.done[iy, ix] = l_value, a_value, True
        land.save(data_path)
        bar.update(len(cells))
    bar.close()


def _title(traj: Trajectories) -> str:
    meta = traj.meta
    others = [t.label.split(" S")[0] for t in traj.items if t.role.startswith("other")]
    return (f"{backbone_display_name(meta['backbone'])}, {data_display_name(meta['dataset'])}: "
            f"{others[0] if others else '?'} vs {strategy_display_name(meta['method'])}")


# --------------------------------------------------------------------------------------------------
# Drawing


def draw(landscapes: list[Landscape], *, clip: float | None = None, spacing: float | None = None):
    """One panel per landscape (contour, trajectories, epoch-0 points, colorbar); returns the
    matplotlib Figure (object API, no pyplot state), not yet saved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(landscapes), 4.4), dpi=120)
    for k, land in enumerate(landscapes):
        ax = fig.add_subplot(1, len(landscapes), k + 1)
        top = clip if clip is not None else land.info.get("clip", 4.0)
        gap = spacing if spacing is not None else land.info.get("spacing", 0.03)
        z = np.where(np.isfinite(land.loss), land.loss, top)
        z = np.minimum(z, top)
        low, high = float(z.min()), float(z.max())
        levels = np.arange(low, high + gap, gap)
        if not 5 <= len(levels) <= 400:   # too flat or too steep for the paper's spacing
            levels = np.linspace(low, high + 1e-9, 30)
        grid_x, grid_y = np.meshgrid(land.xs, land.ys)
        contour = ax.contour(grid_x, grid_y, z, levels=levels, cmap="coolwarm", linewidths=0.8)
        for role, xy in land.coords.items():
            ax.plot(xy[:, 0], xy[:, 1], color=COLORS[role], marker="o", markersize=2.5, linewidth=1.2,
                    label=land.labels.get(role, role))
        starts = np.array([xy[0] for role, xy in land.coords.items() if land.epochs[role][0] == 0])
        if len(starts):
            ax.scatter(starts[:, 0], starts[:, 1], color=START_COLOR, s=18, zorder=3, label="epoch 0")
        ax.set_title(land.info.get("title", ""), fontsize=9)
        explained = land.info.get("explained", [0, 0])
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}%)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}%)")
        ax.legend(fontsize=7, loc="best")
        fig.colorbar(contour, ax=ax, label="Loss")
    fig.tight_layout()
    return fig


def data_path_for(png, other_method: str) -> Path:
    png = Path(png)
    return png.with_name(f"{png.stem}-{other_method}.npz")


def landscape(ours_record, other_records, out_png, *, progress: bool = True, **options) -> tuple[Path, list[Path]]:
    """Compute (or resume) one landscape per other run and draw them side by side: the PNG at
    `out_png`, each panel's data beside it (`<stem>-<other method>.npz`)."""
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got '{out_png}'")
    lands, data_paths = [], []
    for other in other_records:
        # a damaged record is one line naming it (DamagedRecord); a missing one is named below
        method = load_record(Path(other))["method"] if Path(other).exists() else "other"
        path = data_path_for(out_png, method)
        if path in data_paths:
            path = path.with_name(f"{path.stem}-{len(data_paths)}.npz")
        lands.append(compute_landscape(ours_record, other, path, progress=progress, **options))
        data_paths.append(path)
    fig = draw(lands)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png, data_paths
