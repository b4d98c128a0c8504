"""Tables from records: per cell the mean ± std over seeds with n (sample std by default,
`--std population` as the official logs print it), the paper's value and Δ = ours − paper (only
where the runs use the paper's data: not in the smoke profile); the best value of each row in bold;
per row OKDPH against the best other method with Welch's t-test; Markdown (tabulate, pipe format,
numbers right-aligned), CSV and JSON side by side, the CSV/JSON with both stds, the 95 % confidence
interval and the exact p. Always regenerated from the records, never edited. The statistics
themselves are okdph.bench.stats (docs/protocol.md#which-std).

Metrics (`--metric`): `paper` (default) is each run's best epoch of the max over all heads, as the
official scripts report and the paper publishes; `final` is the deployed head at the last epoch.
Table 5 reports the PAC-Bayes bound a record carries as `metrics.pacbayes` (×10^6, as the paper
prints it) and is empty until records carry it.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tabulate import tabulate

from okdph.bench import stats
from okdph.bench.choices import TableChoices
from okdph.bench.experiments import FIRST_SEED, Cell, Table, cell_config
from okdph.bench.store import ResultStore
from okdph.data.info import display_name as data_display_name
from okdph.engine.recipe import EMBEDDED_DATASET, PIPELINE_RECIPE, PIPELINE_STEPS, smoke_changes
from okdph.engine.record import atomic_write_json
from okdph.errors import ConfigError
from okdph.models import display_name as backbone_display_name
from okdph.names import DEFAULT_STD
from okdph.strategy import display_name as strategy_display_name

METRIC_TEXT = {"paper": "best epoch of the max over all heads, as the paper reports",
               "final": "the deployed head at the last epoch"}
HEADERS = {"dataset": "Dataset", "backbone": "Backbone", "setting": "Setting", "students": "#S/B"}
ROW_TEST_HEADER = "OKDPH vs best baseline"
# One line per profile above its table: what its numbers can and cannot show (the long form is
# docs/protocol.md#what-each-profile-can-and-cannot-tell)
PROFILE_SCOPE = {
    "smoke": ("Smoke profile: {changes}. The numbers show that each method learns and how fast it "
              "starts, not how the methods compare on the paper's data after 300 epochs, so no Δ to the paper is "
              "printed (the paper line holds its CIFAR numbers); cells that differ only in their dataset share "
              "their runs."),
    "pipeline": (f"Pipeline profile: every cell trains a small model for {PIPELINE_STEPS} steps "
                 f"({PIPELINE_RECIPE.train_samples} images) on the embedded `{EMBEDDED_DATASET}` data; the numbers "
                 "show that every cell runs end to end, not whether a method learns (most cells sit near "
                 "chance, 10 %), so no Δ to the paper is printed; cells that differ only in their dataset share "
                 "their runs."),
    "quick": ("Quick profile: a tenth of the paper's schedule on the paper's data; the numbers can show relative "
              "behaviour early in training, not the paper's converged values (Δ measures that gap)."),
}


def display(field: str, value) -> str:
    """How the paper spells a cell's `field` value ("okddip" -> "OKDDip", "wrn20_8" -> "WRN20-8",
    "limited10" -> "10%"): the display name its registry holds; a student count as it is."""
    if field == "method":
        return strategy_display_name(value)
    if field == "backbone":
        return backbone_display_name(value)
    if field in ("dataset", "setting"):
        return data_display_name(value)
    return str(value)


@dataclass
class CellResult:
    cell: Cell
    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    engine: str | None = None
    not_complete: int = 0        # records that diverged (status other than complete)
    unreadable: int = 0          # damaged records of the cell (ResultStore.damaged_for), not counted
    not_converged: int = 0       # PAC-Bayes bounds whose σ search did not converge (counted, marked)
    best: bool = False
    records: list[dict] = field(default_factory=list, repr=False)  # every matching record
    std_convention: str = DEFAULT_STD   # which std `std` is: the table's --std
    run_dataset: str | None = None      # the data its runs train on; None: the cell's own

    @property
    def paper_data(self) -> bool:
        """Its runs use the paper's dataset (smoke: digits does not), so Δ means something."""
        return self.run_dataset in (None, self.cell.dataset)

    @property
    def recorded(self) -> int:
        return len(self.records)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """The std the table shows (`std_convention`); None below two runs."""
        return stats.std(self.values, self.std_convention)

    @property
    def std_sample(self) -> float | None:
        return stats.std(self.values, "sample")

    @property
    def std_population(self) -> float | None:
        return stats.std(self.values, "population")

    @property
    def ci(self) -> tuple[float, float] | None:
        """The 95 % confidence interval of the mean (t-based); None below two runs."""
        return stats.confidence_interval(self.values)

    @property
    def delta(self) -> float | None:
        """Ours − paper; None without a paper value or where the runs do not use the paper's data."""
        if self.mean is None or self.cell.paper is None or not self.paper_data:
            return None
        return self.mean - self.cell.paper


