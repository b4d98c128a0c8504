"""What CI's accuracy check must catch: one method's smoke cells of Table 3 trained with the labels of
every training batch shuffled (a method broken in a way the smoke table can see), compared with the
committed smoke table by the rule CI applies (not part of the test suite).

    python benchmarks/broken_method.py --method dml --out results/perf/broken-dml

Trains in this process (the patch holds here only), writes the records and the table under `--out`
(never under results/: the records carry the real runs' ids), and writes `compare.md`, the report
of `okdph-bench compare results/reference/tables/table3-smoke.json <out>/tables/table3-smoke.json`.
Its table (`tables/`) stays beside the report: tests/test_bench_compare.py checks that the rule
names exactly the broken method's cells on it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from okdph.bench.compare import compare
from okdph.bench.runner import Execution, TableChoices, run_table
from okdph.names import SINGLE_SEED_MAX_DROP
from okdph.strategy import get_strategy

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "tables" / "table3-smoke.json"


def break_labels(method: str) -> None:
    """Every training batch of `method` sees its labels in a random order (test labels unchanged)."""
    cls = get_strategy(method)
    forward = cls.forward_train

    def shuffled(self, images, targets, *, epoch, step):
        return forward(self, images, targets[torch.randperm(targets.shape[0], device=targets.device)],
                       epoch=epoch, step=step)

    cls.forward_train = shuffled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results, out = REFERENCE.parents[2], args.out.resolve()
    if out.is_relative_to(results) and not out.is_relative_to(results / "perf"):
        sys.exit(f"error: --out {args.out}: keep the broken runs out of results/ (results/perf/<name> is fine)")
    break_labels(args.method)
    summary = run_table(TableChoices.of("3", profile="smoke"), Execution(jobs=1, progress=False), methods=[args.method],
                        results=args.out)
    table = args.out / "tables" / "table3-smoke.json"
    result = compare(REFERENCE, table, max_drop=SINGLE_SEED_MAX_DROP)
    (args.out / "compare.md").write_text(result.markdown())
    shutil.rmtree(args.out / "runs")  # the records' ids are the real runs': keep only the table and report
    print(result.summary())
    print(json.dumps({"trained": summary.trained, "regressed": [c.key.label() for c in result.regressed]}, indent=1))
    return 1 if result.regressed else 0


if __name__ == "__main__":
    sys.exit(main())
