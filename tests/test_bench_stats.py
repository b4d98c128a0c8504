"""Seed statistics in the tables (docs/protocol.md#which-std): both std conventions, the 95 %
confidence interval, OKDPH against the best baseline with Welch's t-test, no Δ to the paper where
the runs do not use the paper's data, and each table drawn as a figure by the report. The
statistics are checked against closed forms (no scipy in the expectations); records are fabricated."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from test_bench import fake_record

from okdph.bench import runner, stats
from okdph.bench.choices import TableChoices
from okdph.bench.experiments import cell_config, get_table
from okdph.bench.render import collect, markdown_table
from okdph.bench.report import write_report
from okdph.bench.store import ResultStore
from okdph.cli import main

# five values with mean 0 and sample std exactly 1: a cell "m ± s" is m + s * UNIT
UNIT = [v / math.sqrt(2.5) for v in (-2.0, -1.0, 0.0, 1.0, 2.0)]


# --------------------------------------------------------------------------------------------------
# The statistics


def test_both_std_conventions_and_none_below_two_runs():
    values = [93.0, 94.0, 95.0]
    assert stats.std(values, "sample") == pytest.approx(1.0)
    assert stats.std(values, "population") == pytest.approx(math.sqrt(2 / 3))  # what np.std prints
    assert stats.std([94.0], "sample") is None and stats.std([94.0], "population") is None
    with pytest.raises(ValueError, match="unknown std 'median'; valid: sample, population"):
        stats.std(values, "median")


def test_confidence_interval_is_t_based_with_n_minus_1_degrees_of_freedom():
    # with 2 degrees of freedom the t quantile has a closed form: (2q − 1) / sqrt(2q(1 − q))
    q = 0.975
    t_2 = (2 * q - 1) / math.sqrt(2 * q * (1 - q))
    assert t_2 == pytest.approx(4.302653, abs=1e-6)
    low, high = stats.confidence_interval([93.0, 94.0, 95.0])
    assert (low, high) == pytest.approx((94.0 - t_2 / math.sqrt(3), 94.0 + t_2 / math.sqrt(3)))
    assert stats.confidence_interval([94.0]) is None
    assert stats.confidence_interval([94.0, 94.0]) == (94.0, 94.0)


def _t4_cdf(x: float) -> float:
    """The CDF of Student's t with 4 degrees of freedom, in closed form."""
    u = x * x / (1 + x * x / 4)
    return 0.5 + 3 / 8 * x / math.sqrt(1 + x * x / 4) * (1 - u / 12)


def test_welch_p_against_the_closed_form():
    # equal sizes and variances: t = −3 / sqrt(2/3), Welch's degrees of freedom are exactly 4
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    t = 3 / math.sqrt(2 / 3)
    assert stats.welch_p(a, b) == pytest.approx(2 * (1 - _t4_cdf(t)), rel=1e-9)
    assert stats.welch_p(a, b) == pytest.approx(stats.welch_p(b, a))
    # unequal variances, one side without spread: Welch's degrees of freedom are exactly 2 (Student's
    # pooled test would have 4 and give p = 0.021), t = 3 / sqrt(1/3), and with 2 degrees of freedom
    # the two-sided p is 1 − t / sqrt(2 + t²)
    t = 3 / math.sqrt(1 / 3)
    assert stats.welch_p([5.0, 5.0, 5.0], a) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)


def test_welch_p_says_nothing_below_two_runs_and_takes_the_limit_without_spread():
    assert stats.welch_p([94.0], [93.0, 93.5]) is None and stats.welch_p([94.0, 94.5], [93.0]) is None
    assert stats.welch_p([10.0, 10.0], [10.0, 10.0, 10.0]) == 1.0   # deterministic runs, same value
    assert stats.welch_p([10.0, 10.0], [12.0, 12.0]) == 0.0         # deterministic runs, different values


def test_a_rank_test_cannot_reach_small_p_with_five_runs():
    assert stats.rank_test_smallest_p(5, 5) == pytest.approx(2 / 252) and stats.rank_test_smallest_p(3, 3) == 0.1
    assert stats.rank_test_smallest_p(1, 1) == 1.0


# --------------------------------------------------------------------------------------------------
# Tables


def _row(table, **where):
    return {c.method: c for c in table.cells if all(getattr(c, k) == v for k, v in where.items())}


