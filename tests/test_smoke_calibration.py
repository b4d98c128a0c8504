"""benchmarks/smoke_calibration.py (how the smoke recipe was chosen) keeps working: its per-backbone
options reach the runs, `--flip` reaches every method's views (OKDPH's included), and its patches of
the recipes and the digits' traits end with it."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from okdph.data import get_info
from okdph.engine import recipe as recipes
from okdph.names import BACKBONES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke_calibration.py"


def load_script():
    spec = importlib.util.spec_from_file_location("smoke_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["smoke_calibration"] = module
    spec.loader.exec_module(module)
    return module


def test_per_backbone_values():
    script = load_script()
    assert script.per_backbone(["4"], int, "epochs") == {b: 4 for b in BACKBONES}
    assert script.per_backbone(["4", "vgg16=8"], int, "epochs") == {**{b: 4 for b in BACKBONES}, "vgg16": 8}
    with pytest.raises(SystemExit, match="backbone must be one of densenet40_12, resnet110"):
        script.per_backbone(["resnet1000=2"], int, "epochs")


def test_a_backbone_without_a_smoke_recipe_starts_from_the_default():
    script = load_script()
    args = argparse.Namespace(epochs=["wrn20_8=6"], batch=[], lr=["wrn20_8=0.02"], schedule=[], warmup=[])
    chosen = script.candidate(args)
    assert chosen["wrn20_8"] == dataclasses.replace(recipes.SMOKE_DEFAULT, epochs=6, lr=0.02)
    assert set(chosen) == {*recipes.SMOKE_RECIPES, "wrn20_8"}  # the others as committed


@pytest.mark.slow
def test_the_candidate_and_the_flip_reach_every_run_and_nothing_else(tmp_path):
    before = dict(recipes.SMOKE_RECIPES)
    out = tmp_path / "calibration.json"
    result = load_script().main(["--method", "okdph", "--method", "dml", "--backbone", "resnet32", "--epochs", "1",
                                 "--batch", "resnet32=16", "--schedule", "step", "--flip", "on",
                                 "--train-samples", "48", "--out", str(out)])
    rows = result["rows"]
    assert {(r["method"], r["students"]) for r in rows} == {(m, n) for m in ("dml", "okdph") for n in (2, 3, 4)}
    for row in rows:
        assert row["backbone"] == "resnet32" and row["epochs"] == 1 and row["batch_size"] == 16
        assert row["schedule"] == "step" and len(row["per_epoch"]) == 1
        assert row["horizontal_flip"] is True  # the students' and the HWM's views alike
        assert 0.0 <= row["best_acc"] <= 100.0 and row["wall_s"] > 0
    assert any("cutout" in row["views"] and "augment" in row["views"] for row in rows if row["method"] == "okdph")
    assert json.loads(out.read_text())["runs"] == len(rows)
    # the process is as before: the committed recipes and the digits without flips
    assert recipes.SMOKE_RECIPES == before
    assert get_info("digits").mirror_invariant is False
