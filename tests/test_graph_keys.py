"""The fast engine's CUDA-graph bookkeeping, on the CPU (okdph.engine.fast.FastEngine._run_step).

On a GPU each distinct step, as the strategy's `graph_key` and the batch size define it, runs
eagerly the first time, is captured the second time and replayed after that. A replay re-runs the
kernels recorded with the capture-time Python constants (epoch, step, batch size), so a key that
misses a constant makes later steps compute the captured step instead of their own.

Here `RecordingGraph` stands in for torch.cuda.CUDAGraph: capturing runs nothing and keeps the
step's Python constants, and each replay runs the step eagerly with those constants. That checks
which steps are eager, captured or replayed, and that replaying with the captured constants trains
exactly what eager execution trains. It cannot check what only a real graph does (kernels frozen at
capture, Python side effects of a hook that a replay does not repeat): benchmarks/gpu_check.py's
graph check does, on a GPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from okdph.data import get_info
from okdph.engine.fast import FastEngine
from okdph.engine.packed import PackedFastEngine
from okdph.engine.recipe import resolve_recipe
from okdph.okdph import OKDPH
from okdph.strategy import build_config, get_strategy, list_strategies

from conftest import RandomImages

BATCH = 4
IMAGES = 4 * BATCH + 2  # four full batches and a partial one of two images (BatchNorm needs two): steps 0-4


class RecordingGraph:
    """A captured step: the constants it was captured with, replayed eagerly."""

    def __init__(self, engine, batch, epoch, step):
        self.engine, self.args = engine, (batch, epoch, step)

    def replay(self):
        self.engine.events.append(("replay", self.args[2]))
        self.engine._step(*self.args)


def build(method, overrides=None, seed=0, fidelity="official"):
    torch.manual_seed(seed)
    cls = get_strategy(method)
    return cls(config=build_config(cls.Config, overrides or {}), backbone="resnet32", num_classes=10, num_models=2,
               dataset=get_info("cifar10"), fidelity=fidelity, width=0.125).double()


def recipe():
    return dataclasses.replace(resolve_recipe("paper", "cifar10"), batch_size=BATCH)


def record_graphs(engine):
    """Give `engine` graphs on the CPU: captures are RecordingGraphs, and every capture, replay and
    step run lands in `engine.events`, each `_run_step` call opening with ("call", step)."""
    engine.graphs_enabled = True
    engine.events = []
    step, run_step = engine._step, engine._run_step

    def logged_run_step(batch, epoch, s):
        engine.events.append(("call", s))
        run_step(batch, epoch, s)

    def logged_step(batch, epoch, s):
        engine.events.append(("run", s))
        step(batch, epoch, s)

    def capture(batch, epoch, s):
        engine.events.append(("capture", s))
        return RecordingGraph(engine, batch, epoch, s)

    engine._run_step, engine._step, engine._capture = logged_run_step, logged_step, capture
    return engine


def actions(events) -> list[str]:
    """What each `_run_step` call did: "eager", "capture" (and run it), or "replay <captured step>"."""
    calls, out = [], []
    for event in events:
        if event[0] == "call":
            calls.append([])
        else:
            calls[-1].append(event)
    for call in calls:
        kinds = [e[0] for e in call]
        if kinds == ["run"]:
            out.append("eager")
        elif kinds == ["capture", "replay", "run"]:
            out.append("capture")
        elif kinds == ["replay", "run"]:
            out.append(f"replay {call[0][1]}")
        else:
            raise AssertionError(f"unexpected step: {call}")
    return out


def train(engine, epochs):
    """Per epoch, what each step did."""
    per_epoch = []
    for epoch in range(epochs):
        engine.events = []
        engine.train_epoch(epoch)
        engine.end_epoch(epoch)
        per_epoch.append(actions(engine.events))
    return per_epoch


@pytest.fixture(autouse=True)
def _one_thread():
    # Steps of a few images are Python overhead; on a shared CPU a second thread mostly waits. The
    # comparisons here are between runs in this process, so the thread count does not change them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weights(strategy):
    return {k: v.detach().clone() for k, v in strategy.state_dict().items()}


def test_batch_level_fusion_alternates_keys_and_the_partial_batch_gets_its_own():
    # OKDPH fusing every 2 batches: the key is (fusion step?, batch size), alternating True/False.
    strategy = build("okdph", {"interval": "2b"})
    info = get_info("cifar10")
    engine = record_graphs(FastEngine(strategy, RandomImages(IMAGES, info, 0), RandomImages(4, info, 1), recipe(), "cpu",
                                      seed=0, fuse=True))
    assert (engine.full_batches, engine.remainder) == (4, 2)
    assert train(engine, 3) == [
        # steps 0, 1 meet their key first, 2, 3 the second time; 4 is the partial batch's first
        ["eager", "eager", "capture", "capture", "eager"],
        ["replay 2", "replay 3", "replay 2", "replay 3", "capture"],
        ["replay 2", "replay 3", "replay 2", "replay 3", "replay 4"],
    ]
    assert set(engine.graphs) == {(True, BATCH), (False, BATCH), (True, 2)}
    assert engine.describe()["cuda_graphs"] == 3


def test_a_step_that_never_changes_has_one_graph_per_batch_size():
    engine = record_graphs(FastEngine(build("dml"), RandomImages(IMAGES, get_info("cifar10"), 0),
                                      RandomImages(4, get_info("cifar10"), 1), recipe(), "cpu", seed=0, fuse=True))
    assert train(engine, 2) == [
        ["eager", "capture", "replay 1", "replay 1", "eager"],
        ["replay 1", "replay 1", "replay 1", "replay 1", "capture"],
    ]
    assert set(engine.graphs) == {(None, BATCH), (None, 2)}


def test_an_epoch_keyed_step_is_captured_again_every_epoch():
    # ONE's distillation weight ramps up by epoch: the default key ("epoch", epoch).
    engine = record_graphs(FastEngine(build("one"), RandomImages(IMAGES, get_info("cifar10"), 0),
                                      RandomImages(4, get_info("cifar10"), 1), recipe(), "cpu", seed=0, fuse=True))
    first_epoch = ["eager", "capture", "replay 1", "replay 1", "eager"]
    assert train(engine, 2) == [first_epoch, first_epoch]
    # the partial batch's key is met once per epoch, so it is never captured
    assert set(engine.graphs) == {(("epoch", 0), BATCH), (("epoch", 1), BATCH)}


def eager_and_replayed(make_engine, epochs=2):
    """The same training twice, eagerly and with recorded graphs; returns both strategies' weights."""
    out = []
    for graphs in (False, True):
        engine, strategies = make_engine()
        if graphs:
            record_graphs(engine)
        for epoch in range(epochs):
            engine.train_epoch(epoch)
            engine.end_epoch(epoch)
        engine.write_back()
        assert engine.describe()["cuda_graphs"] == (len(engine.graphs) if graphs else 0)
        out.append([weights(s) for s in strategies])
    return out


