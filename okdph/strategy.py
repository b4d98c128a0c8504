"""The Strategy contract and its registry (docs/architecture.md#strategies).

A strategy is one online-KD method. It declares its networks, the augmentation view each network
sees, its losses for one batch, its hooks and its evaluable heads; the engine does everything else
(data, optimizers, schedules, evaluation, records) and knows no method by name.

A new method is one file and one entry point:

    @register_strategy("mymethod")
    class MyMethod(Strategy):
        Config = MyConfig            # frozen dataclass of typed, validated hyper-parameters
        display_name = "MyMethod"    # how tables and figures spell it
        def forward_train(self, images, targets, *, epoch, step): ...

    # pyproject.toml of the package that holds it
    [project.entry-points."okdph.strategies"]
    mymethod = "mypackage.mymethod:MyMethod"

The entry-point group ``okdph.strategies`` is how strategy modules are found, the built-in ones
included (this project's pyproject.toml lists them; reinstall after adding one). The decorator names
the class; a class an entry point names without the decorator is registered under the entry
point's name.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import Tensor, nn

from okdph.errors import ConfigError
from okdph.losses import kd_loss, kd_loss_eps, sigmoid_rampup
from okdph.models import make_students
from okdph.names import FIDELITIES, NOT_INSTALLED, STRATEGY_GROUP

_REGISTRY: dict[str, type["Strategy"]] = {}
_BROKEN: dict[str, str] = {}  # entry points that failed to load: name -> why
_LOADED = False


# --------------------------------------------------------------------------------------------------
# Hyper-parameter types


@dataclass(frozen=True)
class Interval:
    """How often OKDPH fuses students with the HWM: every `count` batches or epochs (supplement §4:
    "5b" = every five batches, "1e" = every epoch). The official spelling "5_batch"/"1_epoch" is
    accepted too."""

    count: int
    unit: str  # "batch" or "epoch"

    _PATTERN: ClassVar[re.Pattern] = re.compile(r"^\s*(\d+)\s*_?\s*(b|batch|batches|e|epoch|epochs)\s*$")

    @classmethod
    def parse(cls, text: "str | Interval | None") -> "Interval | None":
        if text is None or isinstance(text, Interval):
            return text
        if text.strip().lower() in ("", "none", "off", "never"):
            return None
        match = cls._PATTERN.match(text.lower())
        if not match or int(match.group(1)) < 1:
            raise ConfigError(
                f"malformed interval '{text}'; expected e.g. 5b (every 5 batches), 1e (every epoch) or none"
            )
        unit = "batch" if match.group(2).startswith("b") else "epoch"
        return cls(int(match.group(1)), unit)

    def __str__(self) -> str:
        return f"{self.count}{self.unit[0]}"


def check_unit_range(name: str, value: float) -> None:
    """ω, β, γ and the other mixing weights live in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def check_non_negative(name: str, value: float, unit: str = "") -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0{unit}, got {value}")


def _convert(name: str, text: str, kind) -> object:
    """Turn a `--set key=value` string into the field's declared type."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
    except ValueError:
        raise ConfigError(f"{name} expects a {kind.__name__}, got '{text}'") from None
    if kind is float:
        if not math.isfinite(value):  # inf and nan switch a weight's checks off and poison the record
            raise ConfigError(f"{name} must be a finite number, got '{text}'")
        return value
    if kind is Interval or kind == typing.Optional[Interval]:
        return Interval.parse(text)
    return text


def build_config(config_cls: type, overrides: dict[str, str] | None = None):
    """The strategy's frozen config with `key=value` string overrides applied and validated."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"unknown hyper-parameter '{unknown[0]}'; valid: {valid}")
    values = {k: _convert(k, v, hints[k]) if isinstance(v, str) else v for k, v in overrides.items()}
    return config_cls(**values)


