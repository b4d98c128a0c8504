"""The paper's experiments as data (docs/protocol.md#the-paper-tables), and their expansion into runs.

A table file, `okdph/bench/tables/<id>.json`, lists one cell per line: method, backbone, dataset,
data setting, students (or branches) and, where it is known, the paper's value with a note marker
for values that are not a transcription of the paper itself. The file also says how the table is
laid out (`rows`: the fields of a row, the methods are the columns), which metric it reports and
which profiles it supports. Every such file is a table, known by its id (the file name) and the
aliases it lists: adding a table is adding one file (okdph.names finds them without torch). The
numbers come from the supplement (Tables 3-7), transcribed and checked against its text
(docs/protocol.md#paper-values); each table file names its source.

OKDPH's hyper-parameters are not in the table files: supplement Tables 6 and 7
(`tables/okdph_presets.json`) give ω, β, γ and the fusion interval Δ per dataset, backbone,
student count and data setting, and `expand` applies them to every OKDPH cell they cover.

Expansion: every cell × seeds gives one run; run r has seed 42 + r, as the official scripts start
from seed 42. In the smoke and pipeline profiles every CIFAR cell runs on the embedded digits data
(docs/protocol.md#recipes-per-profile), so cells that differ only in their dataset become the same
run and share its record.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from okdph.engine.recipe import PROFILES, stand_in_dataset
from okdph.engine.run import RunConfig
from okdph.errors import ConfigError
from okdph.names import TABLE_DIR, table_names

FIRST_SEED = 42                                  # run r has seed 42 + r
DEFAULT_SEEDS = {"paper": 5, "quick": 5, "smoke": 1, "pipeline": 1}  # the supplement averages five runs


@dataclass(frozen=True)
class Cell:
    """One entry of a paper table: a method in one configuration, and the paper's value."""

    method: str
    backbone: str
    dataset: str                  # the paper's dataset (the smoke and pipeline profiles train on digits)
    setting: str                  # standard, noisy, limited10, limited1
    students: int                 # students, or branches for the multi-branch methods
    paper: float | None = None    # the published value; None where it is unknown
    paper_note: str = ""          # marker of a value that is secondary, derived or inferred
    overrides: tuple[tuple[str, str], ...] = ()  # hyper-parameters, the OKDPH preset included
    preset: str | None = None     # where the overrides come from ("Table 6"), None: defaults

    def slug(self) -> str:
        return f"{self.dataset}-{self.backbone}-{self.setting}-n{self.students}-{self.method}"


@dataclass(frozen=True)
class Table:
    id: str
    aliases: tuple[str, ...]
    title: str
    source: str
    metric: str                   # "accuracy" or "pacbayes"
    better: str                   # "higher" or "lower": which value is bold
    rows: tuple[str, ...]         # the cell fields that make a row; the methods are the columns
    methods: tuple[str, ...]
    profiles: tuple[str, ...]     # the profiles this table can run under
    notes: dict                   # paper-value marker -> what it means
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Run:
    """One seed of one cell, as the RunConfig that trains it."""

    cell: Cell
    config: RunConfig


# --------------------------------------------------------------------------------------------------
# Loading


def list_tables() -> tuple[str, ...]:
    """The ids of the tables in okdph/bench/tables/, sorted (adding a table is adding one file)."""
    return tuple(table_names())


def _aliases() -> dict[str, str]:
    names = {}
    for table_id, aliases in table_names().items():
        names[table_id] = table_id
        for alias in aliases:
            names[alias.lower()] = table_id
    return names


def valid_table_names() -> str:
    """The names a user types: 3, 4, 5 and the main-paper ids."""
    short = [a for aliases in table_names().values() for a in aliases if a.isdigit()]
    return ", ".join(short + [t for t in table_names() if not t.startswith("table")])


def get_table(name: str) -> Table:
    """A table by id or alias ("3", "table3", "S3", "main-cifar"); ConfigError names the valid ones."""
    table_id = _aliases().get(str(name).strip().lower())
    if table_id is None:
        raise ConfigError(f"unknown table '{name}'; valid: {valid_table_names()}")
    return _load(table_id)