def single(method, overrides=None, fidelity="official"):
    def make():
        info = get_info("cifar10")
        strategy = build(method, overrides, fidelity=fidelity)
        engine = FastEngine(strategy, RandomImages(IMAGES, info, 0), RandomImages(4, info, 1), recipe(), "cpu", seed=0,
                            fuse=True, graphs=False)
        return engine, [strategy]
    return make


CASES = [(m, None, "official") for m in list_strategies()] + [
    ("okdph", {"interval": "2b"}, "official"),  # batch-level fusion: the key is the fusion step
    ("okdph", {"interval": "2b"}, "paper"),     # ... with fresh Dirichlet coefficients every batch
    ("pcl", None, "paper"),                     # the temporal mean's step counter, a buffer
]


@pytest.mark.parametrize("method, overrides, fidelity", CASES,
                         ids=[f"{m}-{f}-{'-'.join(f'{k}{v}' for k, v in (o or {}).items()) or 'default'}"
                              for m, o, f in CASES])
def test_replaying_the_captured_steps_trains_what_eager_steps_train(method, overrides, fidelity):
    eager, replayed = eager_and_replayed(single(method, overrides, fidelity))
    for name, value in eager[0].items():
        assert torch.equal(replayed[0][name], value), name


def test_a_key_that_misses_the_fusion_step_trains_something_else(monkeypatch):
    # The check above can fail: with one key for fusion and ordinary steps, replays fuse at the
    # wrong steps.
    monkeypatch.setattr(OKDPH, "graph_key", lambda self, *, epoch, step: None)
    eager, replayed = eager_and_replayed(single("okdph", {"interval": "2b"}))
    assert any(not torch.equal(replayed[0][name], value) for name, value in eager[0].items())


