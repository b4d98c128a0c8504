"""Training runs end to end: resolve the configuration, build data, strategies and the engine,
train and test every epoch, and write the run records.

`train_run` (one run, behind `okdph-bench train`) and `train_packed` (a cell's seeds as one pack)
are what the harness calls. Both go through one driver, `train_locked`, for which a single run is a
pack of one; the engine (okdph.engine.protocol) answers per run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from okdph import data as okdata
from okdph.config import MAX_WIDTH, RunConfig
from okdph.engine import distributed, reference
from okdph.engine.checkpoint import (StopRequest, load_resume_checkpoint, restore_rng, save_resume_checkpoint,
                                     save_trajectory_point, trajectory_dir)
from okdph.engine.lock import RunLock, RunLocked
from okdph.engine.recipe import resolve_recipe
from okdph.engine.record import (SCHEMA_VERSION, atomic_write_json, git_revision, provenance, read_record,
                                 set_aside, summarise)
from okdph.errors import DamagedRecord
from okdph.models import image_size as backbone_image_size
from okdph.models import list_backbones
from okdph.strategy import ConfigError, build_config, check_heads, config_to_dict, get_strategy
from okdph.threads import usable_cores


PROGRESS_EVERY_S = 1.0  # the progress bar shows the step in flight at most this often (and at least, per step)


def validate(cfg: RunConfig):
    """Resolve what the configuration names against the registries before any work starts (its
    values were checked when it was made, RunConfig.__post_init__); returns the strategy class and
    its config (the hyper-parameters, checked by the method's Config)."""
    strategy_cls = get_strategy(cfg.method)
    if cfg.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{cfg.backbone}'; valid: {', '.join(list_backbones())}")
    dataset = cfg.resolved_dataset()
    if dataset not in okdata.dataset_names():
        raise ConfigError(f"unknown dataset '{dataset}'; valid: {', '.join(okdata.dataset_names())}")
    info = okdata.get_info(dataset)
    engine = cfg.resolved_engine()
    if engine == "reference" and cfg.precision == "bf16":
        raise ConfigError("the reference engine runs fp32 or fp64; use --engine fast for bf16")
    if engine == "fast" and cfg.precision == "fp64":
        raise ConfigError("the fast engine runs fp32 or bf16; use --engine reference for fp64")
    if cfg.ddp and engine != "reference":
        raise ConfigError("--ddp runs the reference engine; drop --engine fast")
    if engine == "fast" and not info.in_memory:
        raise ConfigError(f"the fast engine needs an in-memory dataset; use --engine reference for {dataset}")
    built_for = backbone_image_size(cfg.backbone)
    if built_for != info.image_size:
        raise ConfigError(f"backbone '{cfg.backbone}' does not fit dataset '{dataset}': it is built for "
                          f"{built_for}x{built_for} images, the dataset has {info.image_size}x{info.image_size}")
    width = cfg.resolved_width()
    if not (math.isfinite(width) and 0 < width <= MAX_WIDTH):
        raise ConfigError(f"width must be in (0, {MAX_WIDTH:g}], got {cfg.width}")
    resolve_device(cfg.device)
    resolve_recipe(cfg.profile, dataset, cfg.epochs, cfg.backbone)
    return strategy_cls, build_config(strategy_cls.Config, dict(cfg.overrides))


def check_memory(cfg: RunConfig, runs: int = 1) -> None:
    """Refuse a run whose estimated memory (okdph.engine.memory) exceeds what its device can give it.
    Asked where the run trains (check_before_work), not where it is planned: `plan` and SLURM
    submissions validate runs that other machines train."""
    from okdph.engine import memory

    dataset = cfg.resolved_dataset()
    batch_size = resolve_recipe(cfg.profile, dataset, cfg.epochs, cfg.backbone).batch_size
    device = resolve_device(cfg.device)
    info = okdata.get_info(dataset)
    element = 8 if cfg.precision == "fp64" else 4
    need = runs * memory.run_bytes(cfg.backbone, info.num_classes, cfg.resolved_width(), batch_size,
                                   info.image_size, cfg.students, element)
    have = memory.available_bytes(device)
    if have is not None and need > memory.HEADROOM * have:
        what = f"{cfg.students} networks of {cfg.backbone} at width {cfg.resolved_width():g}, batch {batch_size}"
        raise ConfigError(f"this run needs about {memory.gib(need)} of memory ({what}"
                          f"{f', {runs} seeds packed' if runs > 1 else ''}); "
                          f"{device.type} has {memory.gib(have)}{' free' if device.type == 'cpu' else ''}")


DEVICE_HELP = "auto, cpu, cuda, cuda:N"


def resolve_device(name: str) -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) stands for on this machine; ConfigError for
    anything else (torch knows device types this suite does not run on) or a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{name}'; valid: {DEVICE_HELP}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' is not available; this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed every RNG the run uses; with `deterministic`, ask for bitwise-repeatable kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
    torch.backends.cudnn.deterministic = deterministic
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)


