"""The README's first command: all of supplement Table 3 in the pipeline profile, for real."""
from __future__ import annotations

import json

import pytest

from okdph.bench import runner
from okdph.bench.choices import Execution, TableChoices
from okdph.bench.experiments import get_table
TABLE3_METHODS = ["dml", "one", "kdcl", "okddip", "ffl", "pcl", "okdph"]


@pytest.mark.slow
def test_pipeline_table3_runs_every_method_of_the_table(tmp_path):
    table = get_table("3")
    assert len(table.cells) == 84 and list(table.methods) == TABLE3_METHODS
    # Every method is run: one that is no longer registered fails the sweep here, it is not filtered out.
    summary = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False), results=tmp_path)
    methods = TABLE3_METHODS
    assert not summary.failed, summary.failed
    assert summary.trained == summary.runs and summary.cells == 12 * len(methods)
    data = json.loads((tmp_path / "tables" / "table3-pipeline.json").read_text())
    cells = [c for c in data["cells"] if c["method"] in methods]
    assert len(data["cells"]) == 84 and len(cells) == 12 * len(methods)
    assert all(c["n"] == 1 and c["seeds"] == [42] and c["paper"] is not None for c in cells)
    assert all(0.0 <= c["mean"] <= 100.0 for c in cells)
    by_row = {}
    for c in cells:
        by_row.setdefault((c["dataset"], c["backbone"], c["students"]), []).append(c)
    assert len(by_row) == 12
    for row in by_row.values():  # a best value in every row whose values differ; none in a row of ties
        distinct = len({round(c["mean"], 2) for c in row}) > 1
        assert any(c["best"] for c in row) == distinct
    okdph = [c for c in cells if c["method"] == "okdph"]
    assert okdph and all(c["preset"] == "Table 6" for c in okdph)
    # a second run finds everything recorded and trains nothing
    again = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False), methods=methods,
                             results=tmp_path)
    assert again.trained == 0 and again.recorded == again.runs
