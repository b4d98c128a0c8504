"""The benchmark harness (docs/architecture.md#harness-and-analyses): the paper's tables as data,
their expansion into runs, executors (local, SLURM, plain commands), the result store, table
rendering, the report and the accuracy-regression check.

    from okdph.bench import Execution, TableChoices, run_table
    run_table(TableChoices.of("3", profile="smoke"), Execution(jobs=2))  # supplement Table 3 on the embedded data
"""
from okdph.bench.choices import Execution, TableChoices
from okdph.bench.experiments import Cell, Run, Table, expand, get_table, list_tables, okdph_preset
from okdph.bench.runner import RunSummary, plan_table, render_table, run_table
from okdph.bench.store import ResultStore

__all__ = ["Cell", "Execution", "ResultStore", "TableChoices", "Run", "RunSummary", "Table", "expand", "get_table", "list_tables",
           "okdph_preset", "plan_table", "render_table", "run_table"]