def _record_cell(store, cell, values, profile="quick"):
    for seed, value in zip(range(42, 42 + len(values)), values):
        fake_record(cell_config(cell, profile=profile, seed=seed, out_dir=str(store.runs_dir)), value)


@pytest.fixture
def quick_table3(tmp_path):
    """Table 3, quick profile: in C10 ResNet32 ×2 OKDPH is 1 point above KDCL (5 seeds each, std 0.2);
    in ×3 OKDPH and KDCL are 0.05 apart; in ×4 KDCL has one run only."""
    store = ResultStore(tmp_path)
    table = get_table("3")
    for students, okdph, kdcl_values in ((2, 95.0, [94.0 + 0.2 * u for u in UNIT]),
                                         (3, 94.05, [94.0 + 0.2 * u for u in reversed(UNIT)]),
                                         (4, 95.0, [94.0])):
        row = _row(table, dataset="cifar10", backbone="resnet32", students=students)
        _record_cell(store, row["okdph"], [okdph + 0.2 * u for u in UNIT])
        _record_cell(store, row["kdcl"], kdcl_values)
        _record_cell(store, row["dml"], [93.0 + 0.2 * u for u in UNIT])
    return tmp_path


def test_okdph_against_the_best_baseline_per_row(quick_table3):
    paths, text = runner.render_table(TableChoices.of("3", profile="quick"), results=quick_table3)
    lines = text.splitlines()
    assert "* where Welch's two-sided t-test gives p < 0.05 (exact p in the CSV/JSON" in text
    ours = [line for line in lines if "| ours" in line and "CIFAR-10 " in line and "ResNet32 " in line]
    assert [line.split("|")[-2].strip() for line in ours] == ["+1.00 vs KDCL *", "+0.05 vs KDCL", "n < 2"]

    rows = {(r["students"], r["method"]): r for r in csv.DictReader(paths["csv"].open())
            if r["dataset"] == "cifar10" and r["backbone"] == "resnet32"}
    clear, close, single = rows[("2", "okdph")], rows[("3", "okdph")], rows[("4", "okdph")]
    assert clear["best_baseline"] == "kdcl" and float(clear["best_baseline_mean"]) == pytest.approx(94.0)
    assert clear["okdph_better"] == "True" and float(clear["welch_p"]) < 1e-4
    assert close["okdph_better"] == "True" and float(close["welch_p"]) > 0.5   # above, but not shown to be
    assert single["okdph_better"] == "" and single["welch_p"] == "" and single["test_note"] == "n < 2"
    assert rows[("2", "kdcl")]["welch_p"] == "" and rows[("2", "kdcl")]["best_baseline"] == ""  # OKDPH's line only

    cell = json.loads(paths["json"].read_text())["cells"][0]   # C10 ResNet32 ×2 DML: 93 ± 0.2
    assert cell["std_sample"] == pytest.approx(0.2) and cell["std_population"] == pytest.approx(0.2 * math.sqrt(0.8))
    assert cell["std"] == cell["std_sample"] and cell["std_convention"] == "sample" and cell["n"] == 5
    half = 0.2 * 2.7764451 / math.sqrt(5)                       # t(0.975, 4) = 2.7764451
    assert (cell["ci95_low"], cell["ci95_high"]) == pytest.approx((93.0 - half, 93.0 + half), abs=1e-6)


def test_std_population_is_what_the_table_shows_when_asked(quick_table3):
    result = CliRunner().invoke(main, ["table", "3", "--profile", "quick", "--std", "population",
                                       "--results", str(quick_table3)])
    assert result.exit_code == 0, result.output
    assert "mean ± population std (n in the denominator" in result.output
    assert "**95.00 ± 0.18 (n=5)**" in result.output            # 0.2 × sqrt(4/5) = 0.179
    data = json.loads((quick_table3 / "tables" / "table3-quick.json").read_text())
    assert data["std_convention"] == "population" and data["confidence"] == 0.95 and data["alpha"] == 0.05
    first = data["cells"][0]
    assert first["std"] == first["std_population"] and first["std_sample"] == pytest.approx(0.2)
    # the default is the sample std, said in the header
    default = CliRunner().invoke(main, ["table", "3", "--profile", "quick", "--results", str(quick_table3)])
    assert "mean ± sample std (n − 1 in the denominator)" in default.output and "95.00 ± 0.20 (n=5)" in default.output


