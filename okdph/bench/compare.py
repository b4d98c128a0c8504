"""`okdph-bench compare BASELINE CANDIDATE`: accuracy regression tracking between two result sets,
as a lab's CI runs it after a nightly sweep (the committed reference table against tonight's).

Each side is a results folder (with `runs/`: every table, profile and fidelity its records fill)
or a table JSON that `okdph-bench run` or `table` wrote (`results/tables/<stem>.json`). Cells are
matched by table, profile, fidelity and the cell's dataset, backbone, setting, students and method
(not by engine: a fast-engine sweep can be checked against a reference-engine one). A table JSON
holds one table, profile and fidelity: a results folder compared with it is read for those only.
Per cell common to both sides:

- Δ = candidate mean − baseline mean, over the seeds of each side;
- Welch's two-sided t-test on the seeds (okdph.bench.stats.welch_p);
- a verdict: `regressed` when the candidate is worse by at least `min_effect` points AND p < α,
  `improved` when better by as much AND p < α, `unchanged` otherwise. Worse is lower, or higher for
  a lower-is-better table (Table 5).
- Where a side has one run (the smoke table's default), no test is possible: with `max_drop` the
  cell is `regressed` when the candidate is worse by more than `max_drop` points and `unchanged`
  otherwise, a threshold set above the seed-to-seed and kernel-to-kernel moves measured on the
  smoke table (okdph.names.SINGLE_SEED_MAX_DROP, docs/protocol.md#one-run-per-cell); without it,
  `n < 2` (nothing tested).

Cells of one side only are listed, never silently skipped. Bad input (a missing path, unreadable
JSON, nothing in common) is a ConfigError: one line and exit 2 on the command line.

    result = compare("reference/table3.json", "results", metric="paper")
    print(result.markdown()); exit(1 if result.regressed else 0)
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from okdph.bench import stats
from okdph.bench.render import HEADERS, display
from okdph.errors import ConfigError
from okdph.names import COMPARE_ALPHA, COMPARE_MIN_EFFECT, METRICS, PROFILES

VERDICTS = ("regressed", "improved", "unchanged", "n < 2")


@dataclass(frozen=True)
class CellKey:
    """What makes two cells of two result sets the same cell."""

    table: str
    profile: str
    fidelity: str
    dataset: str
    backbone: str
    setting: str
    students: int
    method: str

    def where(self) -> str:
        """'table3-smoke': the table and the choices that are not the defaults, as file stems spell them."""
        parts = [self.table] + ([self.profile] if self.profile != "paper" else [])
        return "-".join(parts + ([self.fidelity] if self.fidelity != "official" else []))

    def row(self) -> str:
        """'CIFAR-10, ResNet32, #S/B 2' (the data setting only when it is not standard)."""
        setting = [] if self.setting == "standard" else [display("setting", self.setting)]
        return ", ".join([display("dataset", self.dataset), display("backbone", self.backbone), *setting,
                          f"{HEADERS['students']} {self.students}"])

    def label(self) -> str:
        return f"{self.where()} · {self.row()} · {display('method', self.method)}"


@dataclass
class Side:
    """One result set: the seeds' values of every cell that has any, and which way is better per table."""

    source: str
    values: dict[CellKey, list[float]] = field(default_factory=dict)
    better: dict[str, str] = field(default_factory=dict)  # table id -> "higher" or "lower"
    # what a table JSON covers, (table, profile, fidelity): the other side is compared on that only,
    # so a results folder's other tables and profiles are not listed as missing; None: a folder
    scope: tuple[str, str, str] | None = None

    def within(self, key: CellKey) -> bool:
        return self.scope is None or (key.table, key.profile, key.fidelity) == self.scope


@dataclass
class CellComparison:
    key: CellKey
    baseline: list[float]
    candidate: list[float]
    better: str                    # "higher" or "lower"
    p: float | None                # Welch's two-sided p; None where a side has n < 2
    verdict: str                   # one of VERDICTS

    @property
    def delta(self) -> float:
        return statistics.fmean(self.candidate) - statistics.fmean(self.baseline)


@dataclass
class Comparison:
    baseline: str
    candidate: str
    metric: str
    alpha: float
    min_effect: float
    max_drop: float | None     # the rule for cells with one run on a side; None: not tested
    cells: list[CellComparison]
    only_baseline: list[CellKey]
    only_candidate: list[CellKey]

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cells)

    @property
    def regressed(self) -> list[CellComparison]:
        return [c for c in self.cells if c.verdict == "regressed"]

    def summary(self) -> str:
        """One line, what CI prints last."""
        missing = len(self.only_baseline) + len(self.only_candidate)
        return (f"{len(self.cells)} cells compared: {self.count('regressed')} regressed, {self.count('improved')} "
                f"improved, {self.count('unchanged')} unchanged, {self.count('n < 2')} not tested (n < 2); "
                f"{missing} cells in one side only")

    @property
    def single(self) -> list[CellComparison]:
        """Cells with one run on a side: judged by `max_drop`, not by a test."""
        return [c for c in self.cells if c.p is None]

    def markdown(self) -> str:
        return _markdown(self)


