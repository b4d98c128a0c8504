"""PAC-Bayes bound (okdph/analysis/pacbayes.py): the σ search on losses with a closed form, the
bound's terms by hand, the magnitude-aware variant's scaling, and the command on a pipeline run."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from okdph.analysis.pacbayes import (
    DEFAULT_DELTA,
    kl_term,
    log_term,
    pacbayes_bound,
    search_scale,
)
from okdph.cli import main


def quadratic(optimum: torch.Tensor, curvature: torch.Tensor):
    """L(w) = ½ Σ_i h_i (w_i − w*_i)², evaluated on K stacked weight vectors (K, d) -> (K,)."""
    def loss_of(stack: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((stack - optimum) ** 2 * curvature).sum(dim=1)
    return loss_of


def same_directions(seed: int, samples: int, d: int) -> torch.Tensor:
    """The standard-normal directions pacbayes_bound draws (CPU generator, seeded, float32)."""
    return torch.randn(samples, d, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("variant", ["orig", "init", "magnitude"])
def test_search_finds_the_closed_form_sigma_of_a_quadratic(variant):
    # At the minimum of L, E[L(w + u)] − L(w) = ½ Σ_i h_i s_i² with s_i the noise std: σ (absolute) or
    # α|w_i| (magnitude). Over the K directions actually drawn, the mean increase is exactly
    # ½ s² · mean_k Σ_i h_i c_i² z_ki², with c_i = 1 or |w_i|, so the scale is known in closed form.
    d, samples, eps = 3000, 10, 0.1
    w = torch.randn(d, dtype=torch.float64) + 0.5
    h = torch.rand(d, dtype=torch.float64) + 0.5
    result = pacbayes_bound(w, quadratic(w, h), m=1000, init=torch.zeros(d, dtype=torch.float64), variant=variant,
                            samples=samples, epsilon=eps, tolerance=1e-6, max_iterations=80, seed=3)
    c2 = w ** 2 if variant == "magnitude" else torch.ones(d, dtype=torch.float64)
    z = same_directions(3, samples, d)
    drawn = float((h * c2 * z ** 2).sum(dim=1).mean())
    assert result.converged
    assert result.scale == pytest.approx(math.sqrt(2 * eps / drawn), rel=1e-5)
    # and the expectation over the noise (mean z² = 1): a 10-sample estimate, within a few %
    assert result.scale == pytest.approx(math.sqrt(2 * eps / float((h * c2).sum())), rel=0.03)
    assert result.loss == pytest.approx(0.0, abs=1e-12)
    assert result.loss_increase == pytest.approx(eps, abs=1e-6)


def test_search_brackets_downwards_and_reports_no_convergence():
    # increase = s²: ε = 0.01 at s = 0.1, below the start 0.5 (so the search must come down)
    found = search_scale(lambda s: s * s, epsilon=0.01, tolerance=1e-8, max_iterations=100, start=0.5,
                         resolution=1e-12)
    assert found.converged and found.scale == pytest.approx(0.1, rel=1e-5)
    few = search_scale(lambda s: s * s, epsilon=0.01, tolerance=1e-8, max_iterations=2, start=0.5)
    assert not few.converged and few.iterations == 2
    # a diverged network (NaN loss) counts as above ε: the search still comes down to it
    nan_above = search_scale(lambda s: float("nan") if s > 1 else s, epsilon=0.3, tolerance=1e-6,
                             max_iterations=100, start=4.0)
    assert nan_above.converged and nan_above.scale == pytest.approx(0.3, rel=1e-4)


def test_plain_search_doubles_then_bisects():
    # guided=False is the baseline the guided search is measured against: 0.01, doubled until the
    # increase passes ε, then the midpoint of the bracket
    found = search_scale(lambda s: 0.1 * (s / 0.05) ** 2, epsilon=0.1, tolerance=1e-3, guided=False)
    assert [round(s, 6) for s, _ in found.history[:6]] == [0.01, 0.02, 0.04, 0.08, 0.06, 0.05]
    assert found.converged and found.iterations == 6


def test_guided_search_is_exact_in_few_steps_on_a_power_law():
    # from one side, the quadratic guess; across ε, the log-log secant, exact for c·s^p
    for power in (1.0, 2.0, 3.0):
        found = search_scale(lambda s, p=power: 0.1 * (s / 0.034) ** p, epsilon=0.1, tolerance=1e-9)
        assert found.converged and found.iterations <= 4, (power, found.history)
        assert found.scale == pytest.approx(0.034, rel=1e-7)


@settings(max_examples=300, deadline=None)
@given(crossing=st.floats(1e-4, 1e3), low_power=st.floats(0.5, 5.0), high_power=st.floats(1.0, 6.0),
       share=st.floats(0.0, 1.0), tolerance=st.sampled_from([1e-2, 1e-4]))
def test_guided_search_converges_on_any_mixture_of_power_laws(crossing, low_power, high_power, share, tolerance):
    # increases that grow like a sum of powers (a minimum's s², steeper further out), crossing ε
    # anywhere in seven decades: the guided search lands within the tolerance inside the profiles'
    # caps (15 evaluations at 1e-2, 40 at 1e-4), where doubling and bisection need up to 23 and 29
    def increase(s):
        return 0.1 * ((1 - share) * (s / crossing) ** low_power + share * (s / crossing) ** high_power)

    cap = 15 if tolerance == 1e-2 else 40
    found = search_scale(increase, epsilon=0.1, tolerance=tolerance, max_iterations=cap)
    assert found.converged, found.history
    assert abs(increase(found.scale) - 0.1) <= tolerance


def test_bound_terms_equal_hand_computation():
    w = torch.tensor([1.0, -2.0, 3.0])
    w0 = torch.tensor([0.5, -1.0, 1.0])
    # ‖w − w0‖² = 0.25 + 1 + 4 = 5.25; ‖w‖² = 14; d = 3; σ = α = 0.5 -> 4σ² = 1
    assert kl_term("init", w, w0, 0.5) == pytest.approx(5.25)
    assert kl_term("orig", w, None, 0.5) == pytest.approx(14.0)
    assert kl_term("magnitude", w, None, 0.5) == pytest.approx(3.0)
    assert log_term(100, 1e-6) == pytest.approx(math.log(2e8))

    # a whole bound on a tiny quadratic model: terms and sum as computed by hand from the σ found
    h = torch.tensor([1.0, 2.0, 0.5])
    result = pacbayes_bound(w, quadratic(w, h), m=50, init=w0, variant="init", samples=10, epsilon=0.1,
                            tolerance=1e-7, max_iterations=80, seed=1)
    sigma = result.scale
    assert result.kl_term == pytest.approx(5.25 / (4 * sigma ** 2), rel=1e-6)
    assert result.log_term == pytest.approx(math.log(2 * 50 / DEFAULT_DELTA))
    assert result.bound == pytest.approx(result.kl_term + result.log_term)
    assert result.value == pytest.approx(result.bound / 1e6)
    assert (result.m, result.num_params, result.samples, result.variant) == (50, 3, 10, "init")


def test_magnitude_variant_scales_with_the_parameter_count():
    # docs/protocol.md#pac-bayes-bound: with σ_i = α|w_i| the KL term is d/(4α²). With curvatures
    # h_i = 1/(d w_i²) the tolerated α does not depend on d (½α²·mean z² = ε), so the bound grows in
    # proportion to d, whatever the weights' magnitudes, while the absolute-σ variant follows ‖w‖².
    per_param = {}
    for d, magnitude in ((400, 1.0), (1600, 10.0), (6400, 0.1)):
        w = magnitude * (torch.rand(d, dtype=torch.float64) + 0.5)
        h = 1.0 / (d * w ** 2)
        result = pacbayes_bound(w, quadratic(w, h), m=1000, variant="magnitude", tolerance=1e-7,
                                max_iterations=80, seed=0)
        assert result.kl_term == pytest.approx(d / (4 * result.scale ** 2))
        assert result.scale == pytest.approx(math.sqrt(0.2), rel=0.03)  # α² · mean z² = 2ε
        per_param[d] = result.kl_term / d
        orig = pacbayes_bound(w, quadratic(w, h), m=1000, variant="orig", tolerance=1e-7, max_iterations=80)
        assert orig.kl_term == pytest.approx(float((w ** 2).sum()) / (4 * orig.scale ** 2))
    values = list(per_param.values())
    assert max(values) / min(values) < 1.06   # ≈ 1/(4α²) = 1.25 for every d
    assert values[0] == pytest.approx(1.25, rel=0.06)


def test_deterministic_given_the_seed():
    d = 500
    w = torch.randn(d, dtype=torch.float64)
    h = torch.rand(d, dtype=torch.float64) + 0.1
    a = pacbayes_bound(w, quadratic(w, h), m=10, variant="orig", seed=7)
    b = pacbayes_bound(w, quadratic(w, h), m=10, variant="orig", seed=7)
    c = pacbayes_bound(w, quadratic(w, h), m=10, variant="orig", seed=8)
    assert a.scale == b.scale and a.history == b.history
    assert c.scale != a.scale


# --------------------------------------------------------------------------------------------------
# The command on a real (pipeline) run


def _train(tmp_path, method="dml", epochs=2, save_every=1):
    from okdph.engine.run import RunConfig, train_run

    cfg = RunConfig(method=method, profile="pipeline", epochs=epochs, save_every=save_every, out_dir=str(tmp_path),
                    device="cpu")
    train_run(cfg, progress=False)
    return cfg.record_path()


@pytest.mark.slow
def test_cli_pacbayes_writes_the_record_and_the_per_epoch_figure(tmp_path):
    record_path = _train(tmp_path)
    png = tmp_path / "fig1.png"
    args = ["pacbayes", str(record_path), "--device", "cpu", "--quiet", "--tolerance", "0.01",
            "--per-epoch", "--out", str(png), "--write"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "epoch 0:" in result.output and "epoch 2:" in result.output
    record = json.loads(record_path.read_text())
    block = record["pacbayes"]
    assert record["metrics"]["pacbayes"] == pytest.approx(block["bound"] / 1e6)
    assert block["variant"] == "magnitude" and block["epoch"] == 2 and block["m"] == record["data"]["train_size"]
    assert block["kl_term"] == pytest.approx(block["num_params"] / (4 * block["scale"] ** 2))
    assert [p["epoch"] for p in block["per_epoch"]] == [0, 1, 2]
    assert png.stat().st_size > 0 and json.loads(png.with_suffix(".json").read_text())["series"][0]["epochs"] == [0, 1, 2]

    # bad input: one line, exit 2
    no_traj = tmp_path / "elsewhere.json"
    no_traj.write_text(record_path.read_text())
    for bad, message in ((str(no_traj), "no trajectory points"), (str(tmp_path / "missing.json"), "does not exist")):
        bad_result = CliRunner().invoke(main, ["pacbayes", bad, "--device", "cpu", "--quiet"])
        assert bad_result.exit_code == 2, bad_result.output
        assert message in bad_result.output and len(bad_result.output.strip().splitlines()) == 1


def test_search_stops_when_the_bracket_collapses_on_a_jump():
    # a loss that jumps across ε at s = 0.3 (never within tolerance): the search locates the jump
    # and stops long before its iteration cap, marked not converged
    found = search_scale(lambda s: 0.0 if s < 0.3 else 1.0, epsilon=0.1, tolerance=1e-3, max_iterations=200,
                         start=0.01, resolution=1e-5)
    assert not found.converged and found.iterations < 30
    assert found.history[-1][0] == pytest.approx(0.3, rel=1e-4)


@pytest.mark.slow
def test_table5_runs_keep_weights_and_get_the_bound(tmp_path):
    from okdph.bench.runner import Execution, TableChoices, _analyse, _must_train, _plan, render_table

    choices = TableChoices.of("5", profile="pipeline")
    _, configs, store = _plan(choices, Execution(), seeds=1, methods=("dml",), results=tmp_path)
    table = choices.table
    assert table.metric == "pacbayes" and configs and all(c.save_every == 1 for c in configs)  # pipeline: 1 epoch
    cfg = next(c for c in configs if c.backbone == "resnet32")
    assert _must_train(cfg, store, table.metric)

    # a record of the same run without weights (trained by Table 3, say) must be trained again
    from dataclasses import replace

    from okdph.engine.run import train_run

    train_run(replace(cfg, save_every=None, device="cpu"), progress=False)
    assert _must_train(cfg, store, table.metric)
    train_run(replace(cfg, device="cpu"), progress=False)
    assert not _must_train(cfg, store, table.metric)

    done, failed = _analyse([cfg], table.metric, device="cpu", data_root="data", progress=False)
    assert (done, failed) == (1, [])
    record = json.loads(cfg.record_path().read_text())
    assert record["pacbayes"]["tolerance"] == 1e-2 and record["pacbayes"]["epoch"] == 1
    _, text = render_table(TableChoices.of("5", profile="pipeline"), results=tmp_path)
    assert f"{record['metrics']['pacbayes']:.2f} (n=1)" in text


def test_table5_bounds_use_the_cores_the_training_workers_had(monkeypatch, tmp_path):
    """After the CPU workers are done, the bounds (one process, one run after another) get all of
    their threads, not one; the caller's thread count comes back afterwards."""
    import okdph.analysis.pacbayes as pb
    import okdph.bench.runner as runner
    from okdph.engine.run import RunConfig

    seen = []
    monkeypatch.setattr(runner, "_needs_analysis", lambda cfg, metric: True)
    monkeypatch.setattr(pb, "compute_and_write", lambda path, **options: seen.append(torch.get_num_threads()))
    cfg = RunConfig(method="dml", profile="pipeline", out_dir=str(tmp_path))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = runner._analyse([cfg, cfg], "pacbayes", device="cpu", data_root="data", progress=False,
                               cpu_threads=2)
        assert done == (2, [])
        assert seen == [2, 2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
