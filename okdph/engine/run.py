"""One training run, end to end: resolve the configuration, build data, strategy and optimizers,
train and test every epoch, and write the run record.

This is the library function behind `okdph-bench train`; the harness calls it for every run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from okdph import data as okdata
from okdph.engine import distributed, reference
from okdph.engine.checkpoint import (StopRequest, load_resume_checkpoint, restore_rng, save_resume_checkpoint,
                                     save_trajectory_point, trajectory_dir)
from okdph.engine.lock import RunLock
from okdph.engine.recipe import SMOKE_DATASET, SMOKE_WIDTH, resolve_recipe
from okdph.engine.record import (SCHEMA_VERSION, atomic_write_json, git_revision, provenance, read_record,
                                 summarise)
from okdph.models import list_backbones
from okdph.names import ENGINES, PRECISIONS
from okdph.strategy import FIDELITIES, ConfigError, build_config, config_to_dict, get_strategy


@dataclass(frozen=True)
class RunConfig:
    """Everything that identifies a run. Defaults follow the official code."""

    method: str
    backbone: str = "resnet32"
    dataset: str | None = None       # None: the profile's (digits for smoke); required otherwise
    setting: str = "standard"        # standard, noisy, limited10, limited1
    students: int = 2                # students or branches
    overrides: tuple[tuple[str, str], ...] = ()  # hyper-parameters as ("omega", "0.5") pairs
    fidelity: str = "official"
    profile: str = "paper"
    epochs: int | None = None        # None: the profile's
    seed: int = 42
    width: float | None = None       # None: 1.0, or the smoke profile's quarter width
    engine: str = "auto"
    precision: str = "fp32"          # bf16 autocast needs the fast engine; fp64 the reference engine
    deterministic: bool = False
    device: str = "auto"
    data_root: str = "data"
    download: bool = False
    workers: int | None = None       # DataLoader workers; None: 0 for in-process small data, else 8
    train_samples: int | None = None  # use the first N training images; None: the profile's (smoke cuts)
    out_dir: str = "runs"
    ddp: bool = False                # one process of a torchrun job (engine/distributed.py); not identity
    save_every: int | None = None    # keep the students' weights every E epochs (trajectory); not identity
    checkpoint_every: int = 1        # resume checkpoint every E epochs, 0: never; not identity
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes copied to the record

    def resolved_dataset(self) -> str:
        if self.dataset is not None:
            return self.dataset
        if self.profile == "smoke":
            return SMOKE_DATASET
        raise ConfigError("--dataset is required unless --profile smoke; valid: " + ", ".join(okdata.DATASETS))

    def resolved_width(self) -> float:
        if self.width is not None:
            return self.width
        return SMOKE_WIDTH if self.profile == "smoke" else 1.0

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        in_memory = self.resolved_dataset() != "imagenet"
        return "fast" if in_memory and not self.ddp and resolve_device(self.device).type == "cuda" else "reference"

    def identity(self) -> dict:
        """The fields that make two runs the same run (and so the same record)."""
        return {
            "method": self.method, "backbone": self.backbone, "dataset": self.resolved_dataset(),
            "setting": self.setting, "students": self.students, "overrides": dict(self.overrides),
            "fidelity": self.fidelity, "profile": self.profile, "epochs": self.epochs, "seed": self.seed,
            "width": self.resolved_width(), "engine": self.resolved_engine(), "precision": self.precision,
            **({"train_samples": self.train_samples} if self.train_samples is not None else {}),
        }

    def run_id(self) -> str:
        ident = self.identity()
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
        return (f"{self.method}-{self.backbone}-{ident['dataset']}-{self.setting}-n{self.students}"
                f"-{self.fidelity}-{self.profile}-seed{self.seed}-{digest}")

    def record_path(self) -> Path:
        return Path(self.out_dir) / f"{self.run_id()}.json"

    def lock_path(self) -> Path:
        return Path(self.out_dir) / f"{self.run_id()}.lock"

    def checkpoint_path(self) -> Path:
        return Path(self.out_dir) / f"{self.run_id()}.ckpt.pt"


def validate(cfg: RunConfig):
    """Check every name and value before any work starts; returns the strategy class and config."""
    strategy_cls = get_strategy(cfg.method)
    if cfg.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone '{cfg.backbone}'; valid: {', '.join(list_backbones())}")
    dataset = cfg.resolved_dataset()
    if dataset not in okdata.DATASETS:
        raise ConfigError(f"unknown dataset '{dataset}'; valid: {', '.join(okdata.DATASETS)}")
    if cfg.setting not in okdata.SETTINGS:
        raise ConfigError(f"unknown setting '{cfg.setting}'; valid: {', '.join(okdata.SETTINGS)}")
    if cfg.fidelity not in FIDELITIES:
        raise ConfigError(f"unknown fidelity '{cfg.fidelity}'; valid: {', '.join(FIDELITIES)}")
    if cfg.engine not in ENGINES:
        raise ConfigError(f"unknown engine '{cfg.engine}'; valid: {', '.join(ENGINES)}")
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{cfg.precision}'; valid: {', '.join(PRECISIONS)}")
    if cfg.resolved_engine() == "reference" and cfg.precision == "bf16":
        raise ConfigError("the reference engine runs fp32 or fp64; use --engine fast for bf16")
    if cfg.resolved_engine() == "fast" and cfg.precision == "fp64":
        raise ConfigError("the fast engine runs fp32 or bf16; use --engine reference for fp64")
    if cfg.ddp and cfg.resolved_engine() != "reference":
        raise ConfigError("--ddp runs the reference engine; drop --engine fast")
    if cfg.resolved_engine() == "fast" and dataset == "imagenet":
        raise ConfigError("the fast engine needs an in-memory dataset; use --engine reference for imagenet")
    if (dataset == "imagenet") != (cfg.backbone == "resnet18"):
        raise ConfigError(f"backbone '{cfg.backbone}' does not fit dataset '{dataset}'; "
                          "resnet18 is the ImageNet backbone, the others are CIFAR backbones")
    if cfg.students < 1:
        raise ConfigError(f"students must be >= 1, got {cfg.students}")
    if cfg.train_samples is not None and cfg.train_samples < 1:
        raise ConfigError(f"train_samples must be >= 1, got {cfg.train_samples}")
    if cfg.resolved_width() <= 0:
        raise ConfigError(f"width must be > 0, got {cfg.width}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 epochs (0: never), got {cfg.checkpoint_every}")
    if cfg.save_every is not None and cfg.save_every < 1:
        raise ConfigError(f"--save-every must be >= 1 epoch, got {cfg.save_every}")
    resolve_recipe(cfg.profile, dataset, cfg.epochs)
    return strategy_cls, build_config(strategy_cls.Config, dict(cfg.overrides))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
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


def engine_step(engine) -> int:
    """The next step of the epoch an engine has in flight (0 between epochs)."""
    progress = getattr(engine, "progress", None)
    return progress.step if progress is not None else getattr(engine, "step", 0)


def _first(dataset, count: int | None):
    """The first `count` items of an in-memory dataset, as a copy of the same type with the same
    attributes (the smoke profile's short epochs); the dataset itself when `count` is None."""
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


def check_writable(folder: Path) -> None:
    """Create `folder` and prove it takes a file (os.access says yes to root on a read-only mount)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise ConfigError(f"results folder '{folder}' is not writable: {exc.strerror or exc}") from None


def train_run(cfg: RunConfig, *, progress: bool = True, skip_recorded: bool = False) -> dict:
    """Train one run and write its record to `cfg.record_path()`; returns the record.

    The run holds `<run_id>.lock` while it trains, so concurrent workers on one results folder never
    train it twice (RunLocked: another live worker has it). With `skip_recorded`, a run whose record
    exists once the lock is held is not trained again (AlreadyRecorded). A resume checkpoint
    beside the record (a killed or preempted earlier attempt) is continued.
    """
    validate(cfg)
    git_revision()  # the provenance of the code this process loaded, read before training
    check_writable(cfg.record_path().parent)
    is_done(cfg)  # a foreign or unreadable file where the record goes: refused before any work
    if cfg.ddp:  # torchrun starts each run once; every process trains
        return train_locked(cfg, progress)
    with RunLock(cfg.lock_path()):
        if skip_recorded and is_done(cfg):
            raise AlreadyRecorded(f"recorded meanwhile: {cfg.record_path()}")
        return train_locked(cfg, progress)


class AlreadyRecorded(Exception):
    """With skip_recorded: the run's record appeared while this worker waited for it (not an error)."""


def is_done(cfg: RunConfig) -> bool:
    """Recorded, with the trajectory points when the configuration asks for them. A file at the
    record's path that is not this run's record is refused (ConfigError), never overwritten."""
    if not cfg.record_path().exists():
        return False
    read_record(cfg.record_path(), cfg.run_id())
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
                 run: dict, device, execution: dict | None = None) -> dict:
    """The run record (DESIGN.md §6) of a finished run."""
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
                 "workers": workers},
        "history": history,
        "metrics": summarise(history["test_acc"], strategy.deployed_head),
        "timing": {"wall_s": run["wall_s"], "train_s": run["train_s"], "eval_s": run["eval_s"],
                   "train_samples_per_s": run["samples"] / run["train_s"] if run["train_s"] > 0 else None,
                   **({"execution": execution} if execution is not None else {})},
        "resumes": run["resumes"],
        "provenance": provenance(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": cfg.extra,
    }


