"""Calibrate the smoke profile: every distinct smoke run of a paper table under a candidate recipe,
with each run's accuracy per epoch and its time (not part of the test suite).

    python benchmarks/smoke_calibration.py --epochs resnet32=3 --epochs vgg16=5 \\
        --out results/perf/cpu-2core-amd-epyc-smoke-calibration.json

A candidate differs from the committed smoke recipes (okdph/engine/recipe.py, SMOKE_RECIPES, and
SMOKE_DEFAULT for a backbone without one) in what the options say, per backbone where they take
`backbone=value`:
- `--epochs`, `--batch`, `--lr`: epochs over the digits training set, batch size, initial lr;
- `--warmup`: epochs of linear warm-up before the linear decay;
- `--schedule`: step (x0.1 at half and three quarters of the epochs) or linear (to 0 per step);
- `--width`: the channel multiplier of every run;
- `--flip on|off`: whether the digits' views flip horizontally, in every view of every method
  (OKDPH's Cutout, RandAugment and AutoAugment students included); default: the dataset's (off).
The patches hold in this process only and every run trains here, one after another, on the
threads `okdph.threads.default_threads()` gives (OMP_NUM_THREADS=1 for per-run costs). The runs'
records go to a temporary folder: they say `profile: smoke` but are not smoke runs, so they are not kept.
What the whole table costs under the committed recipe is `okdph-bench run --table 3 --profile smoke`
itself (docs/verification.md#smoke-recipe).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import okdph.data.info as data_info
from okdph.bench.experiments import expand, get_table, unique_configs
from okdph.bench.regress import machine
from okdph.engine import recipe as recipes
from okdph.engine.record import git_revision
from okdph.engine.run import train_run
from okdph.names import BACKBONES
from okdph.threads import default_threads

REACHED = 70.0  # the accuracy every smoke cell should reach (docs/verification.md#smoke-recipe)


def per_backbone(values: list[str], kind, name: str) -> dict[str, object]:
    """`["resnet32=4", "vgg16=8"]` or `["4"]` (every backbone) -> {backbone: value}."""
    out = {}
    for value in values:
        backbone, _, number = value.rpartition("=")
        for b in ([backbone] if backbone else BACKBONES):
            if b not in BACKBONES:
                sys.exit(f"error: --{name} {value}: backbone must be one of {', '.join(BACKBONES)}")
            out[b] = kind(number)
    return out


def candidate(args) -> dict[str, recipes.Recipe]:
    """The smoke recipe of each backbone with the options' changes."""
    changes = {"epochs": per_backbone(args.epochs, int, "epochs"), "batch_size": per_backbone(args.batch, int, "batch"),
               "lr": per_backbone(args.lr, float, "lr"), "schedule": per_backbone(args.schedule, str, "schedule"),
               "warmup_epochs": per_backbone(args.warmup, int, "warmup")}
    out = {}
    for backbone in BACKBONES:
        recipe = recipes.SMOKE_RECIPES.get(backbone, recipes.SMOKE_DEFAULT)
        mine = {field: values[backbone] for field, values in changes.items() if backbone in values}
        if not mine and backbone not in recipes.SMOKE_RECIPES:
            continue
        if mine.get("schedule", recipe.schedule) == "step":  # x0.1 at half and three quarters
            epochs = mine.get("epochs", recipe.epochs)
            mine["milestones"] = tuple(sorted({max(1, epochs // 2), max(1, 3 * epochs // 4)}))
        out[backbone] = dataclasses.replace(recipe, **mine)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="3")
    parser.add_argument("--epochs", action="append", default=[], help="[backbone=]E")
    parser.add_argument("--batch", action="append", default=[], help="[backbone=]B")
    parser.add_argument("--lr", action="append", default=[], help="[backbone=]LR")
    parser.add_argument("--schedule", action="append", default=[], help="[backbone=]step|linear")
    parser.add_argument("--warmup", action="append", default=[], help="[backbone=]W (linear schedule)")
    parser.add_argument("--width", type=float, default=None, help="channel multiplier (default: the profile's)")
    parser.add_argument("--flip", choices=("on", "off"), default=None, help="mirror the digits in every view")
    parser.add_argument("--method", action="append", default=[], help="only these methods")
    parser.add_argument("--backbone", action="append", default=[], help="only these backbones")
    parser.add_argument("--students", action="append", type=int, default=[], help="only these student/branch counts")
    parser.add_argument("--train-samples", type=int, default=None, help="the first N training images (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="every run at this seed (default: the table's, 42)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    chosen = candidate(args)
    digits, saved_recipes, threads = data_info.get_info("digits"), dict(recipes.SMOKE_RECIPES), torch.get_num_threads()
    rows, started = [], time.perf_counter()
    try:  # the patches hold for this call only
        recipes.SMOKE_RECIPES.update(chosen)
        if args.flip:
            data_info._BY_NAME["digits"] = dataclasses.replace(digits, mirror_invariant=args.flip == "on")
        used = default_threads()
        torch.set_num_threads(used)
        with tempfile.TemporaryDirectory(prefix="smoke-calibration-") as out_dir:
            runs = expand(get_table(args.table), profile="smoke", methods=args.method or None, out_dir=out_dir)
            for cfg in unique_configs(runs):
                if (args.backbone and cfg.backbone not in args.backbone) or (
                        args.students and cfg.students not in args.students):
                    continue
                cfg = dataclasses.replace(cfg, width=args.width, train_samples=args.train_samples, checkpoint_every=0,
                                          seed=cfg.seed if args.seed is None else args.seed)
                rows.append(calibration_row(cfg, train_run(cfg, progress=False)))
    finally:
        recipes.SMOKE_RECIPES.clear()
        recipes.SMOKE_RECIPES.update(saved_recipes)
        data_info._BY_NAME["digits"] = digits
        torch.set_num_threads(threads)
    total = time.perf_counter() - started
    reached = sum(r["best_acc"] >= REACHED for r in rows)
    print(f"{len(rows)} runs in {total:.0f} s; {reached} reach {REACHED:g} %; "
          f"lowest {min((r['best_acc'] for r in rows), default=float('nan')):.1f}")
    result = {
        "command": "python benchmarks/smoke_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "git": git_revision(), "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "threads": used},
        "candidate": {b: r.to_dict() for b, r in chosen.items()},
        "flip": args.flip or "dataset", "width": args.width, "seed": args.seed,
        "total_s": round(total, 1), "runs": len(rows), "reach_70": reached, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def calibration_row(cfg, record: dict) -> dict:
    """One run's line of the results (and of the output)."""
    recipe, best = record["recipe"], record["metrics"]["paper"]
    accs = record["history"]["test_acc"]
    per_epoch = [round(max(acc[e] for acc in accs.values()), 2) for e in range(len(next(iter(accs.values()))))]
    row = {"method": cfg.method, "backbone": cfg.backbone, "students": cfg.students, "seed": cfg.seed,
           "overrides": dict(cfg.overrides), "views": record["views"],
           "horizontal_flip": record["data"]["horizontal_flip"], "epochs": recipe["epochs"],
           "batch_size": recipe["batch_size"], "lr": recipe["lr"], "schedule": recipe["schedule"],
           "best_acc": best["acc"], "best_head": best["head"], "best_epoch": best["epoch"], "per_epoch": per_epoch,
           "final_acc": record["metrics"]["final"]["acc"], "wall_s": round(record["timing"]["wall_s"], 2),
           "engine": record["engine"]}
    print(f"{cfg.method:7} {cfg.backbone:8} n{cfg.students} s{cfg.seed} E{row['epochs']} bs{row['batch_size']}: best "
          f"{best['acc']:5.1f} ({best['head']}, epoch {best['epoch']}), {row['wall_s']:.1f} s", flush=True)
    return row


if __name__ == "__main__":
    main()
