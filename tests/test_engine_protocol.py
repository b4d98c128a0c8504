"""The execution layer's contracts: one driver (a single run is a pack of one), the identity of a run
declared once on RunConfig, the meters every engine shares, and what a strategy must provide."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch

from okdph.bench.store import ResultStore
from okdph.data import get_info
from okdph.engine.protocol import Meters, top1_accuracy
from okdph.engine.record import outcome
from okdph.config import CELL_FIELDS
from okdph.engine.run import RunConfig, pack_key, train_packed, train_run
from okdph.errors import ConfigError
from okdph.strategy import build_config, check_heads, get_strategy


def tiny(tmp_path, **kw) -> RunConfig:
    return RunConfig(**{"method": "dml", "profile": "pipeline", "epochs": 1, "train_samples": 64, "width": 0.125,
                        "device": "cpu", "engine": "reference", "deterministic": True, "out_dir": str(tmp_path),
                        **kw})


def test_a_pack_of_one_writes_the_record_a_single_run_writes(tmp_path):
    torch.set_num_threads(1)
    single = train_run(tiny(tmp_path / "single"), progress=False)
    (packed,) = train_packed([tiny(tmp_path / "pack")], progress=False).values()
    assert outcome(packed) == outcome(single)
    assert packed["timing"]["execution"] == single["timing"]["execution"] == {"engine": "reference", "workers": 0}


# ---- one definition of "the same run" -----------------------------------------------------------

CHANGES = {  # a different value for every field of RunConfig
    "method": "kdcl", "backbone": "vgg16", "dataset": "synthetic10", "setting": "noisy", "students": 3,
    "overrides": (("temperature", "2"),), "fidelity": "paper", "profile": "quick", "epochs": 7, "seed": 7,
    "width": 0.5, "engine": "fast", "precision": "fp64", "deterministic": False, "device": "cuda",
    "data_root": "elsewhere", "download": True, "workers": 3, "train_samples": 10, "out_dir": "other",
    "ddp": True, "save_every": 2, "checkpoint_every": 3, "extra": {"note": "x"},
}


def test_every_field_of_a_run_says_whether_it_identifies_the_run():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(RunConfig)}, "a new field needs a CHANGES entry"
    base = tiny("runs", dataset="digits")
    for name, value in CHANGES.items():
        other = replace(base, **{name: value})
        role = next(f for f in dataclasses.fields(RunConfig) if f.name == name).metadata.get("identity")
        same_run = other.identity() == base.identity()
        if role is None:   # where and how it executes: the same run, packable only with equal settings
            assert same_run and other.run_id() == base.run_id(), name
            assert other.cell_key() == base.cell_key(), name
            assert (pack_key(other) == pack_key(base)) == (name == "extra"), name
        elif role == "cell":
            assert not same_run and other.run_id() != base.run_id(), name
            assert other.cell_key() != base.cell_key() and pack_key(other) != pack_key(base), name
        elif role == "seed":
            assert other.run_id() != base.run_id(), name
            assert other.cell_key() == base.cell_key() and pack_key(other) == pack_key(base), name
        else:  # engine: another run of the same cell, never in the same pack
            assert role == "engine" and other.run_id() != base.run_id(), name
            assert other.cell_key() == base.cell_key() and pack_key(other) != pack_key(base), name


def test_the_result_store_finds_a_cells_records_by_the_declared_cell_fields(tmp_path):
    store = ResultStore(tmp_path)
    store.runs_dir.mkdir(parents=True)
    cell = tiny(store.runs_dir)
    recorded = [replace(cell, seed=s) for s in (42, 43)] + [replace(cell, seed=42, students=3)]
    for cfg in recorded:  # what a record holds of its run: the run id and the identity fields
        (store.runs_dir / f"{cfg.run_id()}.json").write_text(
            json.dumps({"run_id": cfg.run_id(), "schema": 1, **cfg.identity()}))
    found = store.records_for(cell)
    assert [r["seed"] for r in found] == [42, 43] and all(r["students"] == 2 for r in found)
    assert {f: found[0][f] for f in CELL_FIELDS if f in found[0]} == cell.identity("cell")


# ---- meters and test accuracy, one implementation for one run or P ---------------------------------

def test_meters_of_a_pack_are_the_meters_of_each_run():
    torch.manual_seed(0)
    losses = {"ce": torch.rand(3), "kd": torch.rand(3)}
    heads = {"student0": torch.randn(3, 5, 4)}
    targets = torch.randint(0, 4, (3, 5))
    packed = Meters(3, "cpu")
    packed.add(losses, losses["ce"] + losses["kd"], heads, targets, step=0)
    packed.samples = 5
    for p, summary in enumerate(packed.summaries()):
        alone = Meters(1, "cpu")
        alone.add({k: v[p] for k, v in losses.items()}, losses["ce"][p], {"student0": heads["student0"][p]},
                  targets[p], step=0)
        alone.samples = 5
        assert alone.summaries() == [summary]


def test_meters_name_the_first_step_whose_loss_was_not_finite():
    meters = Meters(2, "cpu")
    for step, total in enumerate([torch.tensor([1.0, 1.0]), torch.tensor([float("nan"), 1.0]),
                                  torch.tensor([float("inf"), float("inf")])]):
        meters.add({"ce": total}, total, {"s": torch.zeros(2, 1, 2)}, torch.zeros(2, 1, dtype=torch.long), step)
    meters.samples = 3
    assert [s["diverged_step"] for s in meters.summaries()] == [1, 2]


def test_top1_accuracy_per_run():
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])  # (P=2, B=2, C=2)
    y = torch.tensor([1, 0])
    assert top1_accuracy(lambda x: {"s": logits}, [(None, y)], runs=2) == [{"s": 100.0}, {"s": 50.0}]


# ---- the strategy contract ----------------------------------------------------------------------

def make(method="dml"):
    cls = get_strategy(method)
    return cls(config=build_config(cls.Config), backbone="resnet32", num_classes=10, num_models=2,
               dataset=get_info("digits"), width=0.125)


def test_mismatched_head_names_are_one_line_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(get_strategy("dml"), "head_names", lambda self: ["student0", "student1", "ensemble"])
    with pytest.raises(ConfigError, match=r"head_names\(\) declares student0, student1, ensemble but "
                                          r"eval_heads returns student0, student1; make them agree"):
        train_run(tiny(tmp_path), progress=False)
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.ckpt.pt"))


def test_a_deployed_head_that_is_not_a_head_is_refused(monkeypatch):
    strategy = make()
    monkeypatch.setattr(type(strategy), "deployed_head", "ensemble")
    with pytest.raises(ConfigError, match="deployed_head 'ensemble' is not one of its heads"):
        check_heads(strategy, torch.zeros(2, 3, 32, 32))


def test_a_strategy_without_students_gets_a_clear_error_from_the_defaults():
    strategy = make()
    del strategy.students
    with pytest.raises(ConfigError, match="'dml' has no students: build self.students"):
        strategy.optimizer_groups()
    assert not strategy.has_students()
