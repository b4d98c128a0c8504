"""`okdph-bench regress`: accuracy-regression tracking (DESIGN.md §8).

Every registered method trains one tiny deterministic CPU run on the embedded digits data (smoke
recipe, ResNet32 at 1/8 width, 2 students or branches, seed 42, one thread); its test accuracies
and training losses are compared with `results/regression/expected.json`, which states its
tolerance. The test suite runs this, so CI fails on drift. `--update` rewrites the file from the
current code: do it on purpose, when a change of behaviour is intended, and commit it with the change.
"""
from __future__ import annotations

import json
import math
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from okdph.engine.record import atomic_write_json
from okdph.engine.run import RunConfig, train_run
from okdph.strategy import list_strategies

SETUP = {"backbone": "resnet32", "profile": "smoke", "width": 0.125, "epochs": 1, "students": 2, "seed": 42,
         "fidelity": "official", "engine": "reference", "device": "cpu", "deterministic": True, "threads": 1}
TOLERANCE = {
    "acc_abs": 1.2,     # percentage points: two of the 180 smoke test images
    "loss_rel": 1e-3,   # relative, on every named training loss of the epoch
    "why": ("a deterministic CPU run is bitwise repeatable on one machine; another CPU's kernels may round "
            "differently in the last bits, which moves a loss by far less than 1e-3 relative and may flip a "
            "test image on the decision boundary, while a change of a method's behaviour moves its losses "
            "by much more"),
}


@dataclass
class RegressResult:
    ok: bool
    lines: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(method: str, out_dir) -> dict:
    """The tracked numbers of one method's tiny run."""
    cfg = RunConfig(method=method, backbone=SETUP["backbone"], students=SETUP["students"], profile=SETUP["profile"],
                    width=SETUP["width"], epochs=SETUP["epochs"], seed=SETUP["seed"], fidelity=SETUP["fidelity"],
                    engine=SETUP["engine"], device=SETUP["device"], deterministic=SETUP["deterministic"],
                    out_dir=str(out_dir))
    record = train_run(cfg, progress=False)
    history = record["history"]
    return {
        "paper_acc": record["metrics"]["paper"]["acc"],
        "final_acc": record["metrics"]["final"]["acc"],
        "test_acc": {head: accs[-1] for head, accs in history["test_acc"].items()},
        "train_loss": {name: values[-1] for name, values in history["train_loss"].items()},
        "recipe": record["recipe"],
    }


def measure_all(methods) -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(SETUP["threads"])
    try:
        with tempfile.TemporaryDirectory(prefix="okdph-regress-") as tmp:
            return {m: measure(m, tmp) for m in methods}
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)  # the runs turned it on for this process


def compare(expected: dict, measured: dict, tolerance: dict) -> list[str]:
    """One line per difference beyond the tolerance; empty when the run matches."""
    problems = []
    for key in ("paper_acc", "final_acc"):
        if abs(measured[key] - expected[key]) > tolerance["acc_abs"]:
            problems.append(f"{key} {measured[key]:.2f} vs expected {expected[key]:.2f}")
    for head, acc in expected["test_acc"].items():
        got = measured["test_acc"].get(head)
        if got is None or abs(got - acc) > tolerance["acc_abs"]:
            problems.append(f"test_acc[{head}] {got} vs expected {acc:.2f}")
    for name, loss in expected["train_loss"].items():
        got = measured["train_loss"].get(name)
        if got is None or not math.isclose(got, loss, rel_tol=tolerance["loss_rel"], abs_tol=1e-9):
            problems.append(f"train_loss[{name}] {got} vs expected {loss:.6g}")
    extra = sorted(set(measured["train_loss"]) - set(expected["train_loss"]))
    if extra:
        problems.append(f"new losses {', '.join(extra)}")
    if measured["recipe"] != expected["recipe"]:
        problems.append("the smoke recipe changed")
    return problems


def regress(expected_path="results/regression/expected.json", *, update: bool = False, methods=None) -> RegressResult:
    """Run the tiny runs and compare them (or, with `update`, write them as the new expectations).

    A method without an expectation yet is reported as new, not as a failure; an expected method
    that is no longer registered, a setup change or a drift fails."""
    path = Path(expected_path)
    methods = list(methods or list_strategies())
    measured = measure_all(methods)
    if update:
        old = json.loads(path.read_text()).get("methods", {}) if path.exists() and methods != list_strategies() else {}
        atomic_write_json(path, {
            "about": "okdph-bench regress: tiny deterministic CPU runs of every method on the digits data; "
                     "see okdph/bench/regress.py",
            "command": "okdph-bench regress --update",
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"torch": torch.__version__, "cpu": _cpu_name(), "python": platform.python_version()},
            "setup": SETUP,
            "tolerance": TOLERANCE,
            "methods": {**old, **{m: measured[m] for m in methods}},
        })
        return RegressResult(True, [f"wrote {len(methods)} expectations to {path}"], measured)

    if not path.exists():
        return RegressResult(False, [f"no expectations at {path}; create them with okdph-bench regress --update"],
                             measured)
    expected = json.loads(path.read_text())
    if expected.get("setup") != SETUP:
        return RegressResult(False, [f"the regression setup changed since {path} was written; "
                                     "run okdph-bench regress --update if that is intended"], measured)
    tolerance, known = expected["tolerance"], expected["methods"]
    ok, lines = True, []
    for method in methods:
        if method not in known:
            lines.append(f"new    {method}: no expectation yet (okdph-bench regress --update records it)")
            continue
        problems = compare(known[method], measured[method], tolerance)
        ok &= not problems
        lines.append(f"{'DRIFT' if problems else 'ok':6} {method}" + (": " + "; ".join(problems) if problems else
                     f": {measured[method]['paper_acc']:.2f}%"))
    for method in sorted(set(known) - set(list_strategies())):
        ok = False
        lines.append(f"gone   {method}: expected but not registered")
    return RegressResult(ok, lines, measured)