def config_to_dict(config) -> dict:
    """JSON-ready view of a config (intervals as their "5b"/"1e" strings)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = str(value) if isinstance(value, Interval) else value
    return out


@dataclass(frozen=True)
class NoConfig:
    """For strategies without hyper-parameters."""


# --------------------------------------------------------------------------------------------------
# What a strategy hands the engine


@dataclass
class OptimizerGroup:
    """Parameters that get their own SGD optimizer (the official code keeps one per model object).

    `scheduled=False` keeps the learning rate constant (FFL's fusion module in the official code)."""

    name: str
    params: list[nn.Parameter]
    scheduled: bool = True


class Strategy(nn.Module):
    """Base class of every method. Subclasses set `Config` and implement `forward_train`.

    Constructor arguments are the same for every strategy so the engine can build any of them:
    `config` (an instance of `Config`), `backbone` (a name for `okdph.models.create_backbone`),
    `num_classes`, `num_models` (students or branches), `dataset` (an `okdph.data.DatasetInfo`,
    for the default views), `fidelity` ("official" or "paper") and `width` (channel multiplier).

    What the defaults rely on: a strategy of separate networks builds them as `self.students`, a
    `okdph.models.ModelGroup` (`make_students`); the default optimizer group, test heads and the
    trajectory points use it. A strategy without one (a multi-branch network) overrides
    `optimizer_groups`, `eval_heads` and `head_names`. `head_names()` must name exactly the heads
    `eval_heads` returns, `deployed_head` among them: the driver checks it before training.
    """

    Config: ClassVar[type] = NoConfig
    name: ClassVar[str] = ""          # the registered name (set by register_strategy)
    display_name: ClassVar[str] = ""  # how tables and figures spell it ("OKDDip"); default: the name
    min_models: ClassVar[int] = 1
    deployed_head: ClassVar[str] = "student0"  # the head a user would ship; reported by --metric final

    def __init__(self, *, config, backbone: str, num_classes: int, num_models: int, dataset,
                 fidelity: str = "official", width: float = 1.0):
        super().__init__()
        if fidelity not in FIDELITIES:
            raise ConfigError(f"unknown fidelity '{fidelity}'; valid: {', '.join(FIDELITIES)}")
        if num_models < self.min_models:
            raise ConfigError(f"{self.name} needs at least {self.min_models} models, got {num_models}")
        self.config = config
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_models = num_models
        self.dataset = dataset
        self.fidelity = fidelity
        self.width = width

    # ---- declared by subclasses -----------------------------------------------------------------

    def views(self) -> list[str]:
        """The augmentation view of each input slot of `forward_train` (docs/methods.md#views-per-method)."""
        return [self.dataset.default_view] * self.num_models

    def has_students(self) -> bool:
        return self._modules.get("students") is not None

    def student_group(self) -> nn.ModuleList:
        """The strategy's students, `self.students`; one ConfigError line for a strategy without them."""
        students = self._modules.get("students")
        if students is None:
            raise ConfigError(f"strategy '{self.name}' has no students: build self.students "
                              "(okdph.models.make_students) or override optimizer_groups, eval_heads and head_names")
        return students

    def optimizer_groups(self) -> list[OptimizerGroup]:
        """Default: every student's parameters under one SGD. The official scripts keep one SGD per
        model; with equal hyper-parameters that is the same update, element for element."""
        return [OptimizerGroup("students", list(self.student_group().parameters()))]

    def graph_key(self, *, epoch: int, step: int):
        """What distinguishes this step's computation from another's, for CUDA-graph capture: steps
        with equal keys must run the same kernels with the same Python-side constants. The safe
        default re-captures every epoch, for losses weighted by epoch (ramps); strategies whose step
        never changes return None, and per-step Python state (a batch-level hook) goes in the key."""
        return ("epoch", epoch)

    def forward_train(self, images: list[Tensor], targets: Tensor, *, epoch: int, step: int
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One batch: the logits of every head (B, C) and the named, already weighted losses whose sum
        the engine back-propagates. `images[k]` is the batch under view `self.views()[k]`."""
        raise NotImplementedError

    def after_step(self, *, epoch: int, step: int) -> None:
        """Runs after every optimizer step (OKDPH batch-level fusion, PCL temporal mean)."""

    def after_epoch(self, *, epoch: int) -> None:
        """Runs after the epoch's test and scheduler step (OKDPH epoch-level fusion)."""

    def eval_heads(self, images: Tensor) -> dict[str, Tensor]:
        """Logits (B, C) of every evaluable head on clean test images; default: each student."""
        students = self.student_group()
        logits = students([images] * len(students))
        return {f"student{k}": z for k, z in enumerate(logits)}

    def head_names(self) -> list[str]:
        """The names of `eval_heads`' heads, in its order (a record's history has one row each)."""
        return [f"student{k}" for k in range(self.num_models)]

    def describe(self) -> dict:
        """What a record should say about how this run differs from the plain method, if anything."""
        return {}


class StudentStrategy(Strategy):
    """A method of N separate, independently initialised networks, `self.students`, each on its own
    view (Base, DML, KDCL): a subclass writes its losses in `student_losses`, and its step is the
    same computation at every step (graph_key None)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.students = make_students(self.backbone, self.num_classes, self.num_models, self.width,
                                      same_init=False)

    def student_losses(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """The named, weighted losses of the students' logits (N, B, C)."""
        raise NotImplementedError

    def forward_train(self, images, targets, *, epoch, step):
        logits = self.students(images)
        return {f"student{k}": z for k, z in enumerate(logits)}, self.student_losses(logits, targets)

    def graph_key(self, *, epoch, step):
        return None


class BranchStrategy(Strategy):
    """A multi-branch method on one shared view (ONE, OKDDip, FFL): one SGD over every parameter, the
    distillation loss of the fidelity (`self.kd`: the official KLLoss adds 1e-7 to the teacher's
    probabilities, the paper's is plain), and a distillation weight ramped up over `config.rampup`
    epochs, times `config.alpha` where the method has one. A subclass builds its network and writes
    `forward_train`, `eval_heads` and `head_names`."""

    min_models = 2
    deployed_head = "branch0"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kd = kd_loss_eps if self.fidelity == "official" else kd_loss

    def views(self):
        return [self.dataset.default_view]  # every branch reads the one trunk output

    def optimizer_groups(self):
        return [OptimizerGroup("network", list(self.parameters()))]

    def kd_weight(self, epoch: int) -> float:
        return getattr(self.config, "alpha", 1.0) * sigmoid_rampup(epoch, self.config.rampup)


@torch.no_grad()
def check_heads(strategy: Strategy, images: Tensor) -> None:
    """`head_names()` names exactly what `eval_heads` returns on `images` (a test batch), and the
    deployed head is one of them; one ConfigError line naming the mismatch otherwise."""
    was_training = strategy.training
    strategy.eval()
    returned = list(strategy.eval_heads(images))
    strategy.train(was_training)
    declared = strategy.head_names()
    if returned != declared:
        raise ConfigError(f"strategy '{strategy.name}': head_names() declares {', '.join(declared)} but eval_heads "
                          f"returns {', '.join(returned)}; make them agree")
    if strategy.deployed_head not in declared:
        raise ConfigError(f"strategy '{strategy.name}': deployed_head '{strategy.deployed_head}' is not one of "
                          f"its heads ({', '.join(declared)})")


# --------------------------------------------------------------------------------------------------
# Registry


def register_strategy(name: str):
    """Class decorator: make a strategy available under `name` (CLI, tables and records use it).
    Its `display_name` (how tables and figures spell it) defaults to `name`."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy '{name}' is registered twice")
        cls.name = name
        if "display_name" not in vars(cls):
            cls.display_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    """Import every strategy an `okdph.strategies` entry point names, once. One that cannot be
    loaded (an import error in a plugin) is set aside with its reason: the others stay usable, and
    asking for it says why it is missing."""
    global _LOADED
    if _LOADED:
        return
    found = entry_points(group=STRATEGY_GROUP)
    if not found:  # a checkout that was never installed
        raise ConfigError(NOT_INSTALLED)
    for ep in sorted(found, key=lambda ep: ep.name):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Strategy)):
                raise TypeError(f"{ep.value} is not a Strategy subclass")
            if _REGISTRY.get(ep.name) is cls:
                continue  # its module's decorator registered it under the entry point's name
            if cls in _REGISTRY.values():
                raise ValueError(f"{ep.value} is registered as '{cls.name}'; give both the same name")
            register_strategy(ep.name)(cls)
        except Exception as exc:  # a plugin's own error, whatever it is
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _BROKEN[ep.name] = f"{type(exc).__name__}: {reason}"
            warnings.warn(f"method '{ep.name}' ({ep.value}) could not be loaded: {_BROKEN[ep.name]}", stacklevel=2)
    _LOADED = True


def list_strategies() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    _load_all()
    if name in _BROKEN:
        raise ConfigError(f"method '{name}' could not be loaded ({_BROKEN[name]}); fix or uninstall its package")
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; valid: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def display_name(name: str) -> str:
    """How tables and figures spell strategy `name` ("okddip" -> "OKDDip"); an unknown name as it is."""
    _load_all()
    return _REGISTRY[name].display_name if name in _REGISTRY else name
