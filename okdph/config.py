"""A run's configuration, declared once: `RunConfig`, whose fields carry everything the rest of the
code derives from them. Imports neither torch nor click, so the command line builds its options
from it and `--help` stays fast.

Each field's metadata (written with `option`) says:
- its identity role: "cell" (the experiment: runs that agree on every cell field are seeds of one
  table cell), "seed" (the replicate within a cell) or "engine" (how it executes: part of a run's
  identity, since numerics differ, but not of its cell); unmarked fields say where and how a run
  executes and never change its result. `RunConfig.identity()`, the run id, the pack key
  (okdph.engine.run.pack_key) and the result store's cell index all derive from the roles.
- `resolve`: the method that fills in a profile default; `new`: a field added after records
  existed, left out of the identity at its default so that those records keep their run ids.
- its command-line option (`flags`, `help`, `kind`, `choices`, `metavar`): okdph.cli builds
  `okdph-bench train`'s options from it, and okdph.bench.executors.train_command the `plan` line
  (`plan`: "always", "if_set" — when it differs from the default — or "never").

So a new field is one edit here (tests/test_config.py adds one in a subclass and finds it in the
command line, the run id and the plan line).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from okdph import names
from okdph.errors import ConfigError

__all__ = ["CELL", "CELL_FIELDS", "ENGINE", "SEED", "RunConfig", "cell_key", "option", "parse_run_id"]

CELL, SEED, ENGINE = "cell", "seed", "engine"
PLAN_MODES = ("always", "if_set", "never")

# The sizes a researcher could mean (the paper: 2-4 students, 300 epochs, width 1); beyond them a
# value is a typo that would otherwise run out of memory or train for ever.
MAX_MODELS = 16
MAX_EPOCHS = 10_000
MAX_WIDTH = 16.0
MAX_WORKERS = 256
MAX_SAMPLES = 10 ** 9


def option(role: str | None = None, default=dataclasses.MISSING, *, flags: tuple[str, ...] = (), help: str = "",
           kind: str = "str", choices=None, metavar: str | None = None, plan: str = "if_set",
           resolve: str | None = None, new: bool = False, default_factory=dataclasses.MISSING):
    """A RunConfig field: its identity role and its command-line option (see the module docstring).
    `kind`: str, int, float, bool (a flag), sets (repeated KEY=VALUE), or a type okdph.cli names
    (method, dataset, positive, seed, folder); `choices`: a closed set of names."""
    if plan not in PLAN_MODES:
        raise ValueError(f"plan must be one of {PLAN_MODES}, got {plan!r}")
    metadata = {"identity": role, "resolve": resolve, "new": new,
                "cli": {"flags": flags, "help": help, "kind": kind, "choices": choices, "metavar": metavar,
                        "plan": plan} if flags else None}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class RunConfig:
    """A run's configuration. Defaults follow the official code."""

    method: str = option(CELL, flags=("--method",), kind="method", plan="always",
                         help="Strategy name (see `okdph-bench list`).")
    backbone: str = option(CELL, "resnet32", flags=("--backbone",), choices=names.BACKBONES, plan="always")
    dataset: str | None = option(CELL, None, flags=("--dataset",), kind="dataset", plan="always",
                                 resolve="resolved_dataset",
                                 help="[default: digits with --profile smoke or pipeline; required otherwise]")
    setting: str = option(CELL, "standard", flags=("--setting",), choices=names.SETTINGS, plan="always")
    students: int = option(CELL, 2, flags=("--students", "--branches"), kind="int", plan="always",
                           help="Students, or branches for the multi-branch methods.")
    overrides: tuple[tuple[str, str], ...] = option(CELL, (), flags=("--set",), kind="sets", metavar="KEY=VALUE",
                                                    plan="always", resolve="resolved_overrides",
                                                    help="Hyper-parameter override, repeatable.")
    fidelity: str = option(CELL, "official", flags=("--fidelity",), choices=names.FIDELITIES, plan="always")
    profile: str = option(CELL, "paper", flags=("--profile",), choices=names.PROFILES, plan="always")
    epochs: int | None = option(CELL, None, flags=("--epochs",), kind="int",
                                help="Override the profile's epochs (milestones scale).")
    seed: int = option(SEED, 42, flags=("--seed",), kind="seed", plan="always")
    width: float | None = option(CELL, None, flags=("--width",), kind="positive", resolve="resolved_width",
                                 help="Channel multiplier [default: 1; smoke and pipeline: the profile's].")
    engine: str = option(ENGINE, "auto", flags=("--engine",), choices=names.ENGINES, plan="always",
                         resolve="resolved_engine", help="auto: fast for in-memory data in fp32/bf16, else reference.")
    precision: str = option(CELL, "fp32", flags=("--precision",), choices=names.PRECISIONS,
                            help="bf16: autocast, fast engine; fp64: reference engine, exact CPU checks.")
    deterministic: bool = option(None, False, flags=("--deterministic",), kind="bool",
                                 help="Bitwise-repeatable CPU runs, deterministic cuDNN.")
    device: str = option(None, "auto", flags=("--device",), plan="never", help="auto, cpu, cuda, cuda:N")
    data_root: str = option(None, "data", flags=("--data-root",), kind="folder", plan="always")
    download: bool = option(None, False, flags=("--download",), kind="bool",
                            help="Download CIFAR if missing (off by default).")
    workers: int | None = option(None, None, flags=("--workers",), kind="int",
                                 help="DataLoader workers [default: the dataset's: 8 for CIFAR/ImageNet, else 0].")
    train_samples: int | None = option(CELL, None, flags=("--train-samples",), kind="int", metavar="N", new=True,
                                       help="Train on the first N training images [default: all; the profile's cut].")
    out_dir: str = option(None, "results/runs", flags=("--out",), kind="folder", plan="always",
                          help="Where the record goes: the runs/ of the results folder that run, table and report read.")
    ddp: bool = option(None, False, flags=("--ddp",), kind="bool", plan="never",
                       help="One process of a torchrun job: data-parallel over its processes.")
    save_every: int | None = option(None, None, flags=("--save-every",), kind="int", metavar="E",
                                    help="Keep the students' weights every E epochs in <out>/<run>.traj/ "
                                         "(PAC-Bayes, landscape).")
    checkpoint_every: int = option(None, 1, flags=("--checkpoint-every",), kind="int", metavar="E",
                                   help="Resume checkpoint every E epochs (0: never); a rerun of the same "
                                        "command resumes.")
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes copied to the record

    def __post_init__(self):
        """Every value checked once, when the configuration is made (one line naming what is valid);
        what needs a registry or the machine (method, backbone, dataset, device) is resolved by
        okdph.engine.run.validate before any work."""
        for name, valid in (("setting", names.SETTINGS), ("fidelity", names.FIDELITIES), ("engine", names.ENGINES),
                            ("precision", names.PRECISIONS), ("profile", names.PROFILES)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"unknown {name} '{getattr(self, name)}'; valid: {', '.join(valid)}")
        _check_range("students", self.students, 1, MAX_MODELS)
        if self.train_samples is not None:
            _check_range("train_samples", self.train_samples, 1, MAX_SAMPLES)
        if self.epochs is not None:
            _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        if self.width is not None and not (isinstance(self.width, (int, float)) and 0 < self.width <= MAX_WIDTH):
            raise ConfigError(f"width must be in (0, {MAX_WIDTH:g}], got {self.width}")  # nan fails too
        if self.workers is not None:
            _check_range("--workers", self.workers, 0, MAX_WORKERS)
        _check_range("seed", self.seed, 0, 2 ** 32 - 1)  # numpy's seed range
        _check_range("--checkpoint-every", self.checkpoint_every, 0, MAX_EPOCHS, " epochs (0: never)")
        if self.save_every is not None:
            _check_range("--save-every", self.save_every, 1, MAX_EPOCHS, " epochs")

    # ---- profile defaults, resolved (the modules they need import torch: imported on use) ----

    def resolved_dataset(self) -> str:
        from okdph.engine.recipe import stand_in_dataset

        dataset = self.dataset if self.dataset is not None else stand_in_dataset(self.profile)
        if dataset is not None:
            return dataset
        from okdph.data import dataset_names

        raise ConfigError("--dataset is required unless --profile smoke or pipeline; valid: "
                          + ", ".join(dataset_names()))

    def resolved_width(self) -> float:
        from okdph.engine.recipe import default_width

        return self.width if self.width is not None else default_width(self.profile, self.backbone)

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        from okdph.data import get_info

        # The fast engine holds the data in memory and runs fp32 or bf16, single-process.
        in_memory = get_info(self.resolved_dataset()).in_memory
        return "fast" if in_memory and not self.ddp and self.precision != "fp64" else "reference"

    def resolved_overrides(self) -> dict:
        return dict(self.overrides)

    # ---- identity ----

    def identity(self, *roles: str) -> dict:
        """The fields that make two runs the same run (and so the same record), resolved; with
        `roles`, only the fields of those roles ("cell", "seed", "engine")."""
        out = {}
        for f in dataclasses.fields(self):
            role = f.metadata.get("identity")
            if role is None or (roles and role not in roles):
                continue
            if f.metadata.get("new") and getattr(self, f.name) == f.default:
                continue  # absent from run ids made before the field existed
            resolve = f.metadata.get("resolve")
            out[f.name] = getattr(self, resolve)() if resolve else getattr(self, f.name)
        return out

    def cell_key(self) -> str:
        """The table cell this run is a seed of (every identity field but the seed and the engine)."""
        cell_fields = [f.name for f in dataclasses.fields(self) if f.metadata.get("identity") == CELL]
        return cell_key(self.identity(CELL), cell_fields)

    def run_id(self) -> str:
        """`<method>-<backbone>-<dataset>-<setting>-n<students>-<fidelity>-<profile>-seed<seed>-<digest>`:
        the main fields readable, and a digest of every identity field (parse_run_id reads it back)."""
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


def _check_range(name: str, value, low: int, high: int, unit: str = "") -> None:
    if not (isinstance(value, int) and low <= value <= high):
        raise ConfigError(f"{name} must be in [{low}, {high}]{unit}, got {value}")


CELL_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("identity") == CELL)

_RUN_ID = re.compile(r"^(?P<head>.+)-(?P<setting>[^-]+)-n(?P<students>\d+)-(?P<fidelity>[^-]+)-(?P<profile>[^-]+)"
                     r"-seed(?P<seed>\d+)-(?P<digest>[0-9a-f]{8})$")


def parse_run_id(run_id: str) -> dict | None:
    """The readable fields of a run id (RunConfig.run_id): method, setting, students, fidelity,
    profile, seed, digest, and `head` (method-backbone-dataset); None if it is not one."""
    found = _RUN_ID.match(run_id)
    if found is None:
        return None
    parts = found.groupdict()
    return {**parts, "method": parts["head"].split("-")[0], "students": int(parts["students"]),
            "seed": int(parts["seed"])}


def cell_key(fields: dict, names=CELL_FIELDS) -> str:
    """The cell of a run from its identity fields: a RunConfig's, or a record's (which holds them)."""
    return json.dumps({name: fields.get(name) for name in names}, sort_keys=True)