@dataclass
class RowTest:
    """OKDPH against the best other method of its row (the best mean): the difference of the means
    (OKDPH − that method's) and Welch's two-sided p. Where a side has fewer than two runs nothing is
    claimed: `okdph_better` and `p` are None and `note` says "n < 2"."""

    baseline: str                  # the best other method of the row
    okdph_mean: float
    baseline_mean: float
    okdph_better: bool | None      # higher mean (lower for a lower-is-better table such as Table 5)
    p: float | None
    note: str = ""

    @property
    def difference(self) -> float:
        return self.okdph_mean - self.baseline_mean


def record_value(record: dict, table_metric: str, metric: str) -> float | None:
    """The number a table shows for one run."""
    metrics = record.get("metrics") or {}
    if table_metric == "pacbayes":
        value = metrics.get("pacbayes")
        return value.get("value") if isinstance(value, dict) else value
    return (metrics.get(metric) or {}).get("acc")


def collect(choices: TableChoices, store: ResultStore, cells=None) -> list[CellResult]:
    """Every cell's values (of `cells`, default all) from the store's records, with the std
    convention chosen; a cell never mixes engines (choose an engine where the records of one cell
    come from several; `choices.engine` "auto" reads any)."""
    table, engine = choices.table, choices.engine if choices.engine != "auto" else None
    results = []
    for cell in cells or table.cells:
        config = cell_config(cell, profile=choices.profile, fidelity=choices.fidelity)
        records = store.records_for(config, engine)
        engines = sorted({r.get("engine") for r in records})
        if len(engines) > 1:
            raise ConfigError(f"{table.id} cell {cell.slug()} has records from engines {', '.join(engines)}; "
                              f"pass --engine with one of them")
        result = CellResult(cell, engine=engines[0] if engines else None, records=records,
                            std_convention=choices.std, run_dataset=config.dataset,
                            unreadable=len(store.damaged_for(config, engine)))
        for record in records:
            value = record_value(record, table.metric, choices.metric)
            if record.get("status") != "complete":
                result.not_complete += 1
            elif value is not None:
                result.values.append(value)
                result.seeds.append(record.get("seed"))
                result.run_ids.append(record["run_id"])
                if table.metric == "pacbayes" and (record.get("pacbayes") or {}).get("converged") is False:
                    result.not_converged += 1
        results.append(result)
    _mark_best(table, results)
    return results


def _row_key(table: Table, cell: Cell) -> tuple:
    return tuple(getattr(cell, f) for f in table.rows)


def group_rows(table: Table, results: list[CellResult]) -> dict[tuple, dict[str, CellResult]]:
    """The results by row of the table (its `rows` fields), each row by method, in table order."""
    rows: dict[tuple, dict[str, CellResult]] = {}
    for r in results:
        rows.setdefault(_row_key(table, r.cell), {})[r.cell.method] = r
    return rows


def _mark_best(table: Table, results: list[CellResult]) -> None:
    pick = max if table.better == "higher" else min
    for row in group_rows(table, results).values():
        row = list(row.values())
        measured = [r.mean for r in row if r.mean is not None]
        if len({round(m, 2) for m in measured}) > 1 or len(measured) == 1:  # a row of ties has no best
            best = pick(measured)
            for r in row:
                r.best = r.mean is not None and round(r.mean, 2) == round(best, 2)


def compares_okdph(table: Table) -> bool:
    """Whether the table gets the per-row test of OKDPH against its best other method."""
    return "okdph" in table.methods and len(table.methods) > 1


