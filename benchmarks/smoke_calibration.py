"""What a smoke Table 3 that learns would cost: every distinct smoke run of a paper table under a
candidate smoke recipe, with each run's best accuracy and time (not part of the test suite).

    python benchmarks/smoke_calibration.py --epochs resnet32=4 --epochs vgg16=8 --batch vgg16=64 \\
        --view base --out results/perf/smoke-calibration.json

The smoke profile (okdph/engine/recipe.py) trains 6 steps a run, which keeps `okdph-bench run
--table 3 --profile smoke` near 1.5 minutes on 2 CPU cores and every cell near chance. This script
asks what a recipe that learns costs. A candidate differs from the smoke recipe in what the options
say, per backbone where they take `backbone=value`:
- `--epochs`: epochs over the whole digits training set (1,442 images; the smoke profile's cut to
  192 is lifted, and all 355 test images are used), with the profile's milestones scaled as usual
  (x0.1 after half and three quarters of the epochs);
- `--batch`, `--lr`: the batch size and the initial learning rate;
- `--view base`: digits without the CIFAR flip (a mirrored digit is another shape), for the methods
  that train on the dataset's default view. OKDPH's extra views keep their own flips.
It patches the recipe and the digits' default view in this process only: the runs' records go to a
temporary folder and say `profile: smoke` although they are not smoke runs, so they are not kept.

Results of 2026-12-03 on the 2-core AMD EPYC container are in results/perf/ (the JSON names the
command) and summarised in docs/verification.md#known-open-items.
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
import okdph.engine.run as run_module
from okdph.bench.experiments import expand, get_table, unique_configs
from okdph.bench.regress import machine
from okdph.engine.recipe import resolve_recipe
from okdph.engine.record import git_revision
from okdph.threads import default_threads

BACKBONES = ("resnet32", "vgg16")


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", default="3")
    parser.add_argument("--epochs", action="append", default=[], help="[backbone=]E (default: the smoke profile's)")
    parser.add_argument("--batch", action="append", default=[], help="[backbone=]B (default: 32)")
    parser.add_argument("--lr", action="append", default=[], help="[backbone=]LR (default: 0.1)")
    parser.add_argument("--view", default=None, help="the digits' default view (default: hflip, as CIFAR's)")
    parser.add_argument("--method", action="append", default=[], help="only these methods")
    parser.add_argument("--train-samples", type=int, default=None, help="the first N training images (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    epochs = per_backbone(args.epochs, int, "epochs")
    batch = per_backbone(args.batch, int, "batch")
    lr = per_backbone(args.lr, float, "lr")
    backbone = {"now": None}  # the backbone of the run in training: resolve_recipe is not told it

    def candidate_recipe(profile, dataset, run_epochs=None):
        changes = {"train_samples": args.train_samples, "test_samples": None}
        if backbone["now"] in batch:
            changes["batch_size"] = batch[backbone["now"]]
        if backbone["now"] in lr:
            changes["lr"] = lr[backbone["now"]]
        return dataclasses.replace(resolve_recipe(profile, dataset, run_epochs), **changes)

    digits, threads = data_info.get_info("digits"), torch.get_num_threads()
    rows, started = [], time.perf_counter()
    try:  # the patches hold for this call only
        run_module.resolve_recipe = candidate_recipe
        if args.view:
            data_info._BY_NAME["digits"] = dataclasses.replace(digits, default_view=args.view)
        used = default_threads()
        torch.set_num_threads(used)
        with tempfile.TemporaryDirectory(prefix="smoke-calibration-") as out_dir:
            runs = expand(get_table(args.table), profile="smoke", methods=args.method or None, engine="reference",
                          device="cpu", out_dir=out_dir)
            for cfg in unique_configs(runs):
                backbone["now"] = cfg.backbone
                cfg = dataclasses.replace(cfg, epochs=epochs.get(cfg.backbone))
                rows.append(calibration_row(cfg, run_module.train_run(cfg, progress=False)))
    finally:
        run_module.resolve_recipe = resolve_recipe
        data_info._BY_NAME["digits"] = digits
        torch.set_num_threads(threads)
    total = time.perf_counter() - started
    reached = sum(r["best_acc"] >= 70.0 for r in rows)
    print(f"{len(rows)} runs in {total:.0f} s; {reached} reach 70 %; lowest {min(r['best_acc'] for r in rows):.1f}")
    result = {
        "command": "python benchmarks/smoke_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "git": git_revision(), "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "threads": used},
        "candidate": {"epochs": epochs, "batch": batch, "lr": lr, "view": args.view or "hflip",
                      "train_samples": args.train_samples},
        "total_s": round(total, 1), "runs": len(rows), "reach_70": reached, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def calibration_row(cfg, record: dict) -> dict:
    """One run's line of the results (and of the output)."""
    recipe, best = record["recipe"], record["metrics"]["paper"]
    row = {"method": cfg.method, "backbone": cfg.backbone, "students": cfg.students, "overrides": dict(cfg.overrides),
           "views": record["views"], "epochs": recipe["epochs"], "batch_size": recipe["batch_size"], "lr": recipe["lr"],
           "best_acc": best["acc"], "best_head": best["head"], "best_epoch": best["epoch"],
           "final_acc": record["metrics"]["final"]["acc"], "wall_s": round(record["timing"]["wall_s"], 2)}
    print(f"{cfg.method:7} {cfg.backbone:8} n{cfg.students} E{row['epochs']} bs{row['batch_size']}: best "
          f"{best['acc']:5.1f} ({best['head']}, epoch {best['epoch']}), {row['wall_s']:.1f} s", flush=True)
    return row


if __name__ == "__main__":
    main()
