"""`okdph-bench compare`: accuracy regression tracking between two result sets, on fabricated table
JSONs and record folders where the answer is known. Bad input is in tests/test_bad_input.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bench import fake_record

from okdph.bench import runner
from okdph.bench.choices import TableChoices
from okdph.bench.compare import compare, verdict
from okdph.bench.experiments import cell_config, get_table
from okdph.bench.store import ResultStore
from okdph.cli import main
from okdph.names import SINGLE_SEED_MAX_DROP

# five values with mean 0 and sample std exactly 1: "mean m, std s over 5 seeds" is m + s * UNIT
UNIT = [v / math.sqrt(2.5) for v in (-2.0, -1.0, 0.0, 1.0, 2.0)]
ROW = {"dataset": "cifar10", "backbone": "resnet32", "setting": "standard"}


def seeds(mean: float, std: float, order=UNIT) -> list[float]:
    return [mean + std * u for u in order]


def table_json(path: Path, cells: dict[tuple[str, int], list[float]], *, table="table3", profile="quick",
               metric="paper", better="higher") -> Path:
    """A table JSON as `okdph-bench table` writes it, with only the fields compare reads besides values."""
    rows = [{**ROW, "students": students, "method": method, "values": values, "n": len(values),
             "profile": profile, "fidelity": "official"} for (method, students), values in cells.items()]
    path.write_text(json.dumps({"table": table, "profile": profile, "fidelity": "official", "metric": metric,
                                "better": better, "cells": rows}))
    return path


def run_compare(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["compare", *map(str, args)])
    return result.exit_code, result.output


REFERENCE = {("okdph", 2): seeds(95.0, 0.2), ("dml", 2): seeds(94.3, 0.2), ("kdcl", 2): seeds(93.9, 0.2)}


def test_a_two_point_drop_over_five_seeds_is_flagged(tmp_path):
    before = table_json(tmp_path / "reference.json", REFERENCE)
    after = table_json(tmp_path / "tonight.json", {**REFERENCE, ("okdph", 2): seeds(93.0, 0.2, UNIT[::-1])})
    result = compare(before, after)
    by_method = {c.key.method: c for c in result.cells}
    assert by_method["okdph"].verdict == "regressed" and by_method["okdph"].delta == pytest.approx(-2.0)
    assert by_method["okdph"].p < 1e-6
    assert [c.verdict for c in result.cells if c.key.method != "okdph"] == ["unchanged", "unchanged"]
    code, output = run_compare(before, after, "--out", tmp_path / "ci" / "report.md")
    assert code == 1
    assert "## Regressed" in output and "table3-quick · CIFAR-10, ResNet32, #S/B 2 · OKDPH" in output
    assert "95.00 ± 0.20 (n=5) → 93.00 ± 0.20 (n=5), Δ -2.00" in output
    assert output.strip().splitlines()[-1] == ("3 cells compared: 1 regressed, 0 improved, 2 unchanged, "
                                                "0 not tested (n < 2); 0 cells in one side only")
    written = (tmp_path / "ci" / "report.md").read_text()
    assert written.startswith("# okdph-bench compare") and "**regressed**" in written
    # with n <= 5 per side the report says why it does not use a rank test
    assert "a rank test (Mann-Whitney U) cannot reach small p (with 5 and 5 runs its smallest p is 0.00794" in written


def test_a_small_change_is_not_a_regression_even_when_significant(tmp_path):
    before = table_json(tmp_path / "a.json", REFERENCE)
    noisy = table_json(tmp_path / "b.json", {**REFERENCE, ("okdph", 2): seeds(94.9, 0.2, UNIT[::-1])})
    assert compare(before, noisy).cells[-1].verdict == "unchanged"   # 0.1 points within std 0.2: p ≈ 0.45
    # 0.1 points with almost no spread is significant (p < 0.05) but below the minimum effect
    tight = {("okdph", 2): seeds(95.0, 0.01)}
    lower = table_json(tmp_path / "c.json", {("okdph", 2): seeds(94.9, 0.01, UNIT[::-1])})
    (cell,) = compare(table_json(tmp_path / "d.json", tight), lower).cells
    assert cell.p < 1e-6 and cell.verdict == "unchanged"
    assert run_compare(tmp_path / "d.json", lower)[0] == 0
    # ... and a regression once the minimum effect is lowered below it
    code, output = run_compare(tmp_path / "d.json", lower, "--min-effect", "0.05")
    assert code == 1 and "worse by at least 0.05 points" in output


def test_identical_sets_exit_0_and_improvements_do_not_fail(tmp_path):
    before = table_json(tmp_path / "a.json", REFERENCE)
    code, output = run_compare(before, before)
    assert code == 0 and "0 regressed, 0 improved, 3 unchanged" in output and "## Regressed" not in output
    better = table_json(tmp_path / "b.json", {**REFERENCE, ("kdcl", 2): seeds(95.9, 0.2)})
    result = compare(before, better)
    assert [c.verdict for c in result.cells if c.key.method == "kdcl"] == ["improved"]
    assert run_compare(before, better)[0] == 0


def test_missing_cells_are_listed_not_skipped(tmp_path):
    before = table_json(tmp_path / "a.json", {**REFERENCE, ("one", 3): seeds(94.0, 0.2)})
    after = table_json(tmp_path / "b.json", {**REFERENCE, ("pcl", 4): seeds(94.0, 0.2)})
    result = compare(before, after)
    assert [(k.method, k.students) for k in result.only_baseline] == [("one", 3)]
    assert [(k.method, k.students) for k in result.only_candidate] == [("pcl", 4)]
    code, output = run_compare(before, after)
    assert code == 0 and "2 cells in one side only" in output
    assert "- only in the baseline: table3-quick · CIFAR-10, ResNet32, #S/B 3 · ONE" in output
    assert "- only in the candidate: table3-quick · CIFAR-10, ResNet32, #S/B 4 · PCL" in output


def test_fewer_than_two_runs_are_not_tested_without_a_max_drop(tmp_path):
    before = table_json(tmp_path / "a.json", {("okdph", 2): [95.0]})
    after = table_json(tmp_path / "b.json", {("okdph", 2): [80.0]})
    (cell,) = compare(before, after).cells
    assert cell.p is None and cell.verdict == "n < 2"


@pytest.mark.parametrize("after_value,max_drop,verdict_", [(80.0, 10.0, "regressed"), (80.0, 15.0, "unchanged"),
                                                          (99.0, 10.0, "unchanged"), (80.0, 0.0, "regressed")])
def test_a_single_run_is_judged_by_the_max_drop(tmp_path, after_value, max_drop, verdict_):
    before = table_json(tmp_path / "a.json", {("okdph", 2): [95.0]})
    after = table_json(tmp_path / "b.json", {("okdph", 2): [after_value]})
    (cell,) = compare(before, after, max_drop=max_drop).cells
    assert cell.p is None and cell.verdict == verdict_
    code, output = run_compare(before, after, "--max-drop", str(max_drop))
    assert code == (1 if verdict_ == "regressed" else 0) and "0 not tested (n < 2)" in output
    if verdict_ == "regressed":
        assert "## Regressed" in output and "OKDPH: 95.00 (n=1) → 80.00 (n=1), Δ -15.00" in output


def test_lower_is_better_for_the_pacbayes_table():
    assert verdict(+2.0, 0.001, "lower", alpha=0.05, min_effect=0.5) == "regressed"
    assert verdict(-2.0, 0.001, "lower", alpha=0.05, min_effect=0.5) == "improved"
    assert verdict(-2.0, 0.001, "higher", alpha=0.05, min_effect=0.5) == "regressed"
    assert verdict(-2.0, 0.2, "higher", alpha=0.05, min_effect=0.5) == "unchanged"   # not significant


def test_a_results_folder_against_its_own_table_json_and_against_a_drop(tmp_path):
    """A side can be a results folder: its records are read as `okdph-bench table` reads them."""
    table = get_table("3")
    cells = [c for c in table.cells if c.dataset == "cifar10" and c.backbone == "resnet32" and c.students == 2
             and c.method in ("dml", "okdph")]

    def sweep(root: Path, okdph_mean: float) -> Path:
        store = ResultStore(root)
        for cell in cells:
            mean = okdph_mean if cell.method == "okdph" else 94.0
            for seed, value in zip(range(42, 47), seeds(mean, 0.2)):
                fake_record(cell_config(cell, profile="quick", seed=seed, out_dir=str(store.runs_dir)), value)
        return root

    nightly = sweep(tmp_path / "nightly", 95.0)
    paths, _ = runner.render_table(TableChoices.of("3", profile="quick"), results=nightly)
    code, output = run_compare(paths["json"], nightly)      # the committed table vs the same records
    assert code == 0 and "2 cells compared: 0 regressed, 0 improved, 2 unchanged" in output
    # another profile in the folder is outside the table JSON's scope: not listed as missing
    fake_record(cell_config(cells[0], profile="pipeline", out_dir=str(ResultStore(nightly).runs_dir)), 50.0)
    assert "0 cells in one side only" in run_compare(paths["json"], nightly)[1]
    # folder against folder: a drop of OKDPH by 2 points is flagged, the pipeline cells are listed
    broken = sweep(tmp_path / "broken", 93.0)
    code, output = run_compare(nightly, broken, "--table", "3")
    assert code == 1 and "1 regressed" in output
    assert "- only in the baseline: table3-pipeline · CIFAR-10, ResNet32, #S/B 2 · DML" in output
    # the final metric reads the records' other number (acc − 1 in fake_record): still no regression
    assert run_compare(nightly, nightly, "--metric", "final")[0] == 0


PREVIOUS_FORMAT = {  # a table JSON as `run`/`table` wrote it before the statistics columns existed
    "table": "table3", "title": "Supplement Table 3", "source": "OKDPH supplement, Table 3", "profile": "pipeline",
    "fidelity": "official", "metric": "paper", "better": "higher", "runs_dir": "results/runs", "notes": {},
    "generated": "2026-11-26T12:50:46+00:00",
    "cells": [{"table": "table3", "dataset": "cifar10", "backbone": "resnet32", "setting": "standard",
               "students": 2, "method": method, "overrides": {}, "preset": None, "paper": 94.27, "paper_note": "",
               "mean": 10.0, "std": None, "n": 1, "delta": -84.27, "best": False, "diverged": 0, "values": [10.0],
               "seeds": [42], "run_ids": [f"{method}-resnet32-digits-standard-n2-official-pipeline-seed42-0"],
               "engine": "reference", "profile": "pipeline", "fidelity": "official", "metric": "paper"}
              for method in ("dml", "okdph")],
}


def test_a_table_json_of_the_previous_format_still_compares(tmp_path):
    committed = tmp_path / "table3-pipeline.json"
    committed.write_text(json.dumps(PREVIOUS_FORMAT))
    result = compare(committed, committed)
    assert len(result.cells) == 2 and all(c.verdict == "n < 2" for c in result.cells)   # one seed per cell


# The CI rule on recorded tables (docs/protocol.md#one-run-per-cell): the committed smoke table
# against the same command under other seeds (benchmarks/smoke_spread.py's inputs),
# and against one method trained with shuffled labels (benchmarks/broken_method.py).
ROOT = Path(__file__).resolve().parents[1]
SMOKE_REFERENCE = ROOT / "results" / "reference" / "tables" / "table3-smoke.json"
SPREAD = ROOT / "results" / "perf" / "smoke-spread"


def test_the_ci_rule_holds_on_other_seeds():
    result = compare(SMOKE_REFERENCE, SPREAD / "seeds-43-44.json", table="3", max_drop=SINGLE_SEED_MAX_DROP)
    assert len(result.cells) == 84 and not result.regressed, result.summary()


def test_the_ci_rule_names_every_cell_of_a_broken_method():
    broken = ROOT / "results" / "perf" / "broken-dml" / "tables" / "table3-smoke.json"
    result = compare(SMOKE_REFERENCE, broken, table="3", max_drop=SINGLE_SEED_MAX_DROP)
    regressed = {(c.key.dataset, c.key.backbone, c.key.students, c.key.method) for c in result.regressed}
    assert regressed and {method for *_, method in regressed} == {"dml"}
    learned = {(c.key.dataset, c.key.backbone, c.key.students, c.key.method) for c in result.cells
               if c.baseline[0] - 10.0 > SINGLE_SEED_MAX_DROP}  # cells a method at chance can fall below
    assert learned <= regressed
    report = result.markdown()
    assert all(f"{c.key.label()}:" in report for c in result.regressed)


def test_the_threshold_sits_above_the_measured_spread():
    spread = json.loads((SPREAD / "spread.json").read_text())
    assert spread["largest_drop"]["drop"] < SINGLE_SEED_MAX_DROP
