"""The benchmark harness (docs/architecture.md#harness-and-analyses): the paper's tables as data,
their expansion into runs, executors (local, SLURM, plain commands), the result store, table
rendering, the report and the accuracy-regression check.

    from okdph.bench import run_table
    run_table("3", profile="smoke")    # all of supplement Table 3 on the embedded data, a few minutes on CPU
"""
from okdph.bench.experiments import Cell, Run, Table, expand, get_table, list_tables, okdph_preset
from okdph.bench.runner import RunSummary, plan_table, render_table, run_table
from okdph.bench.store import ResultStore

__all__ = ["Cell", "ResultStore", "Run", "RunSummary", "Table", "expand", "get_table", "list_tables",
           "okdph_preset", "plan_table", "render_table", "run_table"]