def test_pipeline_tables_print_no_delta_and_label_the_paper_value(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("3")
    row = _row(table, dataset="cifar10", backbone="resnet32", students=2)
    for method in ("dml", "okdph"):
        fake_record(cell_config(row[method], profile="pipeline", out_dir=str(store.runs_dir)), 80.0)
        _record_cell(store, row[method], [94.0, 94.5], profile="quick")
    paths, text = runner.render_table(TableChoices.of("3", profile="pipeline"), results=tmp_path)
    lines = text.splitlines()
    body = [line for line in lines if line.startswith("|")][2:]           # below the header and separator
    labels = {line.split("|")[4].strip() for line in body}                 # the column after #S/B
    assert labels == {"ours", "paper (CIFAR-10)", "paper (CIFAR-100)"}     # no Δ line
    assert "Δ = ours − paper" not in text
    scope = [line for line in lines if line.startswith("Pipeline profile:")]
    assert len(scope) == 1 and "the numbers show" in scope[0] and "not whether a method learns" in scope[0]
    assert "no Δ to the paper is printed" in scope[0]
    data = json.loads(paths["json"].read_text())
    assert data["paper_data"] is False and all(c["delta"] is None for c in data["cells"])
    assert data["cells"][0]["paper"] == 94.27                     # the paper's value stays
    # the same cells on the paper's data (quick) keep their Δ line and value
    paths, text = runner.render_table(TableChoices.of("3", profile="quick"), results=tmp_path)
    assert "| Δ " in text and "-0.02" in text                    # DML: 94.25 − 94.27
    assert json.loads(paths["json"].read_text())["paper_data"] is True


def test_tables_of_other_metrics_and_no_okdph_column_without_okdph(tmp_path):
    """Table 5 (lower is better): OKDPH 'better' means a lower bound."""
    store = ResultStore(tmp_path)
    table = get_table("5")
    row = _row(table, dataset="cifar10", backbone="resnet32")
    for method, bound in (("dml", 98.0), ("kdcl", 99.0), ("okdph", 97.0)):
        for seed, u in zip(range(42, 47), UNIT):
            cfg = cell_config(row[method], profile="pipeline", seed=seed, out_dir=str(store.runs_dir))
            record = fake_record(cfg, 50.0)
            record["metrics"]["pacbayes"] = bound + 0.1 * u
            (store.runs_dir / f"{record['run_id']}.json").write_text(json.dumps(record))
    results = [r for r in collect(TableChoices(table, profile="pipeline"), store) if r.cell in row.values()]
    ours = markdown_table(table, results).splitlines()[2]
    assert ours.split("|")[-2].strip() == "-1.00 vs DML *"
    # a row where OKDPH has no value yet compares nothing
    without = markdown_table(table, [r for r in results if r.cell.method != "okdph"]).splitlines()[2]
    assert without.split("|")[-2].strip() == "–"


# --------------------------------------------------------------------------------------------------
# The report draws each table


def test_report_draws_each_table_with_error_bars_of_the_chosen_std(quick_table3, monkeypatch):
    from matplotlib.figure import Figure

    drawn = {}
    save = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        drawn[str(path)] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    report = write_report(quick_table3, std="population").read_text()
    png = quick_table3 / "figures" / "table3-quick.png"
    assert "![table3-quick as a figure](figures/table3-quick.png)" in report
    assert png.read_bytes()[:4] == b"\x89PNG"
    fig = drawn[str(png)]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"CIFAR-10, ResNet32, #S/B {n}" for n in (2, 3, 4)]
    assert all(ax.get_ylabel() == "top-1 accuracy (%)" and ax.get_xlabel() == "method" for ax in panels)
    assert fig.get_suptitle().startswith("table3-quick: Supplement Table 3")
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["DML\nn=5", "KDCL\nn=5", "OKDPH\nn=5"]
    # each error bar spans mean ± the population std: 0.2 × sqrt(4/5)
    spans = [np.ptp(segment[:, 1]) for container in panels[0].containers for segment in
             container.lines[2][0].get_segments()]
    assert spans == pytest.approx([2 * 0.2 * math.sqrt(0.8)] * 3)
    assert not panels[2].containers[1].lines[2]   # KDCL with one run: no error bar
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["mean ± population std", "OKDPH", "paper"]
