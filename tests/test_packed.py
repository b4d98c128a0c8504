"""Packed runs: P seeds trained as one vmapped step equal the same seeds trained one by one."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from okdph.data import get_info
from okdph.engine.checkpoint import Preempted
from okdph.engine.fast import FastEngine
from okdph.engine.packed import PackedFastEngine
from okdph.engine.recipe import resolve_recipe
from okdph.engine.record import outcome
from okdph.engine.run import RunConfig, checkpoint_path, train_packed, train_run
from okdph.strategy import ConfigError, build_config, get_strategy

from conftest import RandomImages, stop_at

SEEDS = (42, 43, 44)
CASES = [  # (method, overrides, fidelity, fused)
    ("okdph", {"interval": "1e"}, "official", False),
    ("okdph", {"interval": "1b"}, "official", True),
    ("okdph", {"interval": "1b", "coefficients": "mean"}, "paper", True),  # HWM gradient to the students
    ("dml", {}, "official", True),
    ("kdcl", {}, "official", False),
    ("base", {}, "official", True),
    ("one", {}, "official", False),
    ("one", {}, "official", True),  # fused branches on a shared trunk output
    ("okddip", {}, "official", False),
    ("ffl", {}, "official", False),
    ("pcl", {}, "official", False),
    ("pcl", {}, "paper", False),  # the temporal-mean EMA hook
    ("pcl", {}, "paper", True),   # ... over fused branches
]


def build(method, overrides, fidelity, seed):
    torch.manual_seed(seed)  # as a single run: seeded, then built
    cls = get_strategy(method)
    return cls(config=build_config(cls.Config, overrides), backbone="resnet32", num_classes=10, num_models=2,
               dataset=get_info("cifar10"), fidelity=fidelity, width=0.125).double()


def state(strategy):
    return {k: v.detach().double() for k, v in strategy.state_dict().items()}


@pytest.mark.parametrize("method, overrides, fidelity, fused", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'fused' if c[3] else 'separate'}-{i}" for i, c in enumerate(CASES)])
def test_packed_runs_equal_the_same_runs_trained_alone(method, overrides, fidelity, fused):
    compare_packed_with_alone(method, overrides, fidelity, fused)


def test_packed_noisy_runs_draw_their_own_noise_as_alone():
    compare_packed_with_alone("dml", {}, "official", False, noise=(0.0, 1.0))


def compare_packed_with_alone(method, overrides, fidelity, fused, noise=None):
    info = get_info("cifar10")
    recipe = resolve_recipe("paper", "cifar10").with_epochs(300)
    train, test = RandomImages(20, info, 0), RandomImages(12, info, 1)
    kw = dict(graphs=False, fuse=fused, noise=noise)

    alone = []
    for seed in SEEDS:
        strategy = build(method, overrides, fidelity, seed)
        engine = FastEngine(strategy, train, test, recipe, "cpu", seed=seed, **kw)
        log = []
        for epoch in range(2):
            (trained,), (tested,) = engine.train_epoch(epoch), engine.evaluate()
            log.append((trained, tested))
            engine.end_epoch(epoch)
        alone.append((log, state(strategy)))

    strategies = [build(method, overrides, fidelity, seed) for seed in SEEDS]
    packed = PackedFastEngine(strategies, train, test, recipe, "cpu", seeds=SEEDS, **kw)
    logs = [[] for _ in SEEDS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            for p, result in enumerate(zip(packed.train_epoch(epoch), packed.evaluate())):
                logs[p].append(result)
            packed.end_epoch(epoch)
    packed.write_back()
    # Every op of the packed step has a vmap batching rule: none runs once per run (on a GPU, P
    # small kernels instead of one).
    fallbacks = {str(w.message).split("batching rule for ")[1].split(".")[0]
                 for w in caught if "batching rule for" in str(w.message)}
    assert not fallbacks, fallbacks

    for p, (log, final) in enumerate(alone):
        for (train_a, test_a), (train_b, test_b) in zip(log, logs[p]):
            assert train_b["acc"] == train_a["acc"] and test_b == test_a
            for name, value in train_a["loss"].items():
                assert train_b["loss"][name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
        mine = state(strategies[p])
        for name, value in final.items():
            assert torch.allclose(mine[name], value, rtol=1e-9, atol=1e-12), (p, name)
    # the runs really differ (their own seeds), so equality above is per run, not by accident
    first = next(name for name, _ in strategies[0].named_parameters())
    assert not torch.equal(state(strategies[0])[first], state(strategies[1])[first])


def test_packed_runs_draw_their_own_data_order():
    info = get_info("cifar10")
    strategies = [build("dml", {}, "official", s) for s in SEEDS]
    packed = PackedFastEngine(strategies, RandomImages(20, info, 0), RandomImages(4, info, 1),
                              resolve_recipe("paper", "cifar10"), "cpu", seeds=SEEDS, graphs=False)
    packed.train_epoch(0)  # the epoch's views stay in the engine's buffers
    single = FastEngine(build("dml", {}, "official", 43), RandomImages(20, info, 0), RandomImages(4, info, 1),
                        resolve_recipe("paper", "cifar10"), "cpu", seed=43, graphs=False)
    single.train_epoch(0)
    assert torch.equal(packed.epoch_views[1], single.epoch_views)
    assert torch.equal(packed.epoch_targets[1], single.epoch_targets)
    assert not torch.equal(packed.epoch_views[0], packed.epoch_views[1])


# ---- a pack end to end: records, resume ---------------------------------------------------------



def pipeline(tmp_path, seed, **kw):
    return RunConfig(method="dml", profile="pipeline", epochs=2, train_samples=256, seed=seed, engine="fast",
                     device="cpu", out_dir=str(tmp_path), **kw)


@pytest.mark.slow
def test_a_pack_writes_one_record_per_run_matching_the_runs_trained_alone(tmp_path):
    torch.set_num_threads(1)
    cfgs = [pipeline(tmp_path / "packed", s) for s in SEEDS]
    records = train_packed(cfgs, progress=False)
    assert sorted(records) == sorted(c.run_id() for c in cfgs)
    for cfg in cfgs:
        record = records[cfg.run_id()]
        assert cfg.record_path().exists() and not cfg.lock_path().exists()
        assert record["timing"]["execution"]["packed_seeds"] == list(SEEDS)
        alone = train_run(pipeline(tmp_path / "alone", cfg.seed), progress=False)
        assert record["run_id"] == alone["run_id"] and record["status"] == "complete"
        assert len(record["history"]["test_acc"]["student0"]) == 2
        # The same run, up to fp32 rounding: a batched convolution rounds differently from a plain one,
        # and 16 steps of a quarter-width network amplify that to about 1 % (in float64 the two are
        # equal: test_packed_runs_equal_the_same_runs_trained_alone).
        for name, losses in alone["history"]["train_loss"].items():
            assert record["history"]["train_loss"][name][0] == pytest.approx(losses[0], rel=0.05), name
    assert not checkpoint_path(cfgs).exists()
    assert train_packed(cfgs, progress=False) == {}  # all recorded: nothing to do


@pytest.mark.slow
def test_an_interrupted_pack_resumes_to_the_same_records(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    whole = train_packed([pipeline(tmp_path / "whole", s) for s in SEEDS[:2]], progress=False)
    cfgs = [pipeline(tmp_path / "cut", s) for s in SEEDS[:2]]
    calls = {"n": 0}
    original = PackedFastEngine.end_epoch

    def end_epoch_then_die(self, epoch):
        original(self, epoch)
        calls["n"] += 1
        if calls["n"] == 2:  # in epoch 1, after the epoch-0 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(PackedFastEngine, "end_epoch", end_epoch_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_packed(cfgs, progress=False)
    assert checkpoint_path(cfgs).exists() and not any(c.record_path().exists() for c in cfgs)
    monkeypatch.setattr(PackedFastEngine, "end_epoch", original)
    resumed = train_packed(cfgs, progress=False)
    for cfg, (run_id, record) in zip(cfgs, sorted(whole.items())):
        mine = resumed[cfg.run_id()]
        assert mine["resumes"] and mine["resumes"][0]["epoch"] == 1
        assert outcome(mine) == outcome(record)


@pytest.mark.slow
def test_a_preempted_pack_resumes_mid_epoch_to_the_same_records(tmp_path, monkeypatch):
    """SIGTERM inside an epoch and at its end: the pack checkpoints where it is and resumes to records
    whose outcome equals an uninterrupted pack's."""
    torch.set_num_threads(1)
    whole = train_packed([pipeline(tmp_path / "whole", s) for s in SEEDS[:2]], progress=False)
    cfgs = [pipeline(tmp_path / "cut", s) for s in SEEDS[:2]]
    # A pack asks whether to stop after each of its 8 steps an epoch and at each epoch end: call 2
    # stops epoch 0 after its second step; resumed there, call 7 is epoch 0's end.
    points = [2, 7]
    for point in points:
        with monkeypatch.context() as patch:
            stop_at(patch, point)
            with pytest.raises(Preempted, match="SIGTERM"):
                train_packed(cfgs, progress=False)
        assert checkpoint_path(cfgs).exists() and not any(c.record_path().exists() for c in cfgs)
    resumed = train_packed(cfgs, progress=False)
    for cfg in cfgs:
        mine = resumed[cfg.run_id()]
        assert [(r["epoch"], r["step"]) for r in mine["resumes"]] == [(0, 2), (1, 0)]
        assert outcome(mine) == outcome(whole[cfg.run_id()])
    assert not checkpoint_path(cfgs).exists()


def test_a_pack_refuses_runs_that_differ_beyond_the_seed(tmp_path):
    with pytest.raises(ConfigError, match="only in their seed"):
        train_packed([pipeline(tmp_path, 1), pipeline(tmp_path, 2, students=3)], progress=False)
    with pytest.raises(ConfigError, match="fast engine"):
        train_packed([pipeline(tmp_path, s, ).__class__(**{**pipeline(tmp_path, s).__dict__, "engine": "reference"})
                      for s in (1, 2)], progress=False)


@pytest.mark.slow
def test_the_runner_packs_the_seeds_of_each_cell(tmp_path):
    from okdph.bench.runner import Execution, TableChoices, run_table

    summary = run_table(TableChoices.of("4", profile="pipeline", engine="fast"),
                        Execution(progress=False, pack_size=5), seeds=2, methods=("dml",), results=str(tmp_path))
    assert summary.trained == summary.runs and not summary.failed
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(records) == summary.runs
    for record in records:
        assert record["timing"]["execution"]["packed_runs"] == 2, record["run_id"]
    with pytest.raises(ConfigError, match="--pack"):
        run_table(TableChoices.of("4", profile="pipeline"), Execution(pack_size=0, progress=False), methods=("dml",),
                  results=str(tmp_path))