def build_strategy(strategy_cls, config, cfg: RunConfig, info):
    return strategy_cls(config=config, backbone=cfg.backbone, num_classes=info.num_classes,
                        num_models=cfg.students, dataset=info, fidelity=cfg.fidelity,
                        width=cfg.resolved_width())


def _first(dataset, count: int | None):
    """The first `count` items of an in-memory dataset, as a copy of the same type with the same
    attributes (the pipeline profile's short epochs); the dataset itself when `count` is None."""
    if count is None or count >= len(dataset):
        return dataset
    head = copy.copy(dataset)
    if hasattr(dataset, "base"):  # the noisy wrapper: cut the arrays it wraps
        head.base = _first(dataset.base, count)
    else:
        head.images, head.targets = dataset.images[:count], dataset.targets[:count]
    return head


def build_data(cfg: RunConfig, views: list[str], recipe) -> tuple:
    """The run's training set (with its views) and test set, cut to the profile's sizes."""
    dataset = cfg.resolved_dataset()
    train_set = okdata.build_train_set(dataset, cfg.data_root, views, setting=cfg.setting, download=cfg.download)
    test_set = okdata.build_test_set(dataset, cfg.data_root, setting=cfg.setting, download=cfg.download)
    train_cap = cfg.train_samples if cfg.train_samples is not None else recipe.train_samples
    return _first(train_set, train_cap), _first(test_set, recipe.test_samples)


