"""The closed sets of names the suite accepts, importable without torch.

The CLI offers them as `click.Choice` (its `--help` and `list` import nothing heavier than this
module) and the library checks against the same tuples. Where a registry holds the real thing, the
tuple here is its list of names and a test keeps the two equal:

- strategies: the entry points of group `okdph.strategies` (names only, nothing is imported);
- backbones: `BACKBONES`, checked against okdph.models' registry;
- datasets: `DATASETS`, the order of okdph.data.info's `DatasetInfo` table;
- tables: the files in okdph/bench/tables/ (adding a table is adding one JSON file).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType

STRATEGY_GROUP = "okdph.strategies"  # entry-point group of every strategy, built-in or third-party

PROFILES = ("paper", "quick", "smoke", "pipeline")  # recipe families (okdph.engine.recipe)
FIDELITIES = ("official", "paper")               # where the official code and the paper differ
ENGINES = ("auto", "reference", "fast")          # auto: fast for in-memory fp32/bf16 runs
PRECISIONS = ("fp32", "bf16", "fp64")            # bf16: fast engine; fp64: reference engine
DATASETS = ("cifar10", "cifar100", "digits", "synthetic10", "synthetic100", "imagenet")
SETTINGS = ("standard", "noisy", "limited10", "limited1")  # the data settings (okdph.data.datasets)
VIEWS = ("hflip", "hflip+rot", "cutout", "augment", "auto_aug", "base")  # augmentation views
BACKBONES = ("densenet40_12", "resnet110", "resnet18", "resnet32", "vgg16", "wrn20_8")
METRICS = ("paper", "final")                     # what a table cell shows (okdph.bench.render)
STD_CONVENTIONS = ("sample", "population")       # the std a table shows (okdph.bench.stats)
DEFAULT_STD = "sample"  # n − 1: the spread its CI and t-test use; why: docs/protocol.md#which-std
# `okdph-bench compare` (okdph.bench.compare): Welch's test level and the smallest change of a mean, in
# points, that can count as a regression; here so that `compare --help` shows them without torch
COMPARE_ALPHA = 0.05
COMPARE_MIN_EFFECT = 0.5
# A cell with one run on a side regressed when worse by more than this many points: above the largest
# move of a smoke-table cell between seeds (docs/protocol.md#one-run-per-cell)
SINGLE_SEED_MAX_DROP = 65.0
EXECUTORS = ("local", "slurm")                   # where `okdph-bench run` trains

TABLE_DIR = Path(__file__).parent / "bench" / "tables"


NOT_INSTALLED = ("no methods are registered: okdph-bench is not installed in this Python; "
                 "run `pip install -e .` in the checkout")  # its built-in methods are entry points too


def strategy_names() -> list[str]:
    """Every installed strategy's name, sorted, from the entry points; no strategy is imported."""
    return sorted({ep.name for ep in entry_points(group=STRATEGY_GROUP)})


@functools.lru_cache(maxsize=None)
def table_names() -> Mapping[str, tuple[str, ...]]:
    """Every table in okdph/bench/tables/, sorted by id: id -> its aliases ("table3" -> ("3", "S3")).

    A table is a JSON file there with `cells`; its id is its file name (okdph_presets.json, the
    OKDPH hyper-parameters of supplement Tables 6/7, has no cells and is no table)."""
    tables = {}
    for path in sorted(TABLE_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if "cells" in data:
            tables[path.stem] = tuple(data.get("aliases", ()))
    return MappingProxyType(tables)


def table_choices() -> list[str]:
    """What a user may type for a table: each id followed by its aliases."""
    return [name for table_id, aliases in table_names().items() for name in (table_id, *aliases)]


@functools.lru_cache(maxsize=None)
def table_titles() -> Mapping[str, str]:
    """Every table's title, by id (for `okdph-bench list`)."""
    return MappingProxyType({t: json.loads((TABLE_DIR / f"{t}.json").read_text()).get("title", "")
                             for t in table_names()})
