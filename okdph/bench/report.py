"""`okdph-bench report`: results/REPORT.md with every table that has records (one section per
table, profile and fidelity), each table also drawn as a figure (results/figures/<stem>.png: per
row of the table one panel, the methods with error bars) and a learning-curve PNG per cell, linked
from the cell's value. Table 5 (PAC-Bayes bound) is one of those tables; the analysis figures that
`okdph-bench pacbayes --per-epoch` and `okdph-bench landscape` write to results/figures/analysis/
follow, one image each.

The figures use matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend state).
"""
from __future__ import annotations

import math
import os
import statistics
import textwrap
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from okdph.bench.choices import TableChoices
from okdph.bench.experiments import Table, get_table, list_tables
from okdph.bench.render import (HEADERS, CellResult, collect, display, group_rows, markdown,
                                write_table)
from okdph.bench.stats import check_std
from okdph.bench.store import ResultStore
from okdph.errors import ConfigError
from okdph.names import DEFAULT_STD, PROFILES

OKDPH_COLOUR, OTHER_COLOUR, PAPER_COLOUR = "tab:red", "tab:blue", "0.45"


def learning_curve(records: list[dict], title: str, path: Path) -> Path:
    """Test accuracy per epoch of every head: the mean over seeds, shaded ± sample std."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.8, 3.2), dpi=100)
    ax = fig.add_subplot()
    heads = list(records[0]["history"]["test_acc"])
    for head in heads:
        curves = [r["history"]["test_acc"].get(head, []) for r in records]
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        epochs = range(1, length + 1)
        mean = [statistics.fmean(c[e] for c in curves) for e in range(length)]
        line, = ax.plot(epochs, mean, marker="o" if length < 10 else None, markersize=3, linewidth=1.2,
                        label=head)
        if len(curves) > 1:
            std = [statistics.stdev(c[e] for c in curves) for e in range(length)]
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{title} (n={len(records)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _row_title(table: Table, result: CellResult) -> str:
    """'CIFAR-10, ResNet32, #S/B 3': the row's fields as the table prints them."""
    return ", ".join(f"{HEADERS[f]} {display(f, getattr(result.cell, f))}" if f == "students"
                     else display(f, getattr(result.cell, f)) for f in table.rows)


