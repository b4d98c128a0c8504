"""How far a smoke-table cell moves when nothing changed: the spread behind CI's rule for cells with
one run (not part of the test suite).

    python benchmarks/smoke_spread.py results/reference/tables/table3-smoke.json \\
        results/perf/smoke-spread/seeds-43-44.json results/perf/smoke-spread/avx2.json ... \\
        --out results/perf/smoke-spread/spread.json

Each argument is a table JSON of Table 3 smoke (`okdph-bench run ... --results DIR` writes one
to DIR/tables/): the committed reference, then the same command run again with other seeds
(`--seed-list 43,44`) and under other CPU kernels (`ONEDNN_MAX_CPU_ISA=AVX2`, `=AVX512_CORE`). For
every run of a cell it takes the drop from the reference's run (seed 42), reference minus other,
and reports the largest drop, per backbone and overall, and the largest move either way.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path


def runs_of(path: Path) -> dict[tuple, list[tuple[int, float]]]:
    """(backbone, students, method, overrides) -> [(seed, value)] of a table JSON, one entry per distinct run."""
    data = json.loads(path.read_text())
    out: dict[tuple, dict[int, float]] = {}
    for cell in data["cells"]:
        key = (cell["backbone"], cell["students"], cell["method"], json.dumps(cell.get("overrides") or {},
                                                                             sort_keys=True))
        for seed, value in zip(cell["seeds"], cell["values"]):
            out.setdefault(key, {})[seed] = value
    return {k: sorted(v.items()) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    reference = {k: dict(v)[42] for k, v in runs_of(args.reference).items()}
    moves = []
    for path in args.others:
        for key, values in runs_of(path).items():
            for seed, value in values:
                moves.append({"source": path.name, "backbone": key[0], "students": key[1], "method": key[2],
                              "overrides": json.loads(key[3]), "seed": seed, "reference": reference[key],
                              "value": value, "drop": reference[key] - value})
    if not moves:
        sys.exit("error: no run to compare")
    largest = max(moves, key=lambda m: m["drop"])
    backbones = sorted({m["backbone"] for m in moves})
    by_backbone = {b: max(m["drop"] for m in moves if m["backbone"] == b) for b in backbones}
    result = {
        "command": "python benchmarks/smoke_spread.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs_compared": len(moves), "largest_drop": largest, "largest_drop_by_backbone": by_backbone,
        "largest_rise": max(-m["drop"] for m in moves), "moves": moves}
    print(f"{len(moves)} runs against the reference: largest drop {largest['drop']:.2f} points "
          f"({largest['method']} {largest['backbone']} n{largest['students']}, {largest['source']} seed "
          f"{largest['seed']}); by backbone " + ", ".join(f"{b} {d:.2f}" for b, d in by_backbone.items())
          + f"; largest rise {result['largest_rise']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
