"""Everything that needs a GPU, checked and timed in one invocation (a few minutes).

    python benchmarks/gpu_check.py --out results/perf

1. Checks: the reference engine trains on CUDA; two deterministic CUDA runs on digits agree
   bit for bit; CUDA and CPU runs of the same configuration reach comparable accuracy.
2. Timings: one full epoch (train + test) of the reference path on the CIFAR-shaped `synthetic100`
   data for the anchor configurations of ../shared/reference/gpu-baseline.md (OKDPH ResNet32 with
   2 students + HWM; DML with ResNet32, VGG16, WRN20-8), next to the official code's s/epoch.

Writes <out>/<card>.json and <card>.md, named after the GPU.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from okdph.engine.record import atomic_write_json, provenance
from okdph.engine.run import RunConfig, train_run

# Official code, one epoch train + test on an H200 (gpu-baseline.md §1).
OFFICIAL_EPOCH_S = {("okdph", "resnet32"): 28.8, ("dml", "resnet32"): 15.7, ("dml", "vgg16"): 9.5,
                    ("dml", "wrn20_8"): 13.0}


def run(tmp: Path, **kwargs) -> dict:
    return train_run(RunConfig(out_dir=str(tmp), **kwargs), progress=False)


def checks(tmp: Path) -> list[dict]:
    results = []
    smoke = dict(method="okdph", profile="smoke", epochs=3, overrides=(("interval", "3b"),), deterministic=True)
    a = run(tmp / "a", device="cuda", **smoke)
    b = run(tmp / "b", device="cuda", **smoke)
    same = a["history"]["train_loss"] == b["history"]["train_loss"] and \
        a["history"]["test_acc"] == b["history"]["test_acc"]
    results.append({"check": "deterministic CUDA runs are bitwise identical (okdph, digits, 3 epochs)",
                    "passed": same, "acc": a["metrics"]["paper"]["acc"]})
    c = run(tmp / "c", device="cpu", **smoke)
    gap = abs(a["metrics"]["paper"]["acc"] - c["metrics"]["paper"]["acc"])
    results.append({"check": "CUDA and CPU runs of one config reach comparable accuracy (|Δ| < 10 points)",
                    "passed": gap < 10.0, "cuda_acc": a["metrics"]["paper"]["acc"],
                    "cpu_acc": c["metrics"]["paper"]["acc"]})
    return results


def timings(tmp: Path, workers: int) -> list[dict]:
    rows = []
    for (method, backbone), official in OFFICIAL_EPOCH_S.items():
        dataset = "synthetic100"
        t0 = time.perf_counter()
        record = run(tmp / f"{method}-{backbone}", method=method, backbone=backbone, dataset=dataset,
                     profile="paper", epochs=1, device="cuda", workers=workers)
        timing = record["timing"]
        rows.append({"engine": "reference", "method": method, "backbone": backbone, "dataset": dataset,
                     "models": len(record["heads"]), "epoch_s": timing["wall_s"],
                     "train_s": timing["train_s"], "eval_s": timing["eval_s"],
                     "train_samples_per_s": timing["train_samples_per_s"],
                     "official_epoch_s_h200": official, "process_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/perf")
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    card = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        check_rows = checks(tmp)
        for row in check_rows:
            print(json.dumps(row), flush=True)
        timing_rows = timings(tmp, args.workers)
    report = {"card": torch.cuda.get_device_name(device), "provenance": provenance(device),
              "date": time.strftime("%Y-%m-%d"), "checks": check_rows, "timings": timing_rows,
              "wall_s": time.perf_counter() - started,
              "note": "one epoch each on synthetic100 (50,000 train / 10,000 test, 32x32); the official "
                      "numbers were measured on an H200 (gpu-baseline.md)"}
    out = Path(args.out)
    atomic_write_json(out / f"{card}.json", report)
    lines = [f"# GPU check: {report['card']} ({report['date']})", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, git {report['provenance']['git']}", "",
             "| check | passed |", "|---|---|"]
    lines += [f"| {r['check']} | {'yes' if r['passed'] else 'NO'} |" for r in check_rows]
    lines += ["", "| engine | method | backbone | models | epoch s (train + test) | train samples/s | "
              "official epoch s (H200) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['method']} | {r['backbone']} | {r['models']} | {r['epoch_s']:.1f} | "
              f"{r['train_samples_per_s']:.0f} | {r['official_epoch_s_h200']} |" for r in timing_rows]
    (out / f"{card}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["passed"] for r in check_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