def okdph_vs_best_baseline(table: Table, row: dict[str, CellResult]) -> RowTest | None:
    """OKDPH against the other method of `row` with the best mean; None where OKDPH or every other
    method has no value yet (or the table has no OKDPH)."""
    ours = row.get("okdph")
    others = [r for method, r in row.items() if method != "okdph" and r.n > 0]
    if ours is None or ours.n == 0 or not others:
        return None
    higher = table.better == "higher"
    best = (max if higher else min)(others, key=lambda r: r.mean)  # ties: the first in table order
    if ours.n < 2 or best.n < 2:
        return RowTest(best.cell.method, ours.mean, best.mean, okdph_better=None, p=None, note="n < 2")
    better = ours.mean > best.mean if higher else ours.mean < best.mean
    return RowTest(best.cell.method, ours.mean, best.mean, okdph_better=better,
                   p=stats.welch_p(ours.values, best.values))


def _paper_best(table: Table, row: list[CellResult]) -> float | None:
    values = [r.cell.paper for r in row if r.cell.paper is not None]
    return (max if table.better == "higher" else min)(values) if values else None


# --------------------------------------------------------------------------------------------------
# Formatting


def format_ours(result: CellResult) -> str:
    """'94.12 ± 0.20 (n=5)'; one seed has no std; '' when nothing is recorded yet. Runs that are
    not in the mean are counted after it (diverged, unreadable records); bounds whose search did
    not converge are in it, marked."""
    notes = [f"{k} {what}" for k, what in ((result.not_converged, "not converged"),
                                           (result.not_complete, "diverged"), (result.unreadable, "unreadable")) if k]
    if result.n == 0:
        return f"({', '.join(notes)})" if notes else ""
    text = f"{result.mean:.2f}" + (f" ± {result.std:.2f}" if result.std is not None else "") + f" (n={result.n})"
    return ", ".join([text, *notes])


def format_delta(result: CellResult) -> str:
    return "–" if result.delta is None else f"{result.delta:+.2f}"


def format_row_test(test: RowTest | None) -> str:
    """'+0.42 vs DML *' (* where Welch's p < TABLE_ALPHA), 'n < 2', or '–' with nothing to compare."""
    if test is None:
        return "–"
    if test.p is None:
        return test.note
    marker = " *" if test.p < stats.TABLE_ALPHA else ""
    return f"{test.difference:+.2f} vs {display('method', test.baseline)}{marker}"


def _row_label(field_name: str, value, row: dict[str, CellResult]) -> str:
    """A row's label: the paper's, except the dataset of runs that train on other data (smoke:
    "digits (CIFAR-10 row)"), which names the data the numbers come from."""
    used = {r.run_dataset for r in row.values() if not r.paper_data}
    if field_name == "dataset" and len(used) == 1:
        return f"{display('dataset', used.pop())} ({display('dataset', value)} row)"
    return display(field_name, value)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on and text else text


def markdown_table(table: Table, results: list[CellResult], links: dict[str, str] | None = None) -> str:
    """The pipe table: per row of the paper's table one line of ours, one of the paper's values and
    one of Δ (the paper line only where the row has paper values; Δ only where the runs also use the
    paper's data, else the paper line is labelled with its dataset); methods are the columns, and a
    last column compares OKDPH with the best other method of the row."""
    rows = group_rows(table, results)
    methods = [m for m in table.methods if any(m in row for row in rows.values())]
    with_test = compares_okdph(table)
    lines = []
    for key, row in rows.items():
        label = [_row_label(f, v, row) for f, v in zip(table.rows, key)]
        ours = []
        for m in methods:
            r = row.get(m)
            text = format_ours(r) if r else ""
            if r and links and r.cell.slug() in links and text:
                text = f"[{text}]({links[r.cell.slug()]})"
            ours.append(_bold(text, bool(r and r.best)))
        test = [format_row_test(okdph_vs_best_baseline(table, row))] if with_test else []
        lines.append(label + ["ours"] + ours + test)
        paper_best = _paper_best(table, list(row.values()))
        if paper_best is None:
            continue
        blank = [""] * len(label)
        after = [""] if with_test else []
        paper_data = all(r.paper_data for r in row.values())
        # where the runs use other data (smoke: digits), the paper's number is only shown, labelled
        # with the data it was measured on, and no Δ is printed: the difference would mean nothing
        paper_label = "paper" if paper_data else f"paper ({display('dataset', next(iter(row.values())).cell.dataset)})"
        lines.append(blank + [paper_label] + [
            _bold(f"{row[m].cell.paper:.2f}{row[m].cell.paper_note}", row[m].cell.paper == paper_best)
            if m in row and row[m].cell.paper is not None else "–" for m in methods] + after)
        if paper_data:
            lines.append(blank + ["Δ"] + [format_delta(row[m]) if m in row else "" for m in methods] + after)
    headers = [HEADERS[f] for f in table.rows] + [""] + [display("method", m) for m in methods]
    headers += [ROW_TEST_HEADER] if with_test else []
    align = ["left"] * (len(table.rows) + 1) + ["right"] * (len(methods) + with_test)
    return tabulate(lines, headers=headers, tablefmt="pipe", colalign=align, disable_numparse=True)