def check_last_batch(strategy, method: str, images: int, batch_size: int, probe_shape, device) -> None:
    """Some networks cannot train on a batch of one image: a normalisation layer in training mode
    needs more than one value per channel (ONE's BatchNorm1d gate, FFL's fusion BN on VGG's 1x1
    maps). When the last batch would be one image, a copy of the strategy tries one, with the random
    state restored afterwards: one ConfigError line before the first step instead of a crash at the
    end of the first epoch. The official loaders keep such a batch too; CIFAR never leaves one."""
    if images % batch_size != 1:
        return
    trial = copy.deepcopy(strategy).train()
    views = [torch.zeros(1, *probe_shape, device=device, dtype=reference.network_dtype(strategy))
             for _ in strategy.views()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            trial.forward_train(views, torch.zeros(1, dtype=torch.long, device=device), epoch=0, step=0)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        raise ConfigError(f"{images} training images in batches of {batch_size} leave a last batch of one image, "
                          f"which {method} cannot train on (a normalisation layer needs more than one value per "
                          f"channel); choose --train-samples so that the count is not one more than a multiple "
                          f"of {batch_size}") from None


def check_writable(folder: Path, *, create: bool = True) -> None:
    """Prove `folder` takes a file (os.access says yes to root on a read-only mount): create it and
    write a probe there; with `create=False`, create nothing and probe it, or the nearest folder
    above it that exists (the commands that check before working leave no trace when they refuse)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under a file, '{existing}'"
        raise ConfigError(f"results folder '{folder}' is not writable: it {where}")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise ConfigError(f"results folder '{folder}' is not writable: {exc.strerror or exc}") from None


def pack_key(cfg: RunConfig) -> tuple:
    """Runs with equal keys can train as one pack: the same cell, engine and execution settings."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.metadata.get("identity") is None and f.name != "extra"}
    return cfg.cell_key(), cfg.resolved_engine(), json.dumps(settings, sort_keys=True, default=str)


def checkpoint_path(cfgs: list[RunConfig]) -> Path:
    """The resume checkpoint of a run, or of a pack of runs (named after all of them)."""
    if len(cfgs) == 1:
        return cfgs[0].checkpoint_path()
    digest = hashlib.sha1("\n".join(c.run_id() for c in cfgs).encode()).hexdigest()[:8]
    return Path(cfgs[0].out_dir) / f"pack-{len(cfgs)}-{digest}.ckpt.pt"


def check_before_work(cfgs: list[RunConfig]) -> None:
    """Everything about these runs that can fail is checked before any of them trains."""
    for cfg in cfgs:
        validate(cfg)
    check_memory(cfgs[0], runs=len(cfgs))  # a pack's runs differ only in their seed, and train together
    if len(cfgs) > 1:
        if len({pack_key(c) for c in cfgs}) != 1:
            raise ConfigError("a pack's runs may differ only in their seed")
        if len({c.seed for c in cfgs}) != len(cfgs):
            raise ConfigError("a pack needs distinct seeds")
        if cfgs[0].ddp or cfgs[0].resolved_engine() != "fast":
            raise ConfigError("packed runs need the fast engine (--engine fast), without --ddp")
    git_revision()  # the provenance of the code this process loaded, read before training
    check_writable(cfgs[0].record_path().parent)
    for cfg in cfgs:
        is_done(cfg)  # a foreign or unreadable file where a record goes: refused before any work


def train_run(cfg: RunConfig, *, progress: bool = True, skip_recorded: bool = False) -> dict:
    """Train one run and write its record to `cfg.record_path()`; returns the record.

    The run holds `<run_id>.lock` while it trains, so concurrent workers on one results folder never
    train it twice (RunLocked: another live worker has it). With `skip_recorded`, a run whose record
    exists once the lock is held is not trained again (AlreadyRecorded). A resume checkpoint
    beside the record (a killed or preempted earlier attempt) is continued.
    """
    with removed_if_left_empty(cfg.record_path().parent):
        check_before_work([cfg])
        if cfg.ddp:  # torchrun starts each run once; every process trains
            return train_locked([cfg], progress)[cfg.run_id()]
        with RunLock(cfg.lock_path()):
            if skip_recorded and is_done(cfg):
                raise AlreadyRecorded(f"recorded meanwhile: {cfg.record_path()}")
            return train_locked([cfg], progress)[cfg.run_id()]


@contextmanager
def removed_if_left_empty(folder: Path):
    """The folders the block creates on the way to `folder` are removed again when it fails and
    leaves them empty: a run refused during set-up (a dataset missing, a strategy's own check)
    leaves no results folder behind. A folder holding anything is kept."""
    created, path = [], Path(folder)
    while not path.exists() and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:  # not empty (or gone): kept
                break
        raise


def train_packed(cfgs: list[RunConfig], *, progress: bool = True, skip_recorded: bool = True) -> dict[str, dict]:
    """Train runs that differ only in their seed as one pack (okdph.engine.packed) and write each
    run's record. Returns {run_id: record} for the runs trained here.

    Runs another worker holds, and with `skip_recorded` runs already recorded, are left out; a run
    with a resume checkpoint of its own (an earlier attempt alone) continues alone."""
    cfgs = list(cfgs)
    records = {}
    with removed_if_left_empty(cfgs[0].record_path().parent), ExitStack() as locks:
        check_before_work(cfgs)
        todo = []
        for cfg in cfgs:
            try:
                locks.enter_context(RunLock(cfg.lock_path()))
            except RunLocked:
                continue  # another worker trains it
            if skip_recorded and is_done(cfg):
                continue
            if len(cfgs) > 1 and cfg.checkpoint_path().exists():
                records.update(train_locked([cfg], progress))
                continue
            todo.append(cfg)
        if todo:
            records.update(train_locked(todo, progress))
    return records


class AlreadyRecorded(Exception):
    """With skip_recorded: the run's record appeared while this worker waited for it (not an error)."""


def is_done(cfg: RunConfig) -> bool:
    """Recorded, with the trajectory points when the configuration asks for them. A file at the
    record's path that is not this run's record is refused (ConfigError), never overwritten; a
    damaged one (unreadable, wrong types) is not a record: the run trains again and the file is
    set aside as `<name>.corrupt` when the new record is written."""
    if not cfg.record_path().exists():
        return False
    try:
        read_record(cfg.record_path(), cfg.run_id())
    except DamagedRecord:
        return False
    return cfg.save_every is None or trajectory_dir(cfg.record_path()).is_dir()


def new_history(heads: list[str]) -> dict:
    """A record's per-epoch history, empty."""
    return {"test_acc": {h: [] for h in heads}, "train_acc": {}, "train_loss": {}, "lr": [],
            "epoch_s": [], "train_s": []}


def new_run_state() -> dict:
    """A run's progress and counters, as the resume checkpoint keeps them."""
    return {"status": "complete", "epoch": 0, "train_s": 0.0, "eval_s": 0.0, "samples": 0, "wall_s": 0.0,
            "resumes": []}


def log_epoch(history: dict, run: dict, epoch: int, train: dict, test_acc: dict, *, train_s: float,
              eval_s: float, epoch_s: float) -> None:
    """Add one epoch to a run's history and counters; a non-finite loss marks the run diverged."""
    run["train_s"] += train_s
    run["eval_s"] += eval_s
    run["samples"] += train["samples"]
    for name, value in train["loss"].items():
        history["train_loss"].setdefault(name, []).append(value)
    for name, value in train["acc"].items():
        history["train_acc"].setdefault(name, []).append(value)
    for name in history["test_acc"]:
        history["test_acc"][name].append(test_acc[name])
    history["epoch_s"].append(epoch_s)
    history["train_s"].append(train_s)
    run["epoch"] = epoch + 1
    if train.get("diverged_step") is not None or not all(np.isfinite(v) for v in train["loss"].values()):
        step = train.get("diverged_step")
        run["status"] = f"diverged at epoch {epoch}" + (f", step {step}" if step is not None else "")


def trajectory_meta(cfg: RunConfig, info, train_size: int) -> dict:
    """What each trajectory point says about its run (the analyses rebuild the network from it)."""
    return {"run_id": cfg.run_id(), "method": cfg.method, "backbone": cfg.backbone,
            "num_classes": info.num_classes, "width": cfg.resolved_width(), "dataset": cfg.resolved_dataset(),
            "setting": cfg.setting, "train_size": train_size, "seed": cfg.seed}


def build_record(cfg: RunConfig, config, strategy, recipe, train_set, test_set, workers, history: dict,
                 run: dict, device, execution: dict) -> dict:
    """The run record (docs/protocol.md#run-records) of a finished run."""
    return {
        "schema": SCHEMA_VERSION,
        "run_id": cfg.run_id(),
        "status": run["status"],
        **cfg.identity(),
        "hparams": config_to_dict(config),
        "method_notes": strategy.describe(),
        "recipe": recipe.to_dict(),
        "views": strategy.views(),
        "heads": strategy.head_names(),
        "deployed_head": strategy.deployed_head,
        "deterministic": cfg.deterministic,
        "data": {"root": str(cfg.data_root), "train_size": len(train_set), "test_size": len(test_set),
                 "horizontal_flip": strategy.dataset.mirror_invariant,  # whether the flipping views flip
                 "workers": workers},
        "history": history,
        "metrics": summarise(history["test_acc"], strategy.deployed_head),
        "timing": {"wall_s": run["wall_s"], "train_s": run["train_s"], "eval_s": run["eval_s"],
                   "train_samples_per_s": run["samples"] / run["train_s"] if run["train_s"] > 0 else None,
                   "execution": execution},
        "resumes": run["resumes"],
        "provenance": provenance(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": cfg.extra,
    }


def build_engine(cfgs: list[RunConfig], strategies: list, train_set, test_set, recipe, device, workers: int):
    """The engine the configuration asks for: DDP, a pack of fast runs, one fast run, or the reference."""
    first = cfgs[0]
    if first.ddp:
        return distributed.DistributedEngine(strategies[0], train_set, test_set, recipe, device, seed=first.seed,
                                             workers=workers)
    if first.resolved_engine() == "reference":
        return reference.ReferenceEngine(strategies[0], train_set, test_set, recipe, device, seed=first.seed,
                                         workers=workers)
    from okdph.engine.fast import FastEngine  # imports the GPU augmentation only when used
    from okdph.engine.packed import PackedFastEngine

    noise = (train_set.noise_mean, train_set.noise_std) if first.setting == "noisy" else None
    if len(cfgs) == 1:
        return FastEngine(strategies[0], train_set, test_set, recipe, device, seed=first.seed,
                          precision=first.precision, noise=noise)
    return PackedFastEngine(strategies, train_set, test_set, recipe, device, seeds=[c.seed for c in cfgs],
                            precision=first.precision, noise=noise)


def train_locked(cfgs: list[RunConfig], progress: bool) -> dict[str, dict]:
    """Train runs that differ only in their seed (one run, or a pack) once the caller holds their
    locks (or under DDP, where torchrun starts the run once); writes and returns their records.

    Per epoch: the learning rate into each history, the engine's training epoch (a stop request
    mid-epoch checkpoints the position and hands over), the test, the schedules and hooks, then each
    run's log, divergence check, trajectory point and checkpoint. A diverged run's record ends at its
    epoch; the others go on. A resume checkpoint of the same runs continues where it was taken.
    A signal during set-up stops the run at once (checkpoint.StopRequest)."""
    stop = StopRequest(immediate=True)
    stop.install()
    try:
        return _train_locked(cfgs, progress, stop)
    finally:
        stop.restore()


class Training:
    """One call of `train_locked`, as named steps: `set_up` builds the strategies, data and engine;
    `resume` continues from a resume checkpoint of the same runs (or saves the first trajectory
    point); `run_epoch` trains, tests and logs one epoch; `finish` writes the records. What the
    steps share (the runs' histories and states, the engine) lives on the object."""

    def __init__(self, cfgs: list[RunConfig], progress: bool, stop: StopRequest) -> None:
        self.cfgs, self.first, self.progress, self.stop = cfgs, cfgs[0], progress, stop
        self.name = self.first.run_id() if len(cfgs) == 1 else f"pack of {len(cfgs)} ({self.first.run_id()}, ...)"
        self.writes = not self.first.ddp or distributed.is_main_process()  # under DDP only rank 0 writes
        self.resume_path = checkpoint_path(cfgs)

    def set_up(self) -> None:
        first = self.first
        strategy_cls, self.config = validate(first)
        self.info = okdata.get_info(first.resolved_dataset())
        self.recipe = resolve_recipe(first.profile, self.info.name, first.epochs, first.backbone)
        self.device = device = distributed.setup(first.device) if first.ddp else resolve_device(first.device)
        self.strategies = []
        for cfg in self.cfgs:  # each run's initialisation exactly as a run of its own draws it
            seed_everything(cfg.seed, cfg.deterministic, device)
            strategy = build_strategy(strategy_cls, self.config, cfg, self.info).to(device)
            if cfg.precision == "fp64":  # before the optimizers exist: they keep the weights they were given
                strategy.double()
            self.strategies.append(strategy)
        self.train_set, self.test_set = build_data(first, self.strategies[0].views(), self.recipe)
        size = self.info.image_size  # a blank probe: no data read, no random number drawn
        probe = torch.zeros(2, 3, size, size, device=device, dtype=reference.network_dtype(self.strategies[0]))
        check_heads(self.strategies[0], probe)
        check_last_batch(self.strategies[0], first.method, len(self.train_set), self.recipe.batch_size,
                         probe.shape[1:], device)
        # The dataset's default, but no more processes than this machine has cores (more only
        # slow the loading down, and torch warns about it)
        self.workers = first.workers if first.workers is not None else min(self.info.loader_workers,
                                                                           usable_cores())
        self.engine = build_engine(self.cfgs, self.strategies, self.train_set, self.test_set, self.recipe, device,
                                   self.workers)
        self.trajectories = None
        if first.save_every is not None and self.writes:
            self.trajectories = [(trajectory_dir(c.record_path()), trajectory_meta(c, self.info, len(self.train_set)))
                                 for c in self.cfgs]
        self.histories = [new_history(self.strategies[0].head_names()) for _ in self.cfgs]
        self.states = [new_run_state() for _ in self.cfgs]

    def resume(self) -> None:
        if not self.resume_path.exists():
            for (folder, meta), strategy in zip(self.trajectories or (), self.strategies):
                save_trajectory_point(folder, 0, strategy, meta)
            return
        saved = load_resume_checkpoint(self.resume_path, self.cfgs)
        self.engine.load_state_dict(saved["engine"])
        self.histories, self.states = saved["histories"], saved["runs"]
        for state in self.states:
            state["resumes"].append({"epoch": state["epoch"], "step": self.engine.step,
                                     "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     "cpu_threads": torch.get_num_threads(),  # results depend on it on CPU
                                     **({"packed": True} if len(self.cfgs) > 1 else {})})
        restore_rng(saved["rng"], self.device)
        tqdm.write(f"resuming {self.name} from {self.resume_path}: epoch {self.states[0]['epoch']}, "
                   f"step {self.engine.step}", file=sys.stderr)  # a resumed run says so, even with --quiet

    def checkpoint(self) -> None:
        if self.writes and self.first.checkpoint_every:
            elapsed = time.perf_counter() - self.session_start
            save_resume_checkpoint(self.resume_path, self.cfgs, engine=self.engine, histories=self.histories,
                                   runs=[{**s, "wall_s": s["wall_s"] + elapsed} for s in self.states],
                                   device=self.device)

    def run_epochs(self) -> None:
        """Every epoch left, under a progress bar; a stop request checkpoints and hands over."""
        self.live = [p for p, state in enumerate(self.states) if state["status"] == "complete"]
        self.session_start = time.perf_counter()
        self.stop.immediate = False  # from here a signal asks the run to stop after the step, with a checkpoint
        self.bar = tqdm(range(self.states[0]["epoch"], self.recipe.epochs), desc=self.name[:48], unit="ep",
                        disable=not self.progress, leave=False)
        self.shown = {"at": time.monotonic(), "acc": ""}
        try:
            for epoch in self.bar:
                self.run_epoch(epoch)
                if not self.live:  # every run diverged
                    break
                self.after_epoch(epoch + 1)
        finally:
            self.bar.close()
            self.stop.restore()  # the record is written without them: a signal now ends the process as usual

    def step_done(self) -> bool:
        """Asked by the engine after every step: stop? Also redraws the bar every second, so a long
        epoch shows its step (tqdm alone redraws per epoch)."""
        if self.progress and time.monotonic() - self.shown["at"] >= PROGRESS_EVERY_S:
            self.shown["at"] = time.monotonic()
            self.bar.set_postfix_str(f"step {self.engine.step}{self.shown['acc']}")
        return self.stop()

    def run_epoch(self, epoch: int) -> None:
        """Train, test, step the schedules and hooks, log each live run; a run that diverged leaves `live`."""
        t0 = time.perf_counter()
        for p in self.live:
            if len(self.histories[p]["lr"]) == epoch:  # not when resuming mid-epoch
                self.histories[p]["lr"].append(self.engine.current_lr())
        trained = self.engine.train_epoch(epoch, should_stop=self.step_done)
        if trained is None:  # stopped mid-epoch: keep the position and leave
            for p in self.live:
                self.states[p]["train_s"] += time.perf_counter() - t0
            self.checkpoint()
            self.stop.hand_over(f"{self.name}: stopped by {self.stop.signal_name} at epoch {epoch}, step "
                                f"{self.engine.step}; rerun the same command to resume from {self.resume_path}")
        t1 = time.perf_counter()
        tested = self.engine.evaluate()
        t2 = time.perf_counter()
        self.engine.end_epoch(epoch)
        for p in self.live:
            log_epoch(self.histories[p], self.states[p], epoch, trained[p], tested[p], train_s=t1 - t0,
                      eval_s=t2 - t1, epoch_s=time.perf_counter() - t0)
        self.shown["acc"] = f", acc {max(tested[0].values()):.2f}, loss {sum(trained[0]['loss'].values()):.3f}"
        self.bar.set_postfix_str(f"epoch {epoch + 1} done{self.shown['acc']}")
        self.live = [p for p in self.live if self.states[p]["status"] == "complete"]  # a diverged record ends here

    def after_epoch(self, done: int) -> None:
        """Trajectory points and the resume checkpoint at their intervals; a stop request hands over."""
        first, last = self.first, self.recipe.epochs
        if self.trajectories and (done % first.save_every == 0 or done == last):
            self.engine.write_back()
            for p in self.live:
                folder, meta = self.trajectories[p]
                save_trajectory_point(folder, done, self.strategies[p], meta)
        if first.checkpoint_every and done % first.checkpoint_every == 0 and done < last:
            self.checkpoint()
        if self.stop():  # preempted at an epoch boundary (or under DDP, which finishes its epoch)
            self.checkpoint()
            self.stop.hand_over(f"{self.name}: stopped by {self.stop.signal_name} after epoch {done - 1}; "
                                f"rerun the same command to resume from {self.resume_path}")

    def finish(self) -> dict[str, dict]:
        """The records, written (a damaged one at the same path set aside), and the checkpoint removed."""
        self.engine.write_back()
        elapsed = time.perf_counter() - self.session_start
        records = {}
        for p, cfg in enumerate(self.cfgs):
            self.states[p]["wall_s"] += elapsed
            records[cfg.run_id()] = build_record(
                cfg, self.config, self.strategies[p], self.recipe, self.train_set, self.test_set, self.workers,
                self.histories[p], self.states[p], self.device, execution=self.engine.describe())
        if self.first.ddp:
            distributed.teardown()
        if self.writes:
            for cfg in self.cfgs:
                if cfg.record_path().exists() and not is_done(replace(cfg, save_every=None)):
                    set_aside(cfg.record_path())  # a damaged record: kept beside the new one, never lost
                atomic_write_json(cfg.record_path(), records[cfg.run_id()])
            self.resume_path.unlink(missing_ok=True)  # after the records: a kill in between only re-writes them
        return records


def _train_locked(cfgs: list[RunConfig], progress: bool, stop: StopRequest) -> dict[str, dict]:
    training = Training(cfgs, progress, stop)
    training.set_up()
    training.resume()
    training.run_epochs()
    return training.finish()
