"""Loss landscape (okdph/analysis/landscape.py): PCA against numpy, the grid's weights and loss on
a 2-parameter model with a known surface, the figure's panels, and the command on pipeline runs
(including resuming an interrupted landscape)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from okdph.analysis.evaluate import TrainImages, stacked_loss
from okdph.analysis.landscape import (
    COLORS,
    START_COLOR,
    Landscape,
    compute_landscape,
    draw,
    fit_pca,
    grid_axes,
    grid_weights,
    load_trajectories,
)
from okdph.cli import main
from okdph.data import get_info
from okdph.engine.run import RunConfig, train_run


def test_pca_coordinates_match_numpy():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(12, 6)) @ rng.normal(size=(6, 6)) + 3.0
    pca = fit_pca(torch.tensor(rows, dtype=torch.float64))
    # reference: eigenvectors of the covariance matrix, largest two, same sign convention
    centred = rows - rows.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, ::-1][:, :2].T
    for k in range(2):
        if axes[k, np.abs(axes[k]).argmax()] < 0:
            axes[k] = -axes[k]
    np.testing.assert_allclose(pca.axes.numpy(), axes, atol=1e-10)
    np.testing.assert_allclose(pca.project(torch.tensor(rows)).numpy(), centred @ axes.T, atol=1e-9)
    np.testing.assert_allclose(pca.explained, values[::-1][:2] / values.sum(), rtol=1e-9)


def test_grid_axes_are_integer_steps_covering_the_extent():
    coords = np.array([[-3.2, 1.0], [4.1, 7.5], [0.0, 2.0]])
    xs, ys, step = grid_axes(coords, step=1.0)
    assert step == 1.0 and xs[0] <= -3.2 and xs[-1] >= 4.1 and ys[0] <= 1.0 and ys[-1] >= 7.5
    np.testing.assert_allclose(xs, np.round(xs))
    np.testing.assert_allclose(np.diff(xs), 1.0)
    # default step: the paper's 1.0 unless the extent is small; then at least 21 points on the long side
    _, _, small = grid_axes(coords / 100)
    assert small < 1.0
    xs, ys, _ = grid_axes(coords, bounds=(-1, 1, 0, 2), step=0.5)
    np.testing.assert_allclose(xs, [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(ys, [0, 0.5, 1, 1.5, 2])


class TwoParameters(nn.Module):
    """logits = (a·s, b·s) with s the image's mean pixel: a 2-parameter network whose loss surface
    is known in closed form, with one BN-like buffer to check buffers are passed through."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def forward(self, x):
        s = x.mean(dim=(1, 2, 3)) + self.shift
        return torch.stack([self.a * s, self.b * s], dim=1)


def test_grid_on_a_two_parameter_model_reproduces_the_known_surface():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    targets = torch.randint(0, 2, (40,))
    data = TrainImages(images, targets, get_info("digits"))
    x = torch.cat([xb for xb, _ in data.batches()])
    s = x.mean(dim=(1, 2, 3))

    def known(a, b, shift):  # cross-entropy of logits (a·(s+shift), b·(s+shift)), by hand
        logits = torch.stack([a * (s + shift), b * (s + shift)], dim=1)
        return float(F.cross_entropy(logits, targets))

    # a 2-parameter trajectory: the PCA plane is the whole parameter space, so every grid point's
    # weights are mean + (x, y) · axes, whichever checkpoint is nearest
    trajectory = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 2.5], [1.5, 3.0]], dtype=torch.float64)
    pca = fit_pca(trajectory)
    fit_coords = pca.project(trajectory)
    xs, ys, _ = grid_axes(fit_coords.numpy(), step=0.5)
    points = torch.tensor([[gx, gy] for gy in ys for gx in xs], dtype=torch.float64)
    weights, nearest = grid_weights(points, pca, trajectory, fit_coords)
    torch.testing.assert_close(weights, pca.mean + points @ pca.axes)
    assert nearest.unique().numel() > 1  # several checkpoints are used

    shifts = torch.tensor([0.0, 0.1, -0.2, 0.3], dtype=torch.float32)  # each checkpoint's "BN buffer"
    net = TwoParameters()
    params = {"a": weights[:, 0].float(), "b": weights[:, 1].float()}
    loss, acc = stacked_loss(net, params, {"shift": shifts[nearest]}, data, stacked_buffers=True, batch_size=16,
                             chunk=7)
    expected = [known(w[0], w[1], shifts[i]) for w, i in zip(weights.float(), nearest)]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    assert ((acc >= 0) & (acc <= 100)).all()


