"""Everything that needs a GPU, checked and timed in one invocation, each result beside its target.

    python benchmarks/gpu_check.py --out results/perf        # one CUDA GPU: writes <card>.json and .md
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke  # every row at tiny sizes on the CPU

Checks first, then timings; the report is rewritten after every row, so a run cut short still leaves
what it measured. The exit status is 1 when a row broke (an exception, recorded with its message) or
a target was missed.

Targets (one H100/H200; one epoch = 50,000 train + 10,000 test images of synthetic100, CIFAR-100
shaped; the table is `TARGETS` below, and the report states each beside its measurement):

    target              goal      measured by
    okdph_epoch         <= 2 s    OKDPH ResNet32, 2 students + HWM, fp32, fast: one epoch including evaluation
    pack_epoch          <= 8 s    five packed OKDPH ResNet32 seeds: one epoch
    pack_memory         <= 16 GB  five packed OKDPH ResNet32 seeds: peak GPU memory
    speedup_resnet32    >= 8x     every other method on ResNet32: reference epoch / fast epoch
    speedup_dml_large   >= 4x     DML on VGG16 and WRN20-8: reference epoch / fast epoch
    fused_equal         <= 1e-5   grouped vs separate networks, fp32 with TF32 off: outputs, max relative difference
    fused_grads         <= 0.001  the same networks' gradients, norm-wise relative difference (this script's bound)
    graph_replay        <= 0      CUDA-graph replay vs eager (OKDPH, 5b fusion, 12 steps): max relative difference
    determinism         <= 0      two deterministic reference runs: history entries that differ
    parity              <= 3      fast vs reference accuracy over 3 seeds: mean gap in standard deviations
    bf16_spread         <= 3      bf16 fast vs fp32 fast accuracy over 3 seeds: mean gap in fp32 standard deviations

A gap in standard deviations is |mean a - mean b| over the larger sample standard deviation of the
two sets of seeds (of fp32 alone for bf16), taken as at least one accuracy point. Rows without a
target are context: the reference epochs, the bf16 epochs, the official code's epoch on an H200
(docs/verification.md#gpu-measurements). The fast engine's first epoch includes its
eager warm-up and graph captures; its steady-state figure (the one judged) is its second epoch.

`--smoke` runs every check and timing row on the CPU at tiny sizes (digits, 1/8-width networks, one
step per epoch), so tests/test_gpu_check.py keeps this script working without a GPU. There
- timing and accuracy targets read "n/a (smoke sizes)": a CPU at these sizes says nothing about them;
- equalities are still judged (the fused check in float64 on the CPU, see `check_fused`; determinism
  of the reference engine on the CPU);
- CUDA-only steps are rows marked "skipped" with the reason: CUDA-graph capture (the graph check
  runs its bookkeeping with an eager stand-in for each captured graph) and CUDA memory statistics.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from okdph.data import build_test_set, build_train_set, get_info
from okdph.engine.fast import FastEngine
from okdph.engine.fused import FusedGroup
from okdph.engine.packed import PackedFastEngine  # noqa: F401 - imported so a broken pack fails at once
from okdph.engine.recipe import resolve_recipe
from okdph.engine.record import atomic_write_json, provenance
from okdph.engine.run import RunConfig, _first, train_packed, train_run
from okdph.models import ModelGroup, create_backbone
from okdph.okdph import OKDPH
from okdph.strategy import build_config, list_strategies

# ---- targets -----------------------------------------------------------------------------------

FULL, ANY = "full", "any"  # a target judged only at full sizes on a GPU, or at any size


@dataclass(frozen=True)
class Target:
    what: str     # the target, as the report states it
    metric: str   # the measurement it reads from a row
    op: str       # "<=" or ">="
    limit: float
    unit: str
    sizes: str    # FULL: timings and accuracy statistics; ANY: equalities

    def goal(self) -> str:
        return f"{self.op} {self.limit:g}{self.unit}".replace("e-0", "e-")  # 1e-5, not 1e-05

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit


TARGETS = {
    "okdph_epoch": Target("OKDPH ResNet32, 2 students + HWM, fp32, fast: one epoch including evaluation",
                          "epoch_s", "<=", 2.0, " s", FULL),
    "pack_epoch": Target("five packed OKDPH ResNet32 seeds: one epoch", "epoch_s", "<=", 8.0, " s", FULL),
    "pack_memory": Target("five packed OKDPH ResNet32 seeds: peak GPU memory", "peak_gb", "<=", 16.0, " GB", FULL),
    "speedup_resnet32": Target("every other method on ResNet32: reference epoch / fast epoch", "speedup", ">=",
                               8.0, "x", FULL),
    "speedup_dml_large": Target("DML on VGG16 and WRN20-8: reference epoch / fast epoch", "speedup", ">=", 4.0,
                                "x", FULL),
    "fused_equal": Target("grouped vs separate networks, fp32 with TF32 off: outputs, max relative difference",
                          "outputs_rel_diff", "<=", 1e-5, "", ANY),
    # Not one of issue 15's: fp32 gradients through 31 BatchNorm layers differ more than outputs
    # (on a CPU at half width, the separate networks' own fp32 gradients are 2e-3 from fp64, the
    # grouped ones 8e-6), so a bound per parameter or at 1e-5 would fail on rounding alone.
    "fused_grads": Target("the same networks' gradients, norm-wise relative difference (this script's bound)",
                          "gradients_rel_diff", "<=", 1e-3, "", ANY),
    "graph_replay": Target("CUDA-graph replay vs eager (OKDPH, 5b fusion, 12 steps): max relative difference",
                           "max_rel_diff", "<=", 0.0, "", ANY),
    "determinism": Target("two deterministic reference runs: history entries that differ", "differences", "<=",
                          0, "", ANY),
    "parity": Target("fast vs reference accuracy over 3 seeds: mean gap in standard deviations", "gap_sd", "<=",
                     3.0, "", FULL),
    "bf16_spread": Target("bf16 fast vs fp32 fast accuracy over 3 seeds: mean gap in fp32 standard deviations",
                          "gap_sd", "<=", 3.0, "", FULL),
}

# Official code, one epoch train + test on an H200 (docs/verification.md#gpu-measurements).
OFFICIAL_EPOCH_S = {("okdph", "resnet32"): 28.8, ("dml", "resnet32"): 15.7, ("dml", "vgg16"): 9.5,
                    ("dml", "wrn20_8"): 13.0}
ANCHORS = list(OFFICIAL_EPOCH_S)  # also timed in bf16
SEEDS = (42, 43, 44)              # the accuracy checks' seeds


def fast_target(method: str, backbone: str) -> str | None:
    """The target a fast fp32 epoch is judged by."""
    if (method, backbone) == ("okdph", "resnet32"):
        return "okdph_epoch"
    if backbone == "resnet32":
        return "speedup_resnet32"
    if method == "dml":
        return "speedup_dml_large"
    return None


@dataclass(frozen=True)
class Sizes:
    """What every row trains on: the GPU measurement's sizes, or the smoke run's."""

    device: str
    dataset: str                # timings and the graph check
    parity_dataset: str         # the accuracy checks
    profile: str
    width: float | None         # None: the profile's
    train_samples: int | None   # None: the profile's (every image for paper)
    fused_batch: int            # the fused check's batch
    graph_batch: int | None     # the graph check's batch size; None: the recipe's
    workers: int                # reference-engine DataLoader workers


GPU = Sizes(device="cuda", dataset="synthetic100", parity_dataset="synthetic10", profile="paper", width=None,
            train_samples=None, fused_batch=256, graph_batch=None, workers=8)
# One step per epoch (32 digits), 1/8-width networks: every row in about a second on one CPU thread.
SMOKE = Sizes(device="cpu", dataset="digits", parity_dataset="digits", profile="smoke", width=0.125,
              train_samples=32, fused_batch=8, graph_batch=4, workers=0)


# ---- the report --------------------------------------------------------------------------------


def judge(name: str, value: float | None, smoke: bool, skipped: str | None = None) -> dict:
    """A target beside its measurement: pass, FAIL, n/a at smoke sizes, or skipped (with why)."""
    target = TARGETS[name]
    if skipped:
        status = f"skipped: {skipped}"
    elif smoke and target.sizes == FULL:
        status = "n/a (smoke sizes)"
    elif value is None or (isinstance(value, float) and math.isnan(value)):
        status = "FAIL (not measured)"
    else:
        status = "pass" if target.met(value) else "FAIL"
    return {"target": name, "goal": target.goal(), "what": target.what, "measured": value, "status": status}


class Report:
    def __init__(self, out: Path, sizes: Sizes, smoke: bool):
        device = torch.device(sizes.device)
        self.smoke = smoke
        self.card = "cpu-smoke" if smoke else torch.cuda.get_device_name(device)
        self.slug = re.sub(r"[^A-Za-z0-9]+", "-", self.card).strip("-")
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = {"card": self.card, "smoke": smoke, "date": time.strftime("%Y-%m-%d"),
                     "provenance": provenance(device), "command": " ".join(sys.argv),
                     "sizes": dataclasses.asdict(sizes), "targets": [], "checks": [], "timings": []}

    def add(self, section: str, row: dict, targets: list[dict] = ()) -> None:
        """A check or timing row, and the targets judged on it (each names its row)."""
        self.data[section].append(row)
        for t in targets:
            self.data["targets"].append({**t, "row": row.get("check") or row_name(row)})
        print(json.dumps(row), flush=True)
        self.write()

    def failed(self) -> list[str]:
        """Rows that broke and targets missed."""
        bad = [f"{row_name(r)}: {r['error']}" for s in ("checks", "timings") for r in self.data[s] if "error" in r]
        return bad + [f"{t['target']} ({t['row']}): {t['status']}" for t in self.data["targets"]
                      if t["status"].startswith("FAIL")]

    def write(self) -> None:
        atomic_write_json(self.out / f"{self.slug}.json", self.data)
        d = self.data
        p = d["provenance"]
        lines = [f"# GPU check: {d['card']} ({d['date']})", "",
                 f"torch {p['torch']}, CUDA {p['cuda']}, git {p['git']}, {p['device']}; `{d['command']}`", ""]
        if d["smoke"]:
            lines += ["Smoke run: every row at tiny sizes on the CPU, to keep the script working. Its timings "
                      "say nothing about the GPU targets.", ""]
        lines += ["## Targets", "", "| target | row | goal | measured | status |", "|---|---|---|---|---|"]
        lines += [f"| {t['what']} | {t['row']} | {t['goal']} | {fmt(t['measured'])} | {t['status']} |"
                  for t in d["targets"]]
        lines += ["", "## Checks", "", "| check | detail |", "|---|---|"]
        lines += [f"| {r['check']} | {r.get('error') or r.get('detail', '')} |" for r in d["checks"]]
        lines += ["", "## Timings", "", f"One epoch (train + test) on {d['sizes']['dataset']}; fast = steady-state "
                  "(second) epoch.", "",
                  "| method | backbone | engine | precision | epoch s | first epoch s | train samples/s | "
                  "speed-up vs reference | peak GB | official epoch s (H200) |", "|---" * 10 + "|"]
        for r in d["timings"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['backbone']} | {r['engine']} | {r['precision']} | "
                             f"error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['method']} | {r['backbone']} | {r['engine']} | {r['precision']} | "
                         f"{r['epoch_s']:.2f} | {r['first_epoch_s']:.2f} | {r['train_samples_per_s']:.0f} | "
                         f"{fmt(r.get('speedup'), 'x')} | {fmt(r.get('peak_gb'))} | "
                         f"{fmt(OFFICIAL_EPOCH_S.get((r['method'], r['backbone'])))} |")
        (self.out / f"{self.slug}.md").write_text("\n".join(lines) + "\n")


def row_name(row: dict) -> str:
    if "check" in row:
        return row["check"]
    return f"{row['method']} {row['backbone']} {row['engine']} {row['precision']}".strip()


def fmt(value, unit: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return (f"{value:.1e}" if value and abs(value) < 1e-2 else f"{value:.2f}") + unit
    return f"{value}{unit}"


# ---- checks ------------------------------------------------------------------------------------


def check_fused(report: Report, tmp: Path, sizes: Sizes) -> None:
    """Grouped vs separate convolutions in true fp32 on a GPU (cuDNN's default TF32 rounds the two
    differently), in float64 on the CPU: there, in fp32, train-mode BatchNorm's gradient sums cancel
    so much that either path's gradients differ from float64 by 1e-5 to 1e-2 norm-wise depending on
    the draw (measured at smoke sizes, docs/verification.md#gpu-measurements), rounding that no bound
    tells apart from a grouping error."""
    cuda = sizes.device == "cuda"
    dtype = torch.float32 if cuda else torch.float64
    if cuda:
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        group = ModelGroup([create_backbone("resnet32", 100, width=sizes.width or 1.0) for _ in range(3)])
        group = group.to(sizes.device, dtype).train()
        exact = copy.deepcopy(group).double()  # whose rounding a difference is, for the detail
        fused = FusedGroup(copy.deepcopy(group), probe_shape=(3, 32, 32)).train()
        x = [torch.randn(sizes.fused_batch, 3, 32, 32, device=sizes.device, dtype=dtype) for _ in range(3)]
        a, b, c = group(x), fused(x), exact([v.double() for v in x])
        for out in (a, b, c):
            out.square().mean().backward()
        rel = ((a - b).abs().max() / a.abs().max()).item()
        grads = fused.stacked()
        separate = torch.cat([p.grad.flatten() for net in group for p in net.parameters()])
        grouped = torch.cat([grads[n].grad[k].flatten() for k, net in enumerate(group)
                             for n, _ in net.named_parameters()])
        fp64 = torch.cat([p.grad.flatten() for net in exact for p in net.parameters()])

        def norm_rel(u, v):
            return ((u.double() - v.double()).norm() / v.double().norm()).item()

        grad_rel = norm_rel(grouped, separate)
        separate_err, grouped_err = norm_rel(separate, fp64), norm_rel(grouped, fp64)
    finally:
        if cuda:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    row = {"check": f"grouped ResNet32 x3 equals separate networks ({sizes.device}, "
                    f"{'fp32, TF32 off' if cuda else 'float64'}, train mode)",
           "outputs_rel_diff": rel, "gradients_rel_diff": grad_rel,
           "gradients_vs_fp64": {"separate": separate_err, "grouped": grouped_err},
           "detail": f"outputs max rel diff {rel:.1e}, gradients norm-wise {grad_rel:.1e} (against fp64: "
                     f"separate {separate_err:.1e}, grouped {grouped_err:.1e})"}
    report.add("checks", row, [judge("fused_equal", rel, report.smoke), judge("fused_grads", grad_rel, report.smoke)])


class EagerStandIn:
    """What a captured CUDA graph does, done eagerly, for the CPU smoke run: capture records the
    step's Python constants (batch, epoch, step) and runs nothing; each replay runs the step with
    those constants, as a graph replays its kernels. It exercises the engine's graph bookkeeping;
    it says nothing about CUDA graphs themselves."""

    def __init__(self, engine: FastEngine, batch: int, epoch: int, step: int):
        self.engine, self.args = engine, (batch, epoch, step)

    def replay(self) -> None:
        self.engine._step(*self.args)


def check_graph_replay(report: Report, tmp: Path, sizes: Sizes) -> None:
    """Eager and graph-replayed fast engines, same data and seed, must end with equal weights."""
    info = get_info(sizes.dataset)
    recipe = resolve_recipe("paper", sizes.dataset).with_epochs(300)
    if sizes.graph_batch is not None:
        recipe = dataclasses.replace(recipe, batch_size=sizes.graph_batch)
    steps = 12  # a short epoch: fusion at steps 0, 5, 10
    train = _first(build_train_set(sizes.dataset, "data", ["hflip"]), steps * recipe.batch_size)
    test = _first(build_test_set(sizes.dataset, "data"), recipe.batch_size)
    cuda = sizes.device == "cuda"
    if not cuda:
        assert hasattr(FastEngine, "_capture"), "FastEngine._capture is gone: update the stand-in below"
    states, engines = [], []
    for graphs in (False, True):
        torch.manual_seed(0)
        config = build_config(OKDPH.Config, {"interval": "5b", "gamma": "0.5"})
        strategy = OKDPH(config=config, backbone="resnet32", num_classes=info.num_classes, num_models=2,
                         dataset=info, width=sizes.width or 1.0).to(sizes.device)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        engine = FastEngine(strategy, train, test, recipe, sizes.device, seed=0, graphs=graphs, fuse=True)
        if graphs and not cuda:
            engine._capture = lambda batch, epoch, step, engine=engine: EagerStandIn(engine, batch, epoch, step)
        assert (engine.full_batches, engine.remainder) == (steps, 0)
        engine.train_epoch(0)
        states.append(torch.cat([v.float().flatten() for s in strategy.students.member_states() for v in s.values()]))
        engines.append(engine)
    rel = ((states[0] - states[1]).abs().max() / states[0].abs().max()).item()
    graphs = engines[1].describe()["cuda_graphs"]
    row = {"check": "CUDA-graph replay equals eager (OKDPH, 5b fusion, 12 steps)", "max_rel_diff": rel,
           "graphs": graphs, "detail": f"max rel diff {rel:.1e}; graphs used: {graphs}"}
    skipped = None
    if not cuda:
        skipped = "CUDA graphs need CUDA"
        row["detail"] += " (an eager stand-in for each graph, on the CPU)"
    report.add("checks", row, [judge("graph_replay", rel, report.smoke, skipped)])


def check_determinism(report: Report, tmp: Path, sizes: Sizes) -> None:
    kw = dict(method="okdph", profile="smoke", epochs=2, overrides=(("interval", "3b"),), deterministic=True,
              device=sizes.device, engine="reference", width=sizes.width, train_samples=sizes.train_samples)
    a = train_run(RunConfig(out_dir=str(tmp / "det-a"), **kw), progress=False)
    b = train_run(RunConfig(out_dir=str(tmp / "det-b"), **kw), progress=False)
    differences = sum(a["history"][k][name][e] != b["history"][k][name][e]
                      for k in ("train_loss", "test_acc") for name in a["history"][k]
                      for e in range(len(a["history"][k][name])))
    row = {"check": f"deterministic reference runs ({sizes.device}) are bitwise identical",
           "differences": differences,
           "detail": f"{differences} differing history entries; acc {a['metrics']['paper']['acc']:.2f}"}
    report.add("checks", row, [judge("determinism", differences, report.smoke)])


def gap_in_sd(a: list[float], b: list[float], spread: float) -> float:
    """|mean(a) - mean(b)| in units of `spread`, at least one accuracy point."""
    return abs(statistics.mean(a) - statistics.mean(b)) / max(spread, 1.0)


def check_accuracy(report: Report, tmp: Path, sizes: Sizes) -> None:
    """OKDPH over three seeds: reference, fast fp32 and fast bf16, one epoch each."""
    accs = {}
    for engine, precision in (("reference", "fp32"), ("fast", "fp32"), ("fast", "bf16")):
        accs[f"{engine} {precision}"] = [
            train_run(RunConfig(method="okdph", dataset=sizes.parity_dataset, profile=sizes.profile, epochs=1,
                                seed=seed, engine=engine, precision=precision, device=sizes.device,
                                width=sizes.width, train_samples=sizes.train_samples, workers=sizes.workers,
                                out_dir=str(tmp / "accuracy")), progress=False)["metrics"]["paper"]["acc"]
            for seed in SEEDS]
    ref, fp32, bf16 = accs["reference fp32"], accs["fast fp32"], accs["fast bf16"]
    parity = gap_in_sd(fp32, ref, max(statistics.stdev(ref), statistics.stdev(fp32)))
    report.add("checks", {"check": f"fast vs reference accuracy, OKDPH {sizes.parity_dataset}, 1 epoch, 3 seeds",
                          "gap_sd": parity, "accuracies": accs, "detail": f"reference {ref}, fast {fp32}"},
               [judge("parity", parity, report.smoke)])
    spread = gap_in_sd(bf16, fp32, statistics.stdev(fp32))
    report.add("checks", {"check": f"fast bf16 vs fast fp32 accuracy, OKDPH {sizes.parity_dataset}, 1 epoch, "
                                   "3 seeds", "gap_sd": spread, "detail": f"fp32 {fp32}, bf16 {bf16}"},
               [judge("bf16_spread", spread, report.smoke)])


# ---- timings -----------------------------------------------------------------------------------


def time_run(report: Report, tmp: Path, sizes: Sizes, method: str, backbone: str, engine: str,
             precision: str = "fp32", reference_s: float | None = None, target: str | None = None) -> float:
    epochs = 2 if engine == "fast" else 1
    record = train_run(RunConfig(method=method, backbone=backbone, dataset=sizes.dataset, profile=sizes.profile,
                                 epochs=epochs, engine=engine, precision=precision, device=sizes.device,
                                 width=sizes.width, train_samples=sizes.train_samples, workers=sizes.workers,
                                 out_dir=str(tmp / "timing")), progress=False)
    epoch_s = record["history"]["epoch_s"]
    row = {"method": method, "backbone": backbone, "engine": engine, "precision": precision,
           "epoch_s": epoch_s[-1], "first_epoch_s": epoch_s[0],
           "train_samples_per_s": record["data"]["train_size"] / record["history"]["train_s"][-1],
           "models": len(record["heads"]), "execution": record["timing"].get("execution")}
    if reference_s:
        row["speedup"] = reference_s / epoch_s[-1]
    judged = []
    if target is not None:
        judged.append(judge(target, row.get(TARGETS[target].metric), report.smoke))
    report.add("timings", row, judged)
    return epoch_s[-1]


def time_pack(report: Report, tmp: Path, sizes: Sizes, method: str, seeds: int, single_s: float | None) -> None:
    """`seeds` runs of one cell as one pack (okdph.engine.packed): steady-state epoch and peak memory."""
    cuda = sizes.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfgs = [RunConfig(method=method, dataset=sizes.dataset, profile=sizes.profile, epochs=2, engine="fast",
                      seed=42 + r, device=sizes.device, width=sizes.width, train_samples=sizes.train_samples,
                      out_dir=str(tmp / f"pack-{method}")) for r in range(seeds)]
    records = list(train_packed(cfgs, progress=False).values())
    assert len(records) == seeds, f"{len(records)} of {seeds} packed runs trained"
    epoch_s = records[0]["history"]["epoch_s"]
    row = {"method": f"{method} x{seeds} packed", "backbone": "resnet32", "engine": "fast", "precision": "fp32",
           "epoch_s": epoch_s[-1], "first_epoch_s": epoch_s[0],
           "train_samples_per_s": seeds * records[0]["data"]["train_size"] / records[0]["history"]["train_s"][-1],
           "models": seeds * len(records[0]["heads"]),
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
           "execution": records[0]["timing"].get("execution")}
    if single_s:
        row["speedup"] = seeds * single_s / epoch_s[-1]  # against `seeds` single fast runs one after another
    report.add("timings", row, [judge("pack_epoch", row["epoch_s"], report.smoke),
                                judge("pack_memory", row["peak_gb"], report.smoke,
                                      None if cuda else "CUDA memory statistics need CUDA")])


def guarded(report: Report, section: str, what: str, targets: list[str], fn, *args, **kwargs):
    """Run one check or timing; a failure is recorded (with the targets it leaves unmeasured) and the
    script goes on to the next."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the report must say what broke, then continue
        error = f"{type(exc).__name__}: {exc}"[:300]
        if section == "timings":
            row = {"method": what, "backbone": "", "engine": "", "precision": "", "error": error}
        else:
            row = {"check": what, "error": error}
        report.add(section, row, [judge(t, None, smoke=False) for t in targets])
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/perf")
    parser.add_argument("--workers", type=int, default=None, help="reference-engine DataLoader workers")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="every row at tiny sizes on the CPU")
    parser.add_argument("--git", default=None, help="the commit the code came from, when run outside git")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    if args.workers is not None:
        sizes = dataclasses.replace(sizes, workers=args.workers)
    if args.smoke:
        # Tiny steps are Python overhead; on a shared CPU a second thread mostly waits (seconds per
        # step on a loaded 2-core machine, against a fraction of a second with one thread).
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--smoke runs every row on the CPU at tiny sizes)", file=sys.stderr)
        return 2
    report = Report(Path(args.out), sizes, args.smoke)
    if args.git:
        report.data["provenance"]["git"] = args.git
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_checks:
            checks = ((check_fused, ["fused_equal", "fused_grads"]), (check_graph_replay, ["graph_replay"]),
                      (check_determinism, ["determinism"]), (check_accuracy, ["parity", "bf16_spread"]))
            for check, targets in checks:
                guarded(report, "checks", check.__name__, targets, check, report, tmp, sizes)
        torch.backends.cudnn.deterministic = False
        pairs = ANCHORS + [(m, "resnet32") for m in list_strategies() if m not in ("okdph", "dml")]
        fast_s = {}
        for method, backbone in pairs:
            ref = guarded(report, "timings", f"{method} {backbone} reference", [], time_run, report, tmp, sizes,
                          method, backbone, "reference")
            for precision in ("fp32", "bf16") if (method, backbone) in ANCHORS else ("fp32",):
                target = fast_target(method, backbone) if precision == "fp32" else None
                seconds = guarded(report, "timings", f"{method} {backbone} fast {precision}",
                                  [target] if target else [], time_run, report, tmp, sizes, method, backbone,
                                  "fast", precision, reference_s=ref, target=target)
                if precision == "fp32":
                    fast_s[(method, backbone)] = seconds
            if (method, backbone) == ("okdph", "resnet32"):
                guarded(report, "timings", "okdph x5 packed", ["pack_epoch", "pack_memory"], time_pack, report,
                        tmp, sizes, "okdph", 5, fast_s.get((method, backbone)))
    failed = report.failed()
    for line in failed:
        print(f"gpu_check: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
