"""Accuracy-regression tracking: every registered method's tiny deterministic run matches
results/regression/expected.json within the tolerance stated there (`okdph-bench regress`)."""
from __future__ import annotations

import json
from pathlib import Path

from okdph.bench import regress

EXPECTED = Path(__file__).resolve().parents[1] / "results" / "regression" / "expected.json"


def test_no_method_drifted_from_its_expectations():
    result = regress.regress(EXPECTED)
    assert result.ok, "\n".join(result.lines)
    expected = json.loads(EXPECTED.read_text())
    assert expected["tolerance"]["acc_abs"] > 0 and expected["tolerance"]["loss_rel"] > 0
    assert {"okdph", "dml", "kdcl", "base"} <= set(expected["methods"])


def test_compare_flags_a_drift_and_only_a_drift():
    expected = json.loads(EXPECTED.read_text())
    tolerance, okdph = expected["tolerance"], expected["methods"]["okdph"]
    assert regress.compare(okdph, okdph, tolerance) == []
    nudged = {**okdph, "train_loss": {k: v * (1 + tolerance["loss_rel"] / 10) for k, v in okdph["train_loss"].items()}}
    assert regress.compare(okdph, nudged, tolerance) == []
    drifted = {**okdph, "train_loss": {k: v * 1.05 for k, v in okdph["train_loss"].items()},
               "paper_acc": okdph["paper_acc"] + 5}
    problems = regress.compare(okdph, drifted, tolerance)
    assert any(p.startswith("paper_acc") for p in problems) and any(p.startswith("train_loss[") for p in problems)