# --------------------------------------------------------------------------------------------------
# Reading a side


def load_side(path, *, table: str | None = None, metric: str = "paper") -> Side:
    """The cells of a results folder or of a table JSON (of `table` only, when given)."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(f"{path} does not exist (expected a results folder or a table JSON)")
    if source.is_dir():
        side = _from_results(source, table, metric)
    else:
        side = _from_table_json(source, table, metric)
    if not side.values:
        raise ConfigError(f"{path} has no cell with values" + (f" of table {table}" if table else ""))
    return side


def _from_results(root: Path, table_name: str | None, metric: str) -> Side:
    from okdph.bench.choices import TableChoices
    from okdph.bench.experiments import get_table, list_tables
    from okdph.bench.render import collect
    from okdph.bench.store import ResultStore

    store = ResultStore(root)
    if not store.runs_dir.is_dir():
        raise ConfigError(f"{root} is not a results folder: it has no runs/ folder")
    side = Side(str(root))
    combos = sorted({(r.get("profile"), r.get("fidelity")) for r in store.records()
                     if r.get("profile") in PROFILES}, key=str)
    tables = [get_table(table_name)] if table_name else [get_table(t) for t in list_tables()]
    for table in tables:
        for profile, fidelity in combos:
            if profile not in table.profiles:
                continue
            try:
                results = collect(TableChoices(table, profile, fidelity, engine=None, metric=metric), store)
            except ConfigError as exc:  # a cell with records of two engines: which one to compare?
                raise ConfigError(f"{root}: {str(exc).split('; pass --engine')[0]}; render one engine's table "
                                  f"(`okdph-bench table ID --engine E`) and compare its JSON") from None
            for r in results:
                if r.values:
                    c = r.cell
                    key = CellKey(table.id, profile, fidelity, c.dataset, c.backbone, c.setting, c.students, c.method)
                    side.values[key] = list(r.values)
                    side.better[table.id] = table.better
    return side


def _from_table_json(path: Path, table_name: str | None, metric: str) -> Side:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or "table" not in data:
        raise ConfigError(f"{path} is not a table JSON of `okdph-bench run` or `table` (no table and cells)")
    if table_name:
        from okdph.bench.experiments import get_table

        wanted = get_table(table_name).id
        if data["table"] != wanted:
            raise ConfigError(f"{path} holds {data['table']}, not {wanted}")
    held = data.get("metric")
    if held in METRICS and held != metric:  # Table 5's JSON holds "pacbayes": --metric does not apply
        raise ConfigError(f"{path} holds metric '{held}', not '{metric}'; pass --metric {held}")
    side = Side(str(path), better={data["table"]: data.get("better", "higher")},
                scope=(data["table"], data.get("profile"), data.get("fidelity")))
    try:
        for cell in data["cells"]:
            if cell.get("values"):
                key = CellKey(data["table"], cell.get("profile", data.get("profile")),
                              cell.get("fidelity", data.get("fidelity")), cell["dataset"], cell["backbone"],
                              cell["setting"], int(cell["students"]), cell["method"])
                side.values[key] = [float(v) for v in cell["values"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} has a cell without its fields ({type(exc).__name__}: {exc})") from None
    return side


# --------------------------------------------------------------------------------------------------
# Comparing


def verdict(delta: float, p: float | None, better: str, *, alpha: float, min_effect: float,
            max_drop: float | None = None) -> str:
    """regressed / improved: a change of at least `min_effect` points in that direction with p < α;
    unchanged otherwise. Where no test was possible (p None): regressed when worse by more than
    `max_drop` points, unchanged otherwise; 'n < 2' without `max_drop`."""
    gain = delta if better == "higher" else -delta
    if p is None:
        if max_drop is None:
            return "n < 2"
        return "regressed" if gain < -max_drop else "unchanged"
    if p < alpha and gain <= -min_effect:
        return "regressed"
    if p < alpha and gain >= min_effect:
        return "improved"
    return "unchanged"


def compare(baseline, candidate, *, table: str | None = None, metric: str = "paper",
            alpha: float = COMPARE_ALPHA, min_effect: float = COMPARE_MIN_EFFECT,
            max_drop: float | None = None) -> Comparison:
    """Every cell of `baseline` and `candidate` (paths: results folders or table JSONs) compared."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; valid: {', '.join(METRICS)}")
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must be between 0 and 1, got {alpha}")
    if not 0 <= min_effect < math.inf:  # NaN fails both comparisons
        raise ConfigError(f"--min-effect must be a finite number >= 0 points, got {min_effect}")
    if max_drop is not None and not 0 <= max_drop < math.inf:
        raise ConfigError(f"--max-drop must be a finite number >= 0 points, got {max_drop}")
    before = load_side(baseline, table=table, metric=metric)
    after = load_side(candidate, table=table, metric=metric)
    in_before = {k for k in before.values if after.within(k)}
    in_after = {k for k in after.values if before.within(k)}
    common = sorted(in_before & in_after, key=_table_order)
    if not common:
        raise ConfigError(f"{baseline} and {candidate} have no cell in common ({len(before.values)} and "
                          f"{len(after.values)} cells with values; check --table, --metric and the profiles)")
    cells = []
    for key in common:
        a, b = before.values[key], after.values[key]
        better = before.better.get(key.table, "higher")
        p = stats.welch_p(a, b)
        delta = statistics.fmean(b) - statistics.fmean(a)
        outcome = verdict(delta, p, better, alpha=alpha, min_effect=min_effect, max_drop=max_drop)
        cells.append(CellComparison(key, a, b, better, p, outcome))
    return Comparison(str(baseline), str(candidate), metric, alpha, min_effect, max_drop, cells,
                      only_baseline=sorted(in_before - in_after, key=_table_order),
                      only_candidate=sorted(in_after - in_before, key=_table_order))