def _seeds_text(results: list[CellResult]) -> str:
    """"run r has seed 42 + r" where the seeds recorded are 42, 43, ...; else which ones they are
    (`--seed-list`)."""
    seeds = sorted({s for r in results for s in r.seeds})
    if seeds == list(range(FIRST_SEED, FIRST_SEED + len(seeds))):
        return f"run r has seed {FIRST_SEED} + r"
    return f"seeds {', '.join(map(str, seeds))}"


def describe(choices: TableChoices, results: list[CellResult], runs_dir) -> str:
    """The lines above a table: what it shows and where the numbers come from."""
    table, profile, metric = choices.table, choices.profile, choices.metric
    filled = sum(r.n > 0 for r in results)
    engines = sorted({r.engine for r in results if r.engine})
    what = ("PAC-Bayes bound ×10^6 (lower is better), read from each record's `metrics.pacbayes`"
            if table.metric == "pacbayes" else f"top-1 accuracy (%), metric `{metric}`: {METRIC_TEXT[metric]}")
    convention = results[0].std_convention if results else DEFAULT_STD
    std_text = {"sample": "sample std (n − 1 in the denominator)",
                "population": "population std (n in the denominator, as the official logs print it)"}
    paper_data = all(r.paper_data for r in results)
    lines = [
        f"Profile `{profile}`, fidelity `{choices.fidelity}`, engine {', '.join(f'`{e}`' for e in engines) or '–'}; {what}.",
        f"Ours: mean ± {std_text[convention]} over the n seeds recorded ({_seeds_text(results)}); "
        + ("Δ = ours − paper; " if paper_data else "") + "the best of each row in bold; the CSV/JSON add both stds "
        f"and the {stats.CONFIDENCE:.0%} confidence interval of the mean.",
    ]
    if compares_okdph(table):
        lines.append(f"{ROW_TEST_HEADER}: OKDPH's mean minus that of the best other method of the row; * where "
                     f"Welch's two-sided t-test gives p < {stats.TABLE_ALPHA} (exact p in the CSV/JSON; uncorrected "
                     "for the number of rows); n < 2: a side has fewer than two runs, nothing is claimed.")
    lines.append(f"{filled} of {len(results)} cells have records in `{runs_dir}`. Paper values: {table.source}.")
    if any(r.unreadable for r in results):
        lines.append(f"Damaged records in `{runs_dir}` are not counted (\"unreadable\": the command named them); "
                     "running the table again trains their runs again.")
    if any(r.not_converged for r in results):
        lines.append("\"not converged\": the σ search of that many bounds stopped before the loss increase "
                     "reached ε within the tolerance; the value is the closest scale's, not the bound at ε.")
    provenance = sorted({_machine(rec) for r in results for rec in r.records})
    if provenance:
        lines.append("Runs made on: " + "; ".join(provenance) + ".")
    if profile in PROFILE_SCOPE:  # the smoke recipes of the table's backbones
        lines.append(PROFILE_SCOPE[profile].format(changes=smoke_changes({r.cell.backbone for r in results})))
    if any(r.cell.preset for r in results):
        lines.append("OKDPH runs with the ω, β, γ, Δ of supplement Tables 6/7 for its backbone, dataset, "
                     "student count and setting" + ("; OKDPH's defaults where the paper gives none."
                                                    if any(r.cell.method == "okdph" and not r.cell.preset
                                                           for r in results) else "."))
    return "\n".join(lines)


