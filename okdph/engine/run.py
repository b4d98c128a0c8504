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
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from okdph import data as okdata
from okdph.engine import distributed, reference
from okdph.engine.checkpoint import save_trajectory_point, trajectory_dir
from okdph.engine.recipe import SMOKE_DATASET, SMOKE_WIDTH, resolve_recipe
from okdph.engine.record import SCHEMA_VERSION, atomic_write_json, provenance, summarise
from okdph.models import list_backbones
from okdph.strategy import FIDELITIES, ConfigError, build_config, config_to_dict, get_strategy

ENGINES = ("auto", "reference", "fast")  # auto: fast on CUDA, reference on CPU
PRECISIONS = ("fp32", "bf16")


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
    precision: str = "fp32"          # bf16 autocast needs the fast engine
    deterministic: bool = False
    device: str = "auto"
    data_root: str = "data"
    download: bool = False
    workers: int | None = None       # DataLoader workers; None: 0 for in-process small data, else 8
    train_samples: int | None = None  # use the first N training images; None: the profile's (smoke cuts)
    out_dir: str = "runs"
    ddp: bool = False                # one process of a torchrun job (engine/distributed.py); not identity
    save_every: int | None = None    # keep the students' weights every E epochs (trajectory); not identity
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
    if cfg.resolved_engine() == "reference" and cfg.precision != "fp32":
        raise ConfigError("the reference engine runs fp32 only; use --engine fast for bf16")
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


def train_run(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Train one run and write its record to `cfg.record_path()`; returns the record."""
    strategy_cls, config = validate(cfg)
    dataset = cfg.resolved_dataset()
    recipe = resolve_recipe(cfg.profile, dataset, cfg.epochs)
    device = distributed.setup(cfg.device) if cfg.ddp else resolve_device(cfg.device)
    out_path = cfg.record_path()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_path.parent, os.W_OK):
        raise ConfigError(f"results folder '{out_path.parent}' is not writable")
    seed_everything(cfg.seed, cfg.deterministic, device)

    info = okdata.get_info(dataset)
    strategy = build_strategy(strategy_cls, config, cfg, info).to(device)
    views = strategy.views()
    train_set = okdata.build_train_set(dataset, cfg.data_root, views, setting=cfg.setting,
                                       download=cfg.download)
    test_set = okdata.build_test_set(dataset, cfg.data_root, setting=cfg.setting, download=cfg.download)
    train_cap = cfg.train_samples if cfg.train_samples is not None else recipe.train_samples
    train_set, test_set = _first(train_set, train_cap), _first(test_set, recipe.test_samples)
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
    if cfg.save_every is not None and (not cfg.ddp or distributed.is_main_process()):
        trajectory = (trajectory_dir(out_path), {
            "run_id": cfg.run_id(), "method": cfg.method, "backbone": cfg.backbone,
            "num_classes": info.num_classes, "width": cfg.resolved_width(), "dataset": dataset,
            "setting": cfg.setting, "train_size": len(train_set), "seed": cfg.seed})
        save_trajectory_point(trajectory[0], 0, strategy, trajectory[1])

    heads = strategy.head_names()
    history = {"test_acc": {h: [] for h in heads}, "train_acc": {}, "train_loss": {}, "lr": [],
               "epoch_s": [], "train_s": []}
    status, train_s, eval_s, samples = "complete", 0.0, 0.0, 0
    started = time.perf_counter()
    bar = tqdm(range(recipe.epochs), desc=cfg.run_id()[:48], unit="ep", disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.perf_counter()
        history["lr"].append(engine.current_lr())
        train = engine.train_epoch(epoch)
        t1 = time.perf_counter()
        test_acc = engine.evaluate()
        t2 = time.perf_counter()
        engine.end_epoch(epoch)
        strategy.after_epoch(epoch=epoch)

        train_s, eval_s, samples = train_s + (t1 - t0), eval_s + (t2 - t1), samples + train["samples"]
        for name, value in train["loss"].items():
            history["train_loss"].setdefault(name, []).append(value)
        for name, value in train["acc"].items():
            history["train_acc"].setdefault(name, []).append(value)
        for name in heads:
            history["test_acc"][name].append(test_acc[name])
        history["epoch_s"].append(time.perf_counter() - t0)
        history["train_s"].append(t1 - t0)
        if trajectory is not None and ((epoch + 1) % cfg.save_every == 0 or epoch + 1 == recipe.epochs):
            save_trajectory_point(trajectory[0], epoch + 1, strategy, trajectory[1])
        bar.set_postfix(acc=f"{max(test_acc.values()):.2f}", loss=f"{sum(train['loss'].values()):.3f}")
        if not all(np.isfinite(v) for v in train["loss"].values()):
            status = f"diverged at epoch {epoch}"
            break
    bar.close()

    record = {
        "schema": SCHEMA_VERSION,
        "run_id": cfg.run_id(),
        "status": status,
        **cfg.identity(),
        "hparams": config_to_dict(config),
        "method_notes": strategy.describe(),
        "recipe": recipe.to_dict(),
        "views": views,
        "heads": heads,
        "deployed_head": strategy.deployed_head,
        "deterministic": cfg.deterministic,
        "data": {"root": str(cfg.data_root), "train_size": len(train_set), "test_size": len(test_set),
                 "workers": workers},
        "history": history,
        "metrics": summarise(history["test_acc"], strategy.deployed_head),
        "timing": {"wall_s": time.perf_counter() - started, "train_s": train_s, "eval_s": eval_s,
                   "train_samples_per_s": samples / train_s if train_s > 0 else None},
        "provenance": provenance(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": cfg.extra,
    }
    if cfg.ddp:
        record["distributed"] = engine.describe()
        distributed.teardown()
    if not cfg.ddp or distributed.is_main_process():  # under DDP only rank 0 writes
        atomic_write_json(out_path, record)
    return record

