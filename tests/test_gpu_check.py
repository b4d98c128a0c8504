"""benchmarks/gpu_check.py keeps working without a GPU: a broken import or a renamed engine method
fails here, not on the next GPU someone gets.

The smoke run (`--smoke`) trains every check and timing row of the script at tiny sizes on the CPU.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@functools.lru_cache(maxsize=1)
def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # every import of the script, at once
    return module


def test_the_docstring_states_every_target_of_the_table():
    gpu_check = load_script()
    doc = " ".join(gpu_check.__doc__.split())  # whitespace as one space
    for name, target in gpu_check.TARGETS.items():
        assert f"{name} {target.goal()} {target.what}" in doc, name


def test_targets_are_judged_pass_fail_or_not_at_smoke_sizes():
    gpu_check = load_script()
    judge = gpu_check.judge
    assert judge("okdph_epoch", 1.9, smoke=False)["status"] == "pass"
    assert judge("okdph_epoch", 2.1, smoke=False)["status"] == "FAIL"
    assert judge("speedup_resnet32", 8.0, smoke=False)["status"] == "pass"
    assert judge("speedup_resnet32", 7.9, smoke=False)["status"] == "FAIL"
    assert judge("okdph_epoch", None, smoke=False)["status"] == "FAIL (not measured)"
    assert judge("okdph_epoch", 99.0, smoke=True)["status"] == "n/a (smoke sizes)"  # a CPU timing
    assert judge("graph_replay", 1e-7, smoke=True)["status"] == "FAIL"  # an equality holds at any size
    assert judge("graph_replay", 0.0, smoke=True)["status"] == "pass"
    assert judge("pack_memory", None, smoke=True, skipped="no CUDA")["status"] == "skipped: no CUDA"


@pytest.mark.slow
def test_the_smoke_run_trains_every_row_on_the_cpu(tmp_path):
    gpu_check = load_script()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert (tmp_path / "cpu-smoke.md").is_file()

    broken = [r for section in ("checks", "timings") for r in report[section] if "error" in r]
    assert not broken, broken
    # every row of the plan: reference and fast fp32 of each method, bf16 of the anchors, the pack
    methods = set(gpu_check.list_strategies())
    expected = ({(m, b, e, "fp32") for m, b in gpu_check.ANCHORS for e in ("reference", "fast")}
                | {(m, b, "fast", "bf16") for m, b in gpu_check.ANCHORS}
                | {(m, "resnet32", e, "fp32") for m in methods - {"okdph", "dml"} for e in ("reference", "fast")}
                | {("okdph x5 packed", "resnet32", "fast", "fp32")})
    rows = [(r["method"], r["backbone"], r["engine"], r["precision"]) for r in report["timings"]]
    assert sorted(rows) == sorted(expected)
    assert len(report["checks"]) == 5

    # every target beside its measurement: equalities judged, GPU-only figures not
    status = {}
    for t in report["targets"]:
        status.setdefault(t["target"], set()).add(t["status"])
    assert set(status) == set(gpu_check.TARGETS)
    for name, target in gpu_check.TARGETS.items():
        if name == "graph_replay":
            assert status[name] == {"skipped: CUDA graphs need CUDA"}
        elif name == "pack_memory":
            assert status[name] == {"skipped: CUDA memory statistics need CUDA"}
        elif target.sizes == gpu_check.FULL:
            assert status[name] == {"n/a (smoke sizes)"}, name
        else:
            assert status[name] == {"pass"}, name
    graph = next(c for c in report["checks"] if c["check"].startswith("CUDA-graph replay"))
    assert graph["graphs"] == 2 and graph["max_rel_diff"] == 0.0  # the eager stand-in's bookkeeping
