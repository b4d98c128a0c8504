"""The closed sets of names the suite accepts, importable without torch.

The CLI offers them as `click.Choice` (its `--help` and `list` import nothing heavier than this
module) and the library checks against the same tuples. Where a registry holds the real thing, the
tuple here is its list of names and a test keeps the two equal:

- strategies: the entry points of group `okdph.strategies` (names only, nothing is imported);
- backbones: `BACKBONES`, checked against okdph.models' registry;
- datasets: `DATASETS`, the order of okdph.data.info's `DatasetInfo` table.
"""
from __future__ import annotations

from importlib.metadata import entry_points

STRATEGY_GROUP = "okdph.strategies"  # entry-point group of every strategy, built-in or third-party

PROFILES = ("paper", "quick", "smoke")           # recipe families (okdph.engine.recipe)
FIDELITIES = ("official", "paper")               # where the official code and the paper differ
ENGINES = ("auto", "reference", "fast")          # auto: fast on CUDA, reference on CPU
PRECISIONS = ("fp32", "bf16", "fp64")            # bf16: fast engine; fp64: reference engine
DATASETS = ("cifar10", "cifar100", "digits", "synthetic10", "synthetic100", "imagenet")
SETTINGS = ("standard", "noisy", "limited10", "limited1")  # the data settings (okdph.data.datasets)
VIEWS = ("hflip", "hflip+rot", "cutout", "augment", "auto_aug", "base")  # augmentation views
BACKBONES = ("densenet40_12", "resnet110", "resnet18", "resnet32", "vgg16", "wrn20_8")
METRICS = ("paper", "final")                     # what a table cell shows (okdph.bench.render)
EXECUTORS = ("local", "slurm")                   # where `okdph-bench run` trains


def strategy_names() -> list[str]:
    """Every installed strategy's name, sorted, from the entry points; no strategy is imported."""
    return sorted({ep.name for ep in entry_points(group=STRATEGY_GROUP)})