def _table_order(key: CellKey) -> tuple:
    """Cells in the order a table lists them: by table and setting, then row, then the table's method order."""
    from okdph.bench.experiments import get_table

    try:
        methods = get_table(key.table).methods
        method = methods.index(key.method) if key.method in methods else len(methods)
    except ConfigError:  # a table this installation does not know (a JSON from elsewhere)
        method = 0
    return (key.where(), key.dataset, key.backbone, key.setting, key.students, method, key.method)


# --------------------------------------------------------------------------------------------------
# The report


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = stats.std(values, "sample")
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={len(values)})"


def _p_text(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def _markdown(result: Comparison) -> str:
    from tabulate import tabulate

    tested = [c for c in result.cells if c.p is not None]
    if result.max_drop is not None and result.single:
        untested = (f"a cell with one run on a side cannot be tested: it **regressed** when the candidate is worse by "
                    f"more than {result.max_drop:g} points (above the seed-to-seed moves measured on "
                    "the smoke table).")
    else:
        untested = "n < 2: a side has fewer than two runs, nothing is tested."
    lines = [
        "# okdph-bench compare", "",
        f"Baseline `{result.baseline}`, candidate `{result.candidate}`; metric `{result.metric}`"
        + (" (Table 5: the PAC-Bayes bound, where lower is better)" if any(c.better == "lower" for c in result.cells)
           else "") + "; each cell's mean ± sample std over its seeds (n).",
        f"A cell **regressed** when the candidate's mean is worse by at least {result.min_effect:g} points and "
        f"Welch's two-sided t-test on the seeds gives p < {result.alpha:g}; **improved** likewise the other way; "
        f"unchanged otherwise; {untested}",
    ]
    small = [c for c in tested if min(len(c.baseline), len(c.candidate)) <= 5]
    if small:
        n_a = min(len(c.baseline) for c in small)
        n_b = min(len(c.candidate) for c in small)
        lines.append(f"Why Welch's t-test: with n <= 5 runs per side a rank test (Mann-Whitney U) cannot reach "
                     f"small p (with {n_a} and {n_b} runs its smallest p is "
                     f"{stats.rank_test_smallest_p(n_a, n_b):.3g}, however far apart the runs); the t-test can, "
                     "assuming the seed-to-seed spread is roughly normal.")
    if len(tested) > 1:
        lines.append(f"{len(tested)} cells were tested, each at α = {result.alpha:g} without correction: if nothing "
                     f"had changed, about {len(tested) * result.alpha:.1f} would reach p < {result.alpha:g} by "
                     f"chance; the minimum effect of {result.min_effect:g} points keeps those from failing CI.")
    lines += ["", f"**{result.summary()}.**", ""]
    if result.regressed:
        lines += ["## Regressed", ""]
        lines += [f"- {c.key.label()}: {_spread(c.baseline)} → {_spread(c.candidate)}, Δ {c.delta:+.2f}, "
                  f"p {_p_text(c.p)}" for c in result.regressed]
        lines.append("")
    if result.only_baseline or result.only_candidate:
        lines += ["## Cells in one side only", ""]
        lines += [f"- only in the baseline: {k.label()}" for k in result.only_baseline]
        lines += [f"- only in the candidate: {k.label()}" for k in result.only_candidate]
        lines.append("")
    rows = [[c.key.where(), c.key.row(), display("method", c.key.method), _spread(c.baseline), _spread(c.candidate),
             f"{c.delta:+.2f}", _p_text(c.p), f"**{c.verdict}**" if c.verdict == "regressed" else c.verdict]
            for c in result.cells]
    lines += ["## Every common cell", "",
              tabulate(rows, headers=["table", "row", "method", "baseline", "candidate", "Δ", "p", "verdict"],
                       tablefmt="pipe", colalign=["left"] * 3 + ["right"] * 5, disable_numparse=True)]
    return "\n".join(lines) + "\n"
