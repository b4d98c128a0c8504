"""What a PAC-Bayes bound costs on the CPU, before and after each lever (not part of the test suite):
how many loss evaluations the scale search needs, the guided search of
`okdph.analysis.pacbayes.search_scale` against plain doubling and bisection (`guided=False`, the
search it replaced), and what one pass of a network over the training set costs at the GPU's batch
of 1,024 in the default layout against the CPU's batch of 128 channels-last.

    python benchmarks/pacbayes_search.py --out results/perf/pacbayes-speed/search-synthetic.json
    python benchmarks/pacbayes_search.py --passes --out results/perf/pacbayes-speed/passes.json
    python benchmarks/pacbayes_search.py --records DIR/runs --out results/perf/pacbayes-speed/table5-smoke.json

Each evaluation of a real network is `samples` (10) passes over its training set, so the count of
evaluations is the cost. Synthetic: seeded increases that grow like a mixture of two powers of the
scale, crossing ε = 0.1 anywhere from 1e-4 to 1e3, at the embedded profiles' tolerance (1e-2) and
the default one (1e-4), without a cap. Records: the bound of every record in DIR that kept its
weights (a Table 5 run), with both searches and the embedded profiles' settings, timed one after
the other on this machine's threads: compare the two columns, not other machines. Passes: each
smoke backbone at its smoke width over 1,442 random digits-sized images, three weight sets, the two
settings alternating three times (medians).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def synthetic(count: int = 3000, seed: int = 0) -> dict:
    from okdph.analysis.pacbayes import search_scale

    rng = random.Random(seed)
    out = {}
    for tolerance in (1e-2, 1e-4):
        counts = {"guided": [], "plain": []}
        for _ in range(count):
            low, high = rng.uniform(0.5, 5.0), rng.uniform(1.0, 6.0)
            crossing, share = 10 ** rng.uniform(-4, 3), rng.uniform(0.0, 1.0)

            def increase(s):
                return 0.1 * ((1 - share) * (s / crossing) ** low + share * (s / crossing) ** high)

            for name, guided in (("guided", True), ("plain", False)):
                found = search_scale(increase, epsilon=0.1, tolerance=tolerance, max_iterations=1000, guided=guided)
                assert found.converged
                counts[name].append(found.iterations)
        out[f"tolerance {tolerance:g}"] = {
            name: {"mean": statistics.fmean(c), "median": statistics.median(c), "max": max(c),
                   "over 15": sum(n > 15 for n in c)} for name, c in counts.items()}
        out[f"tolerance {tolerance:g}"]["ratio of means (plain / guided)"] = (
            statistics.fmean(counts["plain"]) / statistics.fmean(counts["guided"]))
    return {"functions": count, "seed": seed, "results": out}


def passes(rounds: int = 3) -> dict:
    import torch

    from okdph.analysis.evaluate import (CPU_BATCH_SIZE, DEFAULT_BATCH_SIZE, TrainImages, build_network, flatten,
                                         split_state, stacked_loss, trainable_names, unflatten)
    from okdph.data import get_info
    from okdph.engine.recipe import default_width

    generator = torch.Generator().manual_seed(0)
    data = TrainImages(torch.randint(0, 256, (1442, 3, 32, 32), dtype=torch.uint8, generator=generator),
                       torch.randint(0, 10, (1442,), generator=generator), get_info("digits"))
    settings = {"batch 1024, default layout": (DEFAULT_BATCH_SIZE, False),
                "batch 128, channels-last": (CPU_BATCH_SIZE, True)}
    out = {}
    for backbone in ("resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8"):
        width = default_width("smoke", backbone)
        net = build_network({"backbone": backbone, "num_classes": 10, "width": width}, "cpu")
        names = trainable_names(net)
        params, buffers = split_state(net.state_dict(), names)
        weights = flatten(params, names)
        stack = unflatten(weights[None] + 0.01 * torch.randn(3, weights.numel(), generator=generator), params, names)
        seconds = {name: [] for name in settings}
        for _ in range(rounds):
            for name, (batch_size, channels_last) in settings.items():
                started = time.perf_counter()
                stacked_loss(net, stack, buffers, data, batch_size=batch_size, channels_last=channels_last)
                seconds[name].append((time.perf_counter() - started) / 3)
        row = {name: round(statistics.median(s), 3) for name, s in seconds.items()}
        row["ratio"] = round(row["batch 1024, default layout"] / row["batch 128, channels-last"], 2)
        print(backbone, width, json.dumps(row), flush=True)
        out[f"{backbone} width {width:g}"] = row
    return {"seconds per pass (median)": out, "rounds": rounds}


def on_records(runs_dir: Path) -> list[dict]:
    from okdph.analysis.pacbayes import run_bounds
    from okdph.bench.runner import EMBEDDED_SEARCH
    from okdph.engine.checkpoint import trajectory_dir

    rows = []
    for record_path in sorted(runs_dir.glob("*.json")):
        if not trajectory_dir(record_path).is_dir():
            continue
        row = {"run": record_path.stem}
        for name, guided in (("plain", False), ("guided", True)):
            started = time.perf_counter()
            _, bounds = run_bounds(record_path, guided=guided, progress=False, **EMBEDDED_SEARCH)
            result = bounds[-1].result
            row[name] = {"seconds": round(time.perf_counter() - started, 2), "evaluations": result.iterations,
                         "converged": result.converged, "scale": result.scale, "value": result.value}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=Path, default=None, help="a runs folder of Table 5 runs")
    parser.add_argument("--passes", action="store_true", help="time one network pass, before and after")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {"command": "python benchmarks/pacbayes_search.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "synthetic": synthetic()}
    print(json.dumps(report["synthetic"], indent=1), flush=True)
    if args.passes:
        report["passes"] = passes()
    if args.records:
        rows = on_records(args.records)
        total = {name: sum(r[name]["seconds"] for r in rows) for name in ("plain", "guided")}
        report["records"] = {"runs": rows, "seconds": total,
                             "evaluations": {name: sum(r[name]["evaluations"] for r in rows) for name in total},
                             "ratio (plain / guided)": (total["plain"] / total["guided"] if total["guided"]
                                                        else math.nan)}
        print(json.dumps({k: v for k, v in report["records"].items() if k != "runs"}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