def table_figure(table: Table, results: list[CellResult], path: Path, *, title: str) -> Path | None:
    """The table as a figure: one panel per row that has values, the methods along x, each the mean
    with an error bar of the std the table shows (none below two runs; n under the name), OKDPH in
    red; the paper's value as a grey diamond where the runs use the paper's data. None when no row
    has a value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = [[r for r in row.values() if r.n > 0] for row in group_rows(table, results).values()]
    rows = [row for row in rows if row]
    if not rows:
        return None
    columns = min(3, len(rows))
    panels = math.ceil(len(rows) / columns)
    fig = Figure(figsize=(4.6 * columns, 3.1 * panels + 0.6), dpi=100)
    FigureCanvasAgg(fig)  # Agg explicitly: reports are written on headless machines
    axes = fig.subplots(panels, columns, squeeze=False).ravel()
    shows_paper = False
    for ax, row in zip(axes, rows):
        xs = range(len(row))
        for x, r in zip(xs, row):
            colour = OKDPH_COLOUR if r.cell.method == "okdph" else OTHER_COLOUR
            ax.errorbar([x], [r.mean], yerr=[r.std] if r.std is not None else None, fmt="o", color=colour,
                        markersize=5, capsize=4, elinewidth=1.2)
            if r.delta is not None:  # a paper value measured on the data these runs use
                ax.plot([x], [r.cell.paper], marker="D", markersize=5, fillstyle="none", color=PAPER_COLOUR,
                        linestyle="none")
                shows_paper = True
        ax.set_xticks(list(xs), [f"{display('method', r.cell.method)}\nn={r.n}" for r in row], fontsize=7)
        ax.set_xlim(-0.6, len(row) - 0.4)
        ax.set_title(_row_title(table, row[0]), fontsize=9)
        ax.set_xlabel("method", fontsize=8)
        ax.set_ylabel("PAC-Bayes bound ×10^6 (lower is better)" if table.metric == "pacbayes"
                      else "top-1 accuracy (%)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    convention = rows[0][0].std_convention
    handles = [Line2D([], [], marker="o", color=OTHER_COLOUR, linestyle="none", label=f"mean ± {convention} std"),
               Line2D([], [], marker="o", color=OKDPH_COLOUR, linestyle="none", label="OKDPH")]
    if shows_paper:
        handles.append(Line2D([], [], marker="D", fillstyle="none", color=PAPER_COLOUR, linestyle="none",
                              label="paper"))
    fig.legend(handles=handles, loc="lower center", fontsize=8, ncols=len(handles), frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(title, 45 * columns)), fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # room for the title, and the legend below
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _cell_title(result: CellResult, record: dict) -> str:
    c = result.cell
    setting = "" if c.setting == "standard" else f" {display('setting', c.setting)}"
    ran_on = "" if record.get("dataset") == c.dataset else f" (ran on {record.get('dataset')})"
    return (f"{display('method', c.method)}, {display('backbone', c.backbone)} ×{c.students}, "
            f"{display('dataset', c.dataset)}{setting}{ran_on}")


def _collect_by_engine(choices: TableChoices, store) -> list[tuple[str | None, list[CellResult]]]:
    """One result set, or one per engine where a cell holds records of several."""
    try:
        return [(None, collect(choices, store))]
    except ConfigError:
        engines = sorted({r.get("engine") for r in store.records()})
        return [(engine, collect(replace(choices, engine=engine), store)) for engine in engines]


def analysis_figures(store: ResultStore) -> str:
    """The section of the analysis PNGs under results/figures/analysis/ ('' when there are none):
    each image with the data file it was drawn from (.json / .npz beside it)."""
    pngs = sorted(store.analysis_dir.glob("*.png"))
    if not pngs:
        return ""
    lines = ['<a id="analyses"></a>', "", "## Analyses", "",
             "Figures of `okdph-bench pacbayes --per-epoch` (the bound against the epoch, supplement Fig. 1) and "
             "`okdph-bench landscape` (training loss around the students' trajectories, Figs. 2-5), from "
             f"`{store.analysis_dir}`; the data beside each figure redraws it.", ""]
    for png in pngs:
        rel = Path(os.path.relpath(png, store.root)).as_posix()
        data = sorted(p.name for p in png.parent.glob(f"{png.stem}*") if p.suffix in (".json", ".npz"))
        lines += [f"### {png.stem}", "", f"![{png.stem}]({rel})", ""]
        if data:
            lines += ["Data: " + ", ".join(f"`{name}`" for name in data), ""]
    return "\n".join(lines)


def write_report(results="results", *, metric: str = "paper", std: str = DEFAULT_STD) -> Path:
    """Render every table for every (profile, fidelity) that has records, as Markdown and as a figure;
    returns REPORT.md's path. `std`: the std convention of the tables and their error bars."""
    check_std(std)  # before any folder is touched, even with no records
    store = ResultStore.of(results)
    store.check_writable(store.root, store.tables_dir, store.figures_dir)  # before any figure is drawn
    records = store.records()
    combos = sorted({(r.get("profile"), r.get("fidelity")) for r in records},
                    key=lambda pf: (PROFILES.index(pf[0]) if pf[0] in PROFILES else 99, str(pf[1])))
    report_path = store.root / "REPORT.md"
    sections, index = [], []
    for table_id in list_tables():
        table = get_table(table_id)
        for profile, fidelity in combos:
            if profile not in table.profiles:
                continue
            choices = TableChoices(table, profile, fidelity, engine=None, metric=metric, std=std)
            for engine, results_ in _collect_by_engine(choices, store):
                if not any(r.recorded for r in results_):
                    continue
                stem = choices.stem() + (f"-{engine}" if engine else "")
                links = {}
                for r in results_:
                    cell_records = [rec for rec in r.records if rec.get("history", {}).get("test_acc")]
                    if cell_records:
                        png = learning_curve(cell_records, _cell_title(r, cell_records[0]),
                                             store.figures_dir / stem / f"{r.cell.slug()}.png")
                        links[r.cell.slug()] = Path(os.path.relpath(png, store.root)).as_posix()
                write_table(choices, results_, store.tables_dir, store.runs_dir, stem=choices.stem())
                anchor = stem
                index.append(f"- [{stem}](#{anchor}): {table.title}")
                section = f'<a id="{anchor}"></a>\n\n' + markdown(choices, results_, store.runs_dir, links=links,
                                                                     level=2)
                png = table_figure(table, results_, store.figures_dir / f"{stem}.png",
                                   title=f"{stem}: {table.title}")
                if png:
                    section += f"\n![{stem} as a figure]({Path(os.path.relpath(png, store.root)).as_posix()})\n"
                sections.append(section)
    figures = analysis_figures(store)
    if figures:
        index.append("- [analyses](#analyses): PAC-Bayes bound per epoch (Fig. 1) and loss landscapes (Figs. 2-5)")
        sections.append(figures)
    head = [
        "# okdph-bench report", "",
        f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {len(records)} run records "
        f"in `{store.runs_dir}` by `okdph-bench report`. Each table is regenerated from the records and drawn "
        "below it (per row, the methods' means with error bars of the table's std); a value links to the "
        "learning curves of its cell (test accuracy of every head per epoch, mean ± sample std over seeds).",
        "",
    ]
    body = index + [""] + sections if sections else ["No run records yet: run `okdph-bench run --table 3 "
                                                     "--profile smoke` first."]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(head + body) + "\n")
    return report_path
