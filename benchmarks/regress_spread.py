"""How far `okdph-bench regress`'s numbers move across CPU kernels, and how far a change of a method moves them.

    python benchmarks/regress_spread.py            # writes results/regression/spread.json

The regression runs (okdph/bench/regress.py) are measured under every kernel setting of
`regress.KERNEL_SETTINGS` (instruction-set caps for oneDNN, MKL and ATen) with 1 and 2 threads, each in
its own process since the libraries read those variables once. Against the default setting with one
thread it reports the largest relative difference of any training loss and any accuracy difference:
what the tolerance must absorb. Then it changes one line's worth of each method, its distillation
temperature by 1 %, and reports the largest relative move of that method's losses: what the tolerance
must still catch. The tolerance in regress.py is set between the two with the margins it states.
Run it on an idle machine; it takes about 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from okdph.bench import regress
from okdph.engine.record import atomic_write_json, git_revision
from okdph.strategy import list_strategies

THREADS = (1, 2)
CHANGE = 1.01  # the distillation temperature, ×1.01: a small edit of one line of a method


def measure_in_subprocess(setting: str, threads: int) -> dict:
    env = {**os.environ, **regress.KERNEL_SETTINGS[setting]}
    out = subprocess.run([sys.executable, __file__, "--measure", "--threads", str(threads)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def largest_loss_move(measured: dict, baseline: dict) -> float:
    return max(regress.relative_move(measured["train_loss"][k], v) for k, v in baseline["train_loss"].items())


def largest_acc_move(measured: dict, baseline: dict) -> float:
    moves = [abs(measured[k] - baseline[k]) for k in ("paper_acc", "final_acc")]
    moves += [abs(measured["test_acc"][h] - a) for h, a in baseline["test_acc"].items()]
    return max(moves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="(internal) print one setting's numbers as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/regression/spread.json")
    args = parser.parse_args()
    methods = list_strategies()
    if args.measure:
        print(json.dumps(regress.measure_all(methods, threads=args.threads)))
        return

    runs = {f"{setting}/{threads}t": measure_in_subprocess(setting, threads)
            for setting in regress.KERNEL_SETTINGS for threads in THREADS}
    baseline = runs["default/1t"]
    spread = {name: {m: {"loss_rel": largest_loss_move(run[m], baseline[m]),
                         "acc_abs": largest_acc_move(run[m], baseline[m])} for m in methods}
              for name, run in runs.items()}

    with_temperature = [m for m in methods if "temperature" in regress.config_fields(m)]
    changed = regress.measure_all(with_temperature, overrides={
        m: {"temperature": str(regress.config_fields(m)["temperature"] * CHANGE)} for m in with_temperature})
    change = {m: largest_loss_move(changed[m], baseline[m]) for m in with_temperature}

    worst_spread = max(v["loss_rel"] for per_method in spread.values() for v in per_method.values())
    worst_acc = max(v["acc_abs"] for per_method in spread.values() for v in per_method.values())
    report = {
        "command": "python benchmarks/regress_spread.py",
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": regress.machine(),
        "setup": regress.SETUP,
        "kernel_settings": regress.KERNEL_SETTINGS,
        "largest_loss_rel_across_settings": worst_spread,
        "largest_acc_abs_across_settings": worst_acc,
        "temperature_change": CHANGE,
        "smallest_loss_rel_of_a_change": min(change.values()),
        "change_loss_rel": change,
        "spread": spread,
    }
    atomic_write_json(Path(args.out), report)
    print(f"across {len(runs)} kernel/thread settings: losses within {worst_spread:.2g} relative, "
          f"accuracies within {worst_acc:.2g} points")
    print(f"temperature x{CHANGE}: smallest move {min(change.values()):.2g} relative "
          f"({min(change, key=change.get)}); wrote {args.out}")


if __name__ == "__main__":
    main()
