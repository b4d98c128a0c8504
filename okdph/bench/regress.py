"""`okdph-bench regress`: a per-commit check that no method's behaviour changed
(docs/verification.md#regression-expectations).

Every registered method trains one tiny deterministic CPU run on the embedded digits data (pipeline
recipe, ResNet32 at 1/8 width, 2 students or branches, seed 42, one epoch of 6 steps); its training
losses and test accuracies are compared with `results/regression/expected.json`, which states its
tolerance and where that tolerance comes from. The test suite runs this, so CI fails on drift.
`--update` rewrites the file from the current code: do it on purpose, when a change of behaviour is
intended, and commit it with the change.

The runs are in float64. In float32 the same run differs from one CPU to the next: oneDNN, MKL and
ATen pick kernels by instruction set (AVX2, AVX-512) that round differently, and six SGD steps at
lr 0.1 amplify that to about 1e-3 of a loss, as much as a real change of a method moves it. In
float64 the convolutions leave oneDNN and every rounding difference starts 1e9 times smaller, so
the tolerance can sit far below what any change of a method's loss moves (benchmarks/regress_spread.py
measures both; the numbers are in the expectations file).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from okdph.engine.record import atomic_write_json
from okdph.engine.run import RunConfig, check_writable, train_run
from okdph.errors import ConfigError
from okdph.strategy import get_strategy, list_strategies

SETUP = {"backbone": "resnet32", "profile": "pipeline", "width": 0.125, "epochs": 1, "students": 2, "seed": 42,
         "fidelity": "official", "engine": "reference", "precision": "fp64", "device": "cpu",
         "deterministic": True, "threads": 1}
# Environment settings that change which CPU kernels run (each caps an instruction set; none raises
# one above what the CPU has, so every setting is safe on every x86 machine of this kind).
KERNEL_SETTINGS = {
    "default": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512_core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}
TOLERANCE = {
    "loss_rel": 1e-6,   # relative, on every named training loss of the epoch
    "acc_abs": 0.5,     # percentage points: less than one of the 180 test images, i.e. the same count
    # benchmarks/regress_spread.py, 2-core AMD EPYC (AVX-512), 2026-12-03 (results/regression/spread.json)
    "measured_spread_rel": 4.1e-9,   # largest loss difference over the kernel settings × 1 and 2 threads
    "measured_change_rel": 6.5e-3,   # smallest largest-loss move of a method whose temperature moved 1 %
    "why": ("fp64 runs: across oneDNN/MKL/ATen instruction-set caps (AVX2, AVX-512) and 1 or 2 threads the "
            "losses moved by at most 4.1e-9 relative and no test image changed class; a 1 % change of any "
            "method's distillation temperature moved its losses by at least 6.5e-3. The tolerance 1e-6 is "
            "240x the measured spread (room for CPUs not measured) and 6,500x below the smallest change"),
}


@dataclass
class RegressResult:
    ok: bool
    lines: list[str] = field(default_factory=list)
    measured: dict = field(default_factory=dict)


def machine() -> dict:
    """What the numbers were measured on."""
    return {"torch": torch.__version__, "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version()}


def config_fields(method: str) -> dict:
    """A method's hyper-parameter defaults by name."""
    return {f.name: f.default for f in dataclasses.fields(get_strategy(method).Config)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(method: str, out_dir, overrides: dict | None = None) -> dict:
    """The tracked numbers of one method's tiny run."""
    setup = {k: v for k, v in SETUP.items() if k != "threads"}
    overrides = overrides or {}
    cfg = RunConfig(method=method, **setup, overrides=tuple(overrides.items()), out_dir=str(out_dir))
    record = train_run(cfg, progress=False)
    history = record["history"]
    return {
        "paper_acc": record["metrics"]["paper"]["acc"],
        "final_acc": record["metrics"]["final"]["acc"],
        "test_acc": {head: accs[-1] for head, accs in history["test_acc"].items()},
        "train_loss": {name: values[-1] for name, values in history["train_loss"].items()},
        "recipe": record["recipe"],
    }


def measure_all(methods, threads: int = SETUP["threads"], overrides: dict | None = None) -> dict[str, dict]:
    """Every method's tracked numbers; `overrides` maps a method to hyper-parameters to change."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="okdph-regress-") as tmp:
            return {m: measure(m, tmp, (overrides or {}).get(m)) for m in methods}
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(False)  # the runs turned it on for this process


def relative_move(got: float, expected: float) -> float:
    return abs(got - expected) / max(abs(expected), 1e-300)


def compare(expected: dict, measured: dict, tolerance: dict) -> list[str]:
    """One line per difference beyond the tolerance, saying how far it moved; empty when the run matches."""
    problems = []
    moved = {}
    for name, loss in expected["train_loss"].items():
        got = measured["train_loss"].get(name)
        if got is None:
            problems.append(f"loss {name} is gone")
        elif not math.isclose(got, loss, rel_tol=tolerance["loss_rel"], abs_tol=1e-12):
            moved[name] = (got, loss)
    if moved:
        worst = max(relative_move(*pair) for pair in moved.values())
        each = ", ".join(f"{name} {got:.6g} vs {loss:.6g} ({(got - loss) / max(abs(loss), 1e-300):+.1e})"
                         for name, (got, loss) in moved.items())
        problems.append(f"losses moved up to {worst:.1e} relative (tolerance {tolerance['loss_rel']:.0e}): {each}")
    extra = sorted(set(measured["train_loss"]) - set(expected["train_loss"]))
    if extra:
        problems.append(f"new losses {', '.join(extra)}")
    accuracies = [(key, measured[key], expected[key]) for key in ("paper_acc", "final_acc")]
    accuracies += [(f"test_acc[{head}]", measured["test_acc"].get(head), acc)
                   for head, acc in expected["test_acc"].items()]
    for key, got, want in accuracies:
        if got is None or abs(got - want) > tolerance["acc_abs"]:
            problems.append(f"{key} {got if got is None else f'{got:.2f}'} vs expected {want:.2f}")
    if measured["recipe"] != expected["recipe"]:
        problems.append("the pipeline recipe changed")
    return problems


def read_expectations(path: Path) -> dict:
    """The expectations file, checked before any run: a missing, unreadable or hand-broken file is a
    ConfigError (one line), not a traceback after minutes of training."""
    if not path.is_file():
        raise ConfigError(f"no expectations at {path}; create them with okdph-bench regress --update")
    try:
        expected = json.loads(path.read_text())
        tolerance, methods = expected["tolerance"], expected["methods"]
        float(tolerance["loss_rel"]), float(tolerance["acc_abs"])
        for numbers in methods.values():
            float(numbers["paper_acc"]), float(numbers["final_acc"])
            for value in [*numbers["test_acc"].values(), *numbers["train_loss"].values()]:
                float(value)
            numbers["recipe"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a readable expectations file ({type(exc).__name__}: {exc}); "
                          "restore it from git or rewrite it with okdph-bench regress --update") from None
    return expected


def regress(expected_path="results/regression/expected.json", *, update: bool = False, methods=None) -> RegressResult:
    """Run the tiny runs and compare them (or, with `update`, write them as the new expectations).

    A method without an expectation yet is reported as new, not as a failure; an expected method
    that is no longer registered, a setup change or a drift fails."""
    path = Path(expected_path)
    methods = list(methods or list_strategies())
    unknown = sorted(set(methods) - set(list_strategies()))
    if unknown:
        raise ConfigError(f"unknown method {', '.join(unknown)}; valid: {', '.join(list_strategies())}")
    if update:
        if path.is_dir():
            raise ConfigError(f"expectations file '{path}' is a folder; pass a file with --expected")
        check_writable(path.parent, create=False)  # refused now, not after every method has trained
        partial = methods != list_strategies() and path.exists()
        old = read_expectations(path)["methods"] if partial else {}
        measured = measure_all(methods)
        atomic_write_json(path, {
            "about": "okdph-bench regress: tiny deterministic CPU runs of every method on the digits data; "
                     "see okdph/bench/regress.py",
            "command": "okdph-bench regress --update",
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "setup": SETUP,
            "tolerance": TOLERANCE,
            "methods": {**old, **{m: measured[m] for m in methods}},
        })
        return RegressResult(True, [f"wrote {len(methods)} expectations to {path}"], measured)

    expected = read_expectations(path)
    if expected.get("setup") != SETUP:
        return RegressResult(False, [f"the regression setup changed since {path} was written; "
                                     "run okdph-bench regress --update if that is intended"])
    measured = measure_all(methods)
    tolerance, known = expected["tolerance"], expected["methods"]
    ok, lines = True, []
    for method in methods:
        if method not in known:
            lines.append(f"new    {method}: no expectation yet (okdph-bench regress --update records it)")
            continue
        problems = compare(known[method], measured[method], tolerance)
        ok &= not problems
        lines.append(f"{'DRIFT' if problems else 'ok':6} {method}" + (": " + "; ".join(problems) if problems else
                     f": {len(measured[method]['train_loss'])} losses within {tolerance['loss_rel']:.0e}"))
    for method in sorted(set(known) - set(list_strategies())):
        ok = False
        lines.append(f"gone   {method}: expected but not registered")
    return RegressResult(ok, lines, measured)