def test_a_failed_capture_leaves_the_engine_eager_with_the_same_result():
    make = single("okdph", {"interval": "2b"})
    engine, (strategy,) = make()
    record_graphs(engine)
    engine._capture = lambda batch, epoch, step: engine.events.append(("capture", step))  # fails: None
    engine.events = []
    engine.train_epoch(0)
    # steps 0, 1 eager as always; the capture at step 2 fails, and from there every step is eager
    assert [e for e in engine.events if e[0] != "call"] == [("run", 0), ("run", 1), ("capture", 2),
                                                            ("run", 2), ("run", 3), ("run", 4)]
    assert engine.describe()["graphs_enabled"] is False and engine.describe()["cuda_graphs"] == 0
    eager_engine, (eager_strategy,) = make()
    eager_engine.train_epoch(0)
    for name, value in weights(eager_strategy).items():
        assert torch.equal(weights(strategy)[name], value), name


SEEDS = (42, 43)


@pytest.mark.slow
def test_a_pack_on_the_device_layout_replays_each_runs_own_data_and_steps():
    # The GPU layout of a pack: fused networks, graphs, every run's data from its own generator.
    info = get_info("cifar10")

    def pack():
        strategies = [build("okdph", {"interval": "2b"}, seed=s) for s in SEEDS]
        engine = PackedFastEngine(strategies, RandomImages(IMAGES, info, 0), RandomImages(4, info, 1), recipe(), "cpu",
                                  seeds=SEEDS, fuse=True, graphs=False)
        return engine, strategies

    # Eagerly, beside the second seed trained alone: in every epoch, each run's views are those of
    # its seed alone (the pack's per-run generators advance as a single run's does).
    eager, strategies = pack()
    alone = FastEngine(build("okdph", {"interval": "2b"}, seed=SEEDS[1]), RandomImages(IMAGES, info, 0),
                       RandomImages(4, info, 1), recipe(), "cpu", seed=SEEDS[1], fuse=True, graphs=False)
    assert [g.device for g in eager.generators] == [eager.device] * len(SEEDS)
    for epoch in range(2):
        eager.train_epoch(epoch)
        alone.train_epoch(epoch)
        assert torch.equal(eager.epoch_views[1], alone.epoch_views), epoch
        assert torch.equal(eager.epoch_targets[1], alone.epoch_targets), epoch
        assert not torch.equal(eager.epoch_views[0], eager.epoch_views[1])
        eager.end_epoch(epoch)
        alone.end_epoch(epoch)
    eager.write_back()

    # With graphs: the same weights for every run.
    replayed, replayed_strategies = pack()
    record_graphs(replayed)
    for epoch in range(2):
        replayed.train_epoch(epoch)
        replayed.end_epoch(epoch)
    replayed.write_back()
    assert set(replayed.graphs) == {(True, BATCH), (False, BATCH), (True, 2)}
    for p in range(len(SEEDS)):
        for name, value in weights(strategies[p]).items():
            assert torch.equal(weights(replayed_strategies[p])[name], value), (p, name)
