"""benchmarks/smoke_calibration.py (what a smoke table that learns would cost) keeps working: its
per-backbone options reach the runs, and its patches of the recipe and the digits' view end with it."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import okdph.engine.run as run_module
from okdph.data import get_info
from okdph.engine.recipe import resolve_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke_calibration.py"


def load_script():
    spec = importlib.util.spec_from_file_location("smoke_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["smoke_calibration"] = module
    spec.loader.exec_module(module)
    return module


def test_per_backbone_values():
    script = load_script()
    assert script.per_backbone(["4"], int, "epochs") == {"resnet32": 4, "vgg16": 4}
    assert script.per_backbone(["4", "vgg16=8"], int, "epochs") == {"resnet32": 4, "vgg16": 8}
    with pytest.raises(SystemExit, match="backbone must be one of resnet32, vgg16"):
        script.per_backbone(["wrn20_8=2"], int, "epochs")


@pytest.mark.slow
def test_the_candidate_reaches_each_run_and_nothing_else(tmp_path):
    out = tmp_path / "calibration.json"
    result = load_script().main(["--method", "dml", "--epochs", "vgg16=2", "--batch", "resnet32=16", "--view", "base",
                                 "--train-samples", "48", "--out", str(out)])
    rows = {(r["backbone"], r["students"]): r for r in result["rows"]}
    assert sorted(rows) == [(b, n) for b in ("resnet32", "vgg16") for n in (2, 3, 4)]  # Table 3's DML runs
    for (backbone, students), row in rows.items():
        assert row["epochs"] == (2 if backbone == "vgg16" else 1)
        assert row["batch_size"] == (16 if backbone == "resnet32" else 32)
        assert row["views"] == ["base"] * students
        assert 0.0 <= row["best_acc"] <= 100.0 and row["wall_s"] > 0
    assert json.loads(out.read_text())["runs"] == 6
    # the process is as before: the smoke recipe and the digits' CIFAR view
    assert run_module.resolve_recipe is resolve_recipe
    assert get_info("digits").default_view == "hflip"