def train_locked(cfg: RunConfig, progress: bool) -> dict:
    """`train_run` once the caller holds the run's lock (or under DDP, where torchrun starts the run once)."""
    strategy_cls, config = validate(cfg)
    dataset = cfg.resolved_dataset()
    recipe = resolve_recipe(cfg.profile, dataset, cfg.epochs)
    device = distributed.setup(cfg.device) if cfg.ddp else resolve_device(cfg.device)
    out_path = cfg.record_path()
    seed_everything(cfg.seed, cfg.deterministic, device)

    info = okdata.get_info(dataset)
    strategy = build_strategy(strategy_cls, config, cfg, info).to(device)
    if cfg.precision == "fp64":  # before the optimizers exist: they keep the weights they were given
        strategy.double()
    views = strategy.views()
    train_set, test_set = build_data(cfg, views, recipe)
    workers = cfg.workers if cfg.workers is not None else (8 if dataset in ("cifar10", "cifar100", "imagenet") else 0)
    engine_name = cfg.resolved_engine()
    if cfg.ddp:
        engine = distributed.DistributedEngine(strategy, train_set, test_set, recipe, device, seed=cfg.seed,
                                               workers=workers)
    elif engine_name == "fast":
        from okdph.engine.fast import FastEngine  # imports the GPU augmentation only when used

        noise = (train_set.noise_mean, train_set.noise_std) if cfg.setting == "noisy" else None
        engine = FastEngine(strategy, train_set, test_set, recipe, device, seed=cfg.seed,
                            precision=cfg.precision, noise=noise)
    else:
        engine = reference.ReferenceEngine(strategy, train_set, test_set, recipe, device, seed=cfg.seed,
                                           workers=workers)

    trajectory = None
    if cfg.save_every is not None:
        trajectory = (trajectory_dir(out_path), trajectory_meta(cfg, info, len(train_set)))

    heads = strategy.head_names()
    history, run = new_history(heads), new_run_state()
    checkpoint_path = cfg.checkpoint_path()
    writes = not cfg.ddp or distributed.is_main_process()  # under DDP only rank 0 writes
    if checkpoint_path.exists():
        saved = load_resume_checkpoint(checkpoint_path, cfg)
        strategy.load_state_dict(saved["strategy"])
        engine.load_state_dict(saved["engine"])
        history, run = saved["history"], saved["run"]
        run["resumes"].append({"epoch": run["epoch"], "step": saved["step"],
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "cpu_threads": torch.get_num_threads()})  # results depend on it on CPU
        restore_rng(saved["rng"], device)
    elif trajectory is not None and writes:
        save_trajectory_point(trajectory[0], 0, strategy, trajectory[1])

    def checkpoint(step: int) -> None:
        if writes and cfg.checkpoint_every:
            save_resume_checkpoint(checkpoint_path, cfg, strategy=strategy, engine=engine, history=history,
                                   run={**run, "wall_s": run["wall_s"] + time.perf_counter() - session_start},
                                   step=step, device=device)

    session_start = time.perf_counter()
    stop = StopRequest()
    stop.install()
    bar = tqdm(range(run["epoch"], recipe.epochs), desc=cfg.run_id()[:48], unit="ep", disable=not progress,
               leave=False)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            if len(history["lr"]) == epoch:  # not when resuming mid-epoch
                history["lr"].append(engine.current_lr())
            train = engine.train_epoch(epoch, should_stop=stop)
            if train is None:  # preempted mid-epoch: keep the position and leave
                run["train_s"] += time.perf_counter() - t0
                checkpoint(step=engine_step(engine))
                stop.hand_over(f"{cfg.run_id()}: stopped by {stop.signal_name} at epoch {epoch}, "
                               f"step {engine_step(engine)}; rerun the same command to resume from {checkpoint_path}")
            t1 = time.perf_counter()
            test_acc = engine.evaluate()
            t2 = time.perf_counter()
            engine.end_epoch(epoch)
            strategy.after_epoch(epoch=epoch)

            log_epoch(history, run, epoch, train, test_acc, train_s=t1 - t0, eval_s=t2 - t1,
                      epoch_s=time.perf_counter() - t0)
            bar.set_postfix(acc=f"{max(test_acc.values()):.2f}", loss=f"{sum(train['loss'].values()):.3f}")
            if run["status"] != "complete":  # diverged
                break
            if trajectory is not None and writes and (run["epoch"] % cfg.save_every == 0
                                                      or run["epoch"] == recipe.epochs):
                save_trajectory_point(trajectory[0], run["epoch"], strategy, trajectory[1])
            if cfg.checkpoint_every and run["epoch"] % cfg.checkpoint_every == 0 and run["epoch"] < recipe.epochs:
                checkpoint(step=0)
            if stop():  # preempted at an epoch boundary (or under DDP, which finishes its epoch)
                checkpoint(step=0)
                stop.hand_over(f"{cfg.run_id()}: stopped by {stop.signal_name} after epoch {epoch}; "
                               f"rerun the same command to resume from {checkpoint_path}")
    finally:
        bar.close()
        stop.restore()
    run["wall_s"] += time.perf_counter() - session_start

    record = build_record(cfg, config, strategy, recipe, train_set, test_set, workers, history, run, device,
                          execution=engine.describe() if engine_name == "fast" and not cfg.ddp else None)
    if cfg.ddp:
        record["distributed"] = engine.describe()
        distributed.teardown()
    if writes:
        atomic_write_json(out_path, record)
        checkpoint_path.unlink(missing_ok=True)  # after the record: a kill in between only re-writes it
    return record