@functools.lru_cache(maxsize=None)
def _load(table_id: str) -> Table:
    data = json.loads((TABLE_DIR / f"{table_id}.json").read_text())
    cells = []
    for raw in data["cells"]:
        overrides, preset = (), None
        if raw["method"] == "okdph":
            overrides, preset = okdph_preset(raw["dataset"], raw["backbone"], raw["students"], raw["setting"])
        cells.append(Cell(method=raw["method"], backbone=raw["backbone"], dataset=raw["dataset"],
                          setting=raw["setting"], students=raw["students"], paper=raw.get("paper"),
                          paper_note=raw.get("paper_note", ""), overrides=overrides, preset=preset))
    return Table(id=data["id"], aliases=tuple(data["aliases"]), title=data["title"], source=data["source"],
                 metric=data["metric"], better=data["better"], rows=tuple(data["rows"]),
                 methods=tuple(data["methods"]), profiles=tuple(data["profiles"]), notes=data["notes"],
                 cells=tuple(cells))


@functools.lru_cache(maxsize=None)
def _presets() -> dict[tuple, dict]:
    data = json.loads((TABLE_DIR / "okdph_presets.json").read_text())
    return {tuple(p[k] for k in data["keys"]): p for p in data["presets"]}


def okdph_preset(dataset: str, backbone: str, students: int, setting: str = "standard"
                 ) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """OKDPH's published ω, β, γ and Δ for this configuration (supplement Tables 6 and 7) as
    `--set` overrides, and the table they come from; ((), None) where the paper gives none
    (ImageNet), so OKDPH's defaults apply."""
    preset = _presets().get((dataset, backbone, setting, students))
    if preset is None:
        return (), None
    # strings exactly as `--set key=value` takes them; Δ "5b"/"1e" is the `interval` parameter
    return tuple((k, str(preset[k])) for k in ("omega", "beta", "gamma", "interval")), preset["table"]


# --------------------------------------------------------------------------------------------------
# Expansion


def resolve_seeds(profile: str, seeds) -> list[int]:
    """The seeds of each cell: `seeds` runs from 42 (None: the profile's count), or, given a list
    (`--seed-list 42,43`), exactly those seeds."""
    if isinstance(seeds, (list, tuple)):
        if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= s < 2 ** 32 for s in seeds):
            raise ConfigError(f"--seed-list needs distinct seeds in [0, 2**32 - 1], got {list(seeds)}")
        return list(seeds)
    count = DEFAULT_SEEDS.get(profile, 1) if seeds is None else seeds
    if count < 1:
        raise ConfigError(f"seeds must be >= 1, got {count}")
    return [FIRST_SEED + r for r in range(count)]


def select_cells(table: Table, methods=None) -> tuple[Cell, ...]:
    """The table's cells, or only those of `methods`."""
    if not methods:
        return table.cells
    unknown = [m for m in methods if m not in table.methods]
    if unknown:
        raise ConfigError(f"method '{unknown[0]}' is not in {table.id}; valid: {', '.join(table.methods)}")
    return tuple(c for c in table.cells if c.method in methods)


def check_profile(table: Table, profile: str) -> None:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; valid: {', '.join(PROFILES)}")
    if profile not in table.profiles:
        raise ConfigError(f"{table.id} cannot run under profile '{profile}' (ImageNet has no smoke "
                          f"stand-in); valid: {', '.join(table.profiles)}")


def cell_config(cell: Cell, *, profile: str, seed: int = FIRST_SEED, fidelity: str = "official",
                engine: str = "auto", device: str = "auto", data_root: str = "data", download: bool = False,
                out_dir: str = "results/runs") -> RunConfig:
    """The RunConfig of one seed of `cell` under `profile`."""
    return RunConfig(method=cell.method, backbone=cell.backbone,
                     dataset=stand_in_dataset(profile) or cell.dataset,
                     setting=cell.setting, students=cell.students, overrides=cell.overrides,
                     fidelity=fidelity, profile=profile, seed=seed, engine=engine, device=device,
                     data_root=data_root, download=download, out_dir=out_dir)


def expand(table: Table, *, profile: str, seeds: int | None = None, methods=None, **run_options) -> list[Run]:
    """Every cell of `table` (or of `methods`) × every seed, in table order. `run_options` go to
    `cell_config` (fidelity, engine, device, data_root, download, out_dir)."""
    check_profile(table, profile)
    return [Run(cell, cell_config(cell, profile=profile, seed=seed, **run_options))
            for cell in select_cells(table, methods) for seed in resolve_seeds(profile, seeds)]


def unique_configs(runs: list[Run]) -> list[RunConfig]:
    """The distinct runs of an expansion, in order (smoke cells can share a run)."""
    seen, out = set(), []
    for run in runs:
        run_id = run.config.run_id()
        if run_id not in seen:
            seen.add(run_id)
            out.append(run.config)
    return out