def _machine(record: dict) -> str:
    """Where a record was made: device, torch and git revision of the suite."""
    p = record.get("provenance") or {}
    git = str(p.get("git"))
    git = git[:12] + ("+dirty" if git.endswith("+dirty") else "")
    return f"{p.get('device', '?')}, torch {p.get('torch', '?')}, git {git}" if p else "unknown"


def legend(table: Table, results: list[CellResult]) -> str:
    used = {r.cell.paper_note for r in results if r.cell.paper_note}
    return "\n".join(f"{mark} {text}" for mark, text in table.notes.items() if mark in used)


def markdown(choices: TableChoices, results: list[CellResult], runs_dir, links=None, level: int = 1) -> str:
    table = choices.table
    parts = [f"{'#' * level} {table.id}: {table.title}", "", describe(choices, results, runs_dir), "",
             markdown_table(table, results, links)]
    notes = legend(table, results)
    if notes:
        parts += ["", notes]
    return "\n".join(parts) + "\n"


def rows_for_export(choices: TableChoices, results: list[CellResult]) -> list[dict]:
    """One dict per cell (the CSV's lines, the JSON's `cells`). `std` is the std the Markdown shows
    (`std_convention`); both conventions and the 95 % interval are always there. The OKDPH cell of a
    row also carries the row's comparison with its best other method (`best_baseline`, …,
    `welch_p`, `test_note`); the other cells have None there."""
    table = choices.table
    tests = {key: okdph_vs_best_baseline(table, row) for key, row in group_rows(table, results).items()}
    out = []
    for r in results:
        c = r.cell
        test = tests[_row_key(table, c)] if c.method == "okdph" else None
        ci = r.ci
        out.append({
            "table": table.id, "dataset": c.dataset, "backbone": c.backbone, "setting": c.setting,
            "students": c.students, "method": c.method, "overrides": dict(c.overrides), "preset": c.preset,
            "paper": c.paper, "paper_note": c.paper_note, "mean": r.mean, "std": r.std,
            "std_convention": r.std_convention, "std_sample": r.std_sample, "std_population": r.std_population,
            "n": r.n, "ci95_low": ci[0] if ci else None, "ci95_high": ci[1] if ci else None,
            "delta": r.delta, "best": r.best,
            "best_baseline": test.baseline if test else None,
            "best_baseline_mean": test.baseline_mean if test else None,
            "okdph_better": test.okdph_better if test else None, "welch_p": test.p if test else None,
            "test_note": test.note if test else None,
            "diverged": r.not_complete, "unreadable": r.unreadable, "not_converged": r.not_converged,
            "values": r.values, "seeds": r.seeds,
            "run_ids": r.run_ids, "engine": r.engine, "profile": choices.profile, "fidelity": choices.fidelity,
            "metric": choices.shown_metric,
        })
    return out


def write_table(choices: TableChoices, results: list[CellResult], out_dir, runs_dir,
                stem: str | None = None) -> dict[str, Path]:
    """<out_dir>/<stem>.md, .csv and .json (stem: the choices'); returns their paths."""
    table, out_dir = choices.table, Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem or choices.stem()}.{ext}" for ext in ("md", "csv", "json")}
    rows = rows_for_export(choices, results)
    _atomic_text(paths["md"], markdown(choices, results, runs_dir))
    buffer = io.StringIO()
    columns = [k for k in rows[0] if k not in ("overrides", "values", "seeds", "run_ids")]
    writer = csv.DictWriter(buffer, fieldnames=columns + ["overrides", "seeds", "run_ids"], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "overrides": " ".join(f"{k}={v}" for k, v in row["overrides"].items()),
                         "seeds": " ".join(map(str, row["seeds"])), "run_ids": " ".join(row["run_ids"])})
    _atomic_text(paths["csv"], buffer.getvalue())
    atomic_write_json(paths["json"], {
        "table": table.id, "title": table.title, "source": table.source, "profile": choices.profile,
        "fidelity": choices.fidelity, "metric": choices.shown_metric,
        "better": table.better, "runs_dir": str(runs_dir), "notes": table.notes,
        "std_convention": results[0].std_convention if results else DEFAULT_STD, "confidence": stats.CONFIDENCE,
        "alpha": stats.TABLE_ALPHA, "paper_data": all(r.paper_data for r in results),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cells": rows,
    })
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