def _fake_landscape(roles=("other-S1", "other-S2", "ours-S1", "ours-S2")) -> Landscape:
    xs, ys = np.arange(-3, 4, 1.0), np.arange(-2, 3, 1.0)
    gx, gy = np.meshgrid(xs, ys)
    loss = 0.5 + 0.1 * gx ** 2 + 0.2 * gy ** 2
    coords = {r: np.array([[k - 2.0, k * 0.5 - 1], [k - 1.0, k * 0.5], [k * 0.3, 1.0]]) for k, r in enumerate(roles)}
    return Landscape(xs, ys, loss, np.full_like(loss, 50.0), np.ones_like(loss, bool), coords,
                     {r: [0, 1, 2] for r in roles}, {r: r for r in roles},
                     {"clip": 4.0, "spacing": 0.03, "explained": [0.6, 0.3], "title": "test"})


def test_figure_has_the_expected_panels(tmp_path):
    fig = draw([_fake_landscape(), _fake_landscape(("other-S1", "ours-S1", "ours-S2"))])
    axes = fig.get_axes()
    assert len(axes) == 4                              # two panels, each with its colorbar
    panels = [ax for ax in axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and [ax.get_ylabel() for ax in axes if ax not in panels] == ["Loss", "Loss"]
    assert [len(ax.get_lines()) for ax in panels] == [4, 3]   # one line per trajectory
    assert [line.get_color() for line in panels[0].get_lines()] == [COLORS[r] for r in
                                                                    ("other-S1", "other-S2", "ours-S1", "ours-S2")]
    starts = [c for c in panels[0].collections if c.get_label() == "epoch 0"]
    assert len(starts) == 1 and len(starts[0].get_offsets()) == 4
    assert np.allclose(starts[0].get_facecolor()[0][:3], __import__("matplotlib.colors").colors.to_rgb(START_COLOR))
    path = tmp_path / "landscape.png"
    fig.savefig(path)
    assert path.stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# On pipeline runs, through the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for method in ("okdph", "dml", "base"):
        cfg = RunConfig(method=method, profile="pipeline", epochs=2, save_every=1, out_dir=str(out), device="cpu",
                        students=1 if method == "base" else 2)
        train_run(cfg, progress=False)
        paths[method] = cfg.record_path()
    return paths


def test_trajectories_in_the_official_order_and_base_has_one_student(runs):
    full = load_trajectories(runs["okdph"], runs["dml"], "cpu")
    assert [t.role for t in full.items] == ["other-S1", "other-S2", "ours-S1", "ours-S2"]
    assert all(t.epochs == [0, 1, 2] and t.rows.shape[0] == 3 for t in full.items)
    assert full.items[0].label == "DML S1" and full.items[2].label == "OKDPH S1"
    base = load_trajectories(runs["okdph"], runs["base"], "cpu")
    assert [t.role for t in base.items] == ["other-S1", "ours-S1", "ours-S2"]
    assert any("other-S2 absent" in n for n in base.notes)


@pytest.mark.slow
def test_cli_landscape_writes_png_and_data_and_resumes(runs, tmp_path):
    png = tmp_path / "land.png"
    args = ["landscape", "--ours", str(runs["okdph"]), "--other", str(runs["dml"]), "--other", str(runs["base"]),
            "--out", str(png), "--device", "cpu", "--quiet", "--bounds", "-2,2,-2,2", "--grid-step", "1"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0
    dml_data, base_data = tmp_path / "land-dml.npz", tmp_path / "land-base.npz"
    land = Landscape.load(dml_data)
    assert land.loss.shape == (5, 5) and land.done.all() and np.isfinite(land.loss).all()
    assert set(land.coords) == {"other-S1", "other-S2", "ours-S1", "ours-S2"}
    assert set(Landscape.load(base_data).coords) == {"other-S1", "ours-S1", "ours-S2"}

    # interrupted: two points lost; the rerun evaluates exactly those and gets the same values
    expected = land.loss.copy()
    land.loss[1, 3] = land.loss[4, 0] = np.nan
    land.done[1, 3] = land.done[4, 0] = False
    land.save(dml_data)
    resumed = compute_landscape(runs["okdph"], runs["dml"], dml_data, device="cpu", data_root="data",
                                bounds=(-2, 2, -2, 2), step=1.0, progress=False)
    assert resumed.done.all()
    np.testing.assert_allclose(resumed.loss, expected, rtol=1e-5)

    # a different grid does not reuse the cache
    other_grid = compute_landscape(runs["okdph"], runs["dml"], tmp_path / "x.npz", device="cpu",
                                   bounds=(-1, 1, -1, 1), step=1.0, progress=False)
    np.testing.assert_allclose(other_grid.loss, expected[1:4, 1:4], rtol=1e-5)  # same points, same losses

    bad = CliRunner().invoke(main, ["landscape", "--ours", str(runs["okdph"]), "--other", str(runs["dml"]),
                                    "--bounds", "1,2,3", "--out", str(png)])
    assert bad.exit_code == 2 and "--bounds" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_report_includes_the_analysis_figures(tmp_path):
    from okdph.bench.report import write_report
    from okdph.bench.store import ResultStore

    store = ResultStore(tmp_path)
    store.analysis_dir.mkdir(parents=True)
    draw([_fake_landscape()]).savefig(store.analysis_dir / "landscape-resnet32-cifar10.png")
    _fake_landscape().save(store.analysis_dir / "landscape-resnet32-cifar10-dml.npz")
    text = write_report(tmp_path).read_text()
    assert "## Analyses" in text
    assert "![landscape-resnet32-cifar10](figures/analysis/landscape-resnet32-cifar10.png)" in text
    assert "`landscape-resnet32-cifar10-dml.npz`" in text


@pytest.mark.parametrize("backbone", ["resnet32", "densenet40_12"])
def test_vmapped_evaluation_equals_one_network_after_another(backbone):
    # the GPU path (vmap over stacked weights and BN buffers) against the CPU path, on real backbones
    from okdph.analysis.evaluate import (
        build_network,
        flatten,
        split_state,
        trainable_names,
        unflatten,
    )

    data = TrainImages(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (8,)),
                       get_info("digits"))
    net = build_network({"backbone": backbone, "num_classes": 10, "width": 0.25}, "cpu")
    names = trainable_names(net)
    state = {k: v * (1 + 0.05 * torch.rand_like(v)) if v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    params, buffers = split_state(state, names)
    weights = flatten(params, names)[None] + 0.01 * torch.randn(3, sum(p.numel() for p in params.values()))
    stacked = {n: torch.stack([v, v * 1.1 if v.is_floating_point() else v, v]) for n, v in buffers.items()}
    vmapped = stacked_loss(net, unflatten(weights, params, names), stacked, data, stacked_buffers=True,
                           vectorize=True, chunk=2)
    looped = stacked_loss(net, unflatten(weights, params, names), stacked, data, stacked_buffers=True,
                          vectorize=False)
    torch.testing.assert_close(vmapped[0], looped[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vmapped[1], looped[1])
    assert len(set(looped[0].tolist())) == 3  # the three weight sets really differ
