"""What a table command chooses, as two objects validated once, when they are made:

- `TableChoices`: which paper table, and how its runs are made and its cells shown (profile,
  fidelity, engine, metric, std). Runner, render, report and compare take it whole, so a choice is
  checked in one place and cannot drift between them.
- `Execution`: where and how the runs train (executor, devices, packs, SLURM, the data's location,
  progress, dry run). Only the runner and the plan read it.

    choices = TableChoices.of("3", profile="smoke")
    run_table(choices, Execution(jobs=2))
"""
from __future__ import annotations

from dataclasses import dataclass, field

from okdph.bench.experiments import Table, check_profile, get_table
from okdph.errors import ConfigError
from okdph.names import DEFAULT_STD, ENGINES, EXECUTORS, FIDELITIES, METRICS, STD_CONVENTIONS

__all__ = ["Execution", "TableChoices"]


def _check(name: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {name} '{value}'; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class TableChoices:
    """A table and the choices that decide its numbers and their presentation.

    `engine`: the runs' engine when training ("auto": fast where the data fits in memory); when
    rendering, None takes whichever engine the records have (a cell never mixes engines)."""

    table: Table
    profile: str = "paper"
    fidelity: str = "official"
    engine: str | None = "auto"
    metric: str = "paper"
    std: str = DEFAULT_STD

    def __post_init__(self):
        check_profile(self.table, self.profile)
        _check("fidelity", self.fidelity, FIDELITIES)
        if self.engine is not None:
            _check("engine", self.engine, ENGINES)
        _check("metric", self.metric, METRICS)
        _check("std", self.std, STD_CONVENTIONS)

    @classmethod
    def of(cls, table: str | Table, **choices) -> "TableChoices":
        """From a table's id or alias ("3", "table3", "main-cifar") or a Table."""
        return cls(table if isinstance(table, Table) else get_table(table), **choices)

    @property
    def shown_metric(self) -> str:
        """What the cells hold: the table's own metric (pacbayes), or the accuracy metric chosen."""
        return self.metric if self.table.metric == "accuracy" else self.table.metric

    def stem(self) -> str:
        """`table3` for the paper profile, official fidelity and paper metric; every other choice is
        appended (`table3-smoke`, `table3-quick-paper-final`), so renderings never overwrite each other."""
        parts = [self.table.id]
        parts += [self.profile] if self.profile != "paper" else []
        parts += [self.fidelity] if self.fidelity != "official" else []
        parts += [self.metric] if self.metric != "paper" and self.table.metric == "accuracy" else []
        return "-".join(parts)


@dataclass(frozen=True)
class Execution:
    """Where the runs of a table train. "local": in this process on the CPU or one GPU, one worker
    process per GPU of `gpus`, or `jobs` CPU worker processes; with `pack_size` > 1 that many seeds
    of a cell train as one pack. "slurm": one submitit job per `pack_size` runs (default: a cell's
    seeds), with `slurm_parameters` and `slurm_cluster`, waited for when `wait`. `ddp_procs`: the
    plan's torchrun processes per run. `dry_run`: list what would train, train nothing."""

    executor: str = "local"
    gpus: str | None = None
    jobs: int | None = 1
    pack_size: int | None = None
    slurm_parameters: dict = field(default_factory=dict)
    slurm_cluster: str | None = None
    wait: bool = False
    ddp_procs: int | None = None
    data_root: str = "data"
    download: bool = False
    progress: bool = True
    dry_run: bool = False

    def __post_init__(self):
        _check("executor", self.executor, EXECUTORS)
        if self.pack_size is not None and self.pack_size < 1:
            raise ConfigError(f"--pack must be >= 1 run, got {self.pack_size}")
        if self.executor != "slurm" and (self.slurm_parameters or self.wait):  # would be ignored without a word
            raise ConfigError(f"{'--slurm' if self.slurm_parameters else '--wait'} applies to --executor slurm "
                              "only; add --executor slurm or drop it")

    @property
    def packed(self) -> bool:
        return self.pack_size is not None and self.pack_size > 1
