"""Bad input (docs/verification.md#concurrency-divergence-and-bad-input): every case is refused
with one line on stderr and a non-zero exit, no traceback (unless --debug), before any work, and
nothing already on disk is touched."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from okdph.cli import main
from okdph.engine.checkpoint import CHECKPOINT_FORMAT
from okdph.engine.run import RunConfig
from okdph.engine.record import read_record
from okdph.errors import DamagedRecord

SMOKE = ["train", "--profile", "pipeline", "--quiet"]
DML = [*SMOKE, "--method", "dml"]


def _existing_record(tmp: Path, *, foreign: bool) -> list[str]:
    """A file where the pipeline DML run's record goes: another run's record, or garbage."""
    cfg = RunConfig(method="dml", profile="pipeline", out_dir=str(tmp / "runs"))
    cfg.record_path().parent.mkdir(parents=True)
    other = {"schema": 1, "run_id": "okdph-resnet32-digits-standard-n2-official-pipeline-seed42-00000000"}
    cfg.record_path().write_text(json.dumps(other) if foreign else '{"schema": 1, "run_id": ')
    return [*DML, "--out", str(tmp / "runs")]


def _checkpoint(tmp: Path, content: bytes | None, version: int = CHECKPOINT_FORMAT) -> list[str]:
    cfg = RunConfig(method="dml", profile="pipeline", out_dir=str(tmp / "runs"))
    cfg.checkpoint_path().parent.mkdir(parents=True)
    if content is None:  # a valid checkpoint of another configuration (seed 43) under this run's name
        other = RunConfig(method="dml", profile="pipeline", seed=43, out_dir=str(tmp / "runs"))
        torch.save({"kind": "resume checkpoint", "format": version, "run_ids": [cfg.run_id()],
                    "identities": [other.identity()]}, cfg.checkpoint_path())
    else:
        cfg.checkpoint_path().write_bytes(content)
    return [*DML, "--out", str(tmp / "runs")]


def _cifar(tmp: Path, corrupt: bool) -> list[str]:
    root = tmp / "data"
    if corrupt:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                     "test_batch", "batches.meta"]:
            (folder / name).write_bytes(b"not a pickle")
    return ["train", "--method", "dml", "--dataset", "cifar10", "--epochs", "1", "--quiet",
            "--data-root", str(root), "--out", str(tmp / "runs")]


def _imagenet_with_a_bad_image(tmp: Path) -> list[str]:
    """An ImageFolder root whose one image is no image, read by one loader worker process (whose
    error torch raises again with the worker's traceback in its message)."""
    for split in ("train", "val"):
        folder = tmp / "imagenet" / split / "n01440764"
        folder.mkdir(parents=True)
        (folder / "a.JPEG").write_bytes(b"not a jpeg")
    return ["train", "--method", "dml", "--dataset", "imagenet", "--backbone", "resnet18", "--width", "0.125",
            "--epochs", "1", "--workers", "1", "--quiet", "--data-root", str(tmp / "imagenet"),
            "--out", str(tmp / "runs")]


def _compare(tmp: Path, kind: str) -> list[str]:
    """`compare` with a bad side: the baseline is a good table JSON, the candidate is `kind`."""
    cell = {"dataset": "cifar10", "backbone": "resnet32", "setting": "standard", "students": 2, "method": "dml",
            "values": [94.0, 94.2]}
    good = tmp / "reference.json"
    good.write_text(json.dumps({"table": "table3", "profile": "quick", "fidelity": "official", "metric": "paper",
                                "cells": [cell]}))
    other = tmp / "other"
    if kind == "truncated JSON":
        other = tmp / "tonight.json"
        other.write_text('{"table": "table3", "cells": [')
    elif kind == "not a table":
        other = tmp / "record.json"
        other.write_text(json.dumps({"schema": 1, "run_id": "dml-x"}))
    elif kind == "no common cell":
        other = tmp / "tonight.json"
        other.write_text(json.dumps({"table": "table3", "profile": "quick", "fidelity": "official", "metric": "paper",
                                     "cells": [{**cell, "method": "kdcl"}]}))
    elif kind == "no runs folder":
        other.mkdir()
    return ["compare", str(good), str(other)]


def _not_writable(tmp: Path) -> list[str]:
    blocker = tmp / "a-file"
    blocker.write_text("a file where the results folder should be")
    return [*DML, "--out", str(blocker / "runs")]


def _table_run(tmp: Path, *extra: str) -> list[str]:
    """`run` of table 3's DML cells, one seed, on CIFAR under tmp/data, results under tmp/results."""
    return ["run", "--table", "3", "--method", "dml", "--seeds", "1", "--quiet", "--data-root", str(tmp / "data"),
            "--results", str(tmp / "results"), *extra]


def _run_missing_cifar(tmp: Path, corrupt: bool) -> list[str]:
    _cifar(tmp, corrupt)
    return _table_run(tmp)


def _runs_is_a_file(tmp: Path, command: str) -> list[str]:
    (tmp / "results").mkdir()
    (tmp / "results" / "runs").write_text("not a folder")
    if command == "table":
        return ["table", "3", "--profile", "pipeline", "--results", str(tmp / "results")]
    return [*_table_run(tmp)[:-2], "--profile", "pipeline", "--results", str(tmp / "results")]


def _results_under_a_file(tmp: Path, command: str) -> list[str]:
    (tmp / "a-file").write_text("a file where the results folder should be")
    results = str(tmp / "a-file" / "results")
    return {"run": ["run", "--table", "3", "--profile", "pipeline", "--method", "dml", "--results", results],
            "table": ["table", "3", "--profile", "pipeline", "--results", results],
            "report": ["report", "--results", results]}[command]


def pipeline_record(runs: Path, method: str = "dml") -> Path:
    """A record of table 3's first `method` cell in the pipeline profile, as train_run writes one
    (only the fields the tables read)."""
    from okdph.bench.experiments import cell_config, get_table

    from okdph.engine.recipe import PIPELINE_RECIPE

    cell = next(c for c in get_table("3").cells if c.method == method)
    cfg = cell_config(cell, profile="pipeline", out_dir=str(runs))
    record = {"schema": 1, "run_id": cfg.run_id(), "status": "complete", **cfg.identity(),
              "recipe": PIPELINE_RECIPE.to_dict(),
              "history": {"test_acc": {"student0": [10.0], "student1": [11.0]}},
              "metrics": {"paper": {"acc": 11.0, "epoch": 0, "head": "student1"},
                          "final": {"acc": 10.0, "epoch": 0, "head": "student0"}},
              "created": "2026-01-01T00:00:00+00:00"}
    cfg.record_path().parent.mkdir(parents=True, exist_ok=True)
    cfg.record_path().write_text(json.dumps(record))
    return cfg.record_path()


def _hand_edited(tmp: Path) -> list[str]:
    path = pipeline_record(tmp / "runs")
    record = json.loads(path.read_text())
    record["metrics"]["paper"]["acc"] = "high"
    path.write_text(json.dumps(record))
    return ["pacbayes", str(path)]


def _expectations(tmp: Path, text: str) -> list[str]:
    (tmp / "expected.json").write_text(text)
    return ["regress", "--expected", str(tmp / "expected.json")]


def _regress_update_under_a_file(tmp: Path) -> list[str]:
    (tmp / "a-file").write_text("not a folder")
    return ["regress", "--update", "--method", "dml", "--expected", str(tmp / "a-file" / "expected.json")]


def _landscape_damaged_other(tmp: Path) -> list[str]:
    (tmp / "other.json").write_text('{"schema": 1, "run_id": ')
    return ["landscape", "--ours", "ours.json", "--other", "other.json", "--out", "landscape.png"]


def _fake_slurm(tmp: Path, *commands: str) -> list[str]:
    """`commands` on a PATH of their own; sbatch refuses the partition as SLURM's sbatch does."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in commands:
        script = bin_dir / name
        script.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                          "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                          "exit 1\n")
        script.chmod(0o755)
    return ["run", "--table", "3", "--profile", "pipeline", "--method", "okdph", "--executor", "slurm",
            "--slurm", "slurm_partition=nope", "--results", str(tmp / "results")]


def _pipeline_records_only(tmp: Path) -> list[str]:
    pipeline_record(tmp / "results" / "runs")
    return ["table", "3", "--profile", "paper", "--metric", "final", "--results", str(tmp / "results")]


# (case, arguments or a function of tmp_path making them, the message it must show[, environment
# variables to set, "{tmp}" standing for tmp_path])
CASES = [
    ("unknown method", [*SMOKE, "--method", "nope"], r"'nope' is not one of 'base', .*'okdph'"),
    ("unknown backbone", [*DML, "--backbone", "resnet50"], r"'resnet50' is not one of .*'resnet32'"),
    ("unknown dataset", [*DML, "--dataset", "mnist"], r"'mnist' is not one of 'cifar10'"),
    ("unknown setting", [*DML, "--setting", "noisy5"], r"'noisy5' is not one of 'standard'"),
    ("unknown profile", ["train", "--method", "dml", "--profile", "fast"], r"'fast' is not one of 'paper'"),
    ("unknown fidelity", [*DML, "--fidelity", "exact"], r"'exact' is not one of 'official', 'paper'"),
    ("unknown engine", [*DML, "--engine", "turbo"], r"'turbo' is not one of 'auto', 'reference', 'fast'"),
    ("unknown precision", [*DML, "--precision", "fp8"], r"'fp8' is not one of 'fp32', 'bf16', 'fp64'"),
    ("unknown table", ["run", "--table", "9", "--profile", "pipeline"], r"'9' is not one of .*'table3', '3', 's3'"),
    ("unknown command", ["trian"], r"No such command 'trian'"),
    ("missing required option", ["train", "--profile", "pipeline"], r"Missing option '--method'"),
    ("mistyped hyper-parameter", [*SMOKE, "--method", "okdph", "--set", "omega=high"], r"omega expects a float, got 'high'"),
    ("out-of-range hyper-parameter", [*SMOKE, "--method", "okdph", "--set", "gamma=1.5"], r"gamma must be in \[0, 1\], got 1.5"),
    ("non-positive temperature", [*SMOKE, "--method", "pcl", "--set", "temperature=0"], r"temperature must be > 0"),
    ("unknown hyper-parameter", [*DML, "--set", "omega=0.5"], r"unknown hyper-parameter 'omega'"),
    ("PCL option on another method", [*DML, "--set", "ema_decay=0.99"], r"unknown hyper-parameter 'ema_decay'"),
    ("malformed interval", [*SMOKE, "--method", "okdph", "--set", "interval=5x"], r"malformed interval '5x'"),
    ("zero interval", [*SMOKE, "--method", "okdph", "--set", "interval=0b"], r"malformed interval '0b'"),
    ("--set without =", [*DML, "--set", "omega"], r"--set expects key=value, got 'omega'"),
    ("mistyped integer", [*DML, "--epochs", "three"], r"'three' is not a valid integer"),
    ("zero epochs", [*DML, "--epochs", "0"], r"epochs must be in \[1, 10000\], got 0"),
    ("too few students", [*SMOKE, "--method", "okdph", "--students", "1"], r"needs at least 2 models, got 1"),
    ("no students", [*DML, "--students", "0"], r"students must be in \[1, 16\], got 0"),
    ("a thousand students", [*DML, "--students", "1000"], r"students must be in \[1, 16\], got 1000"),
    ("epochs beyond a 64-bit integer", [*DML, "--epochs", "9223372036854775808"],
     r"epochs must be in \[1, 10000\], got 9223372036854775808"),
    ("epochs for ever", [*DML, "--epochs", "9223372036854775807"], r"epochs must be in \[1, 10000\]"),
    ("huge width", [*DML, "--width", "1e9"], r"width must be in \(0, 16\], got 1000000000.0"),
    ("too many loader workers", [*DML, "--workers", "100000"], r"--workers must be in \[0, 256\]"),
    ("huge train samples", [*DML, "--train-samples", "10000000000"], r"train_samples must be in \[1, 1000000000\]"),
    ("infinite hyper-parameter", [*SMOKE, "--method", "pcl", "--set", "temperature=1e400"],
     r"temperature must be a finite number, got '1e400'"),
    ("NaN hyper-parameter", [*SMOKE, "--method", "okdph", "--set", "omega=nan"], r"omega must be a finite number"),
    ("huge checkpoint interval", [*DML, "--checkpoint-every", "100000"], r"--checkpoint-every must be in \[0, 10000\]"),
    ("OKDPH views of the wrong length", [*SMOKE, "--method", "okdph", "--set", "views=base,base"],
     r"views needs 3 entries"),
    ("backbone of another dataset", [*DML, "--backbone", "resnet18"], r"does not fit dataset 'digits'"),
    ("bf16 on the reference engine", [*DML, "--engine", "reference", "--precision", "bf16"], r"runs fp32 or fp64"),
    ("fp64 on the fast engine", [*DML, "--engine", "fast", "--precision", "fp64"], r"fast engine runs fp32 or bf16"),
    ("CUDA requested without CUDA", [*DML, "--device", "cuda"], r"CUDA is not available"),
    ("zero save interval", [*DML, "--save-every", "0"], r"--save-every must be in \[1, 10000\]"),
    ("negative checkpoint interval", [*DML, "--checkpoint-every", "-1"], r"--checkpoint-every must be in \[0, 10000\]"),
    ("unknown table metric", ["table", "3", "--profile", "pipeline", "--metric", "best"],
     r"'best' is not one of 'paper', 'final'"),
    ("no CPU workers", ["run", "--table", "3", "--profile", "pipeline", "--jobs", "0"],
     r"'--jobs': 0 is not in the range 1<=x<=1024"),
    ("no CPU workers in a dry run", ["run", "--table", "3", "--profile", "pipeline", "--jobs", "-1", "--dry-run"],
     r"'--jobs': -1 is not in the range 1<=x<=1024"),
    ("bad GPU list", ["run", "--table", "3", "--profile", "pipeline", "--gpus", "a,b"],
     r"'--gpus': expects GPU indices like 0,1 or 'all' or 'cpu', got 'a,b'"),
    ("bad GPU list in a dry run", ["run", "--table", "3", "--profile", "pipeline", "--gpus", "nonsense", "--dry-run"],
     r"'--gpus': expects GPU indices"),
    ("report of a missing results folder", ["report", "--results", "nope"], r"results folder 'nope' does not exist"),
    ("missing dataset files", lambda tmp: _cifar(tmp, corrupt=False), r"(not found|missing).*--download"),
    ("corrupted dataset files", lambda tmp: _cifar(tmp, corrupt=True), r"(corrupt|md5|checksum|integrity)"),
    ("an ImageNet image that is no image", _imagenet_with_a_bad_image,
     r"^error: ImageNet image .*a\.JPEG is unreadable \(cannot identify image file .*\); replace or remove it$"),
    ("truncated checkpoint", lambda tmp: _checkpoint(tmp, b"PK\x03\x04\x14\x00"),
     r"checkpoint .* is unreadable \(truncated or not an okdph-bench file: PytorchStreamReader failed reading zip "
     r"archive: not a ZIP archive\); it is the resume checkpoint of an interrupted run, not a result: delete it "
     r"to start the run over$"),
    ("foreign file as checkpoint", lambda tmp: _checkpoint(tmp, b"#!/bin/sh\nrm -rf /\n"),
     r"checkpoint .* is unreadable .*never loaded \(they could run code\)\); .*delete it to start the run over$"),
    ("random bytes as checkpoint", lambda tmp: _checkpoint(tmp, bytes(range(256)) * 8),
     r"checkpoint .* is unreadable .*; it is the resume checkpoint .*delete it to start the run over$"),
    ("checkpoint of another configuration", lambda tmp: _checkpoint(tmp, None),
     r"belongs to another configuration \(differs in: seed\)"),
    ("checkpoint of an earlier version", lambda tmp: _checkpoint(tmp, None, version=1),
     rf"has format 1, this version reads {CHECKPOINT_FORMAT}; delete it"),
    ("record of another configuration", lambda tmp: _existing_record(tmp, foreign=True),
     r"is of run 'okdph-.*', not 'dml-.*' \(a record from another configuration\)"),
    ("hand-edited record given to pacbayes", lambda tmp: _hand_edited(tmp),
     r"record '.*dml-.*\.json' is damaged: metrics.paper is \{\"acc\": \"high\".*not an accuracy"),
    ("results folder not writable", _not_writable, r"results folder .* is not writable"),
    ("unknown std", ["table", "3", "--profile", "pipeline", "--std", "n-1"],
     r"'n-1' is not one of 'sample', 'population'"),
    ("compare: missing side", lambda tmp: _compare(tmp, "missing"),
     r"other does not exist \(expected a results folder"),
    ("compare: unreadable JSON", lambda tmp: _compare(tmp, "truncated JSON"), r"tonight.json is not readable JSON"),
    ("compare: JSON that is no table", lambda tmp: _compare(tmp, "not a table"), r"record.json is not a table JSON"),
    ("compare: folder without runs/", lambda tmp: _compare(tmp, "no runs folder"), r"other is not a results folder"),
    ("compare: no common cell", lambda tmp: _compare(tmp, "no common cell"), r"have no cell in common"),
    ("compare: alpha out of range", lambda tmp: [*_compare(tmp, "no common cell"), "--alpha", "5"],
     r"--alpha must be between 0 and 1, got 5"),
    ("compare: metric of another table", lambda tmp: [*_compare(tmp, "no common cell"), "--metric", "final"],
     r"reference.json holds metric 'paper', not 'final'; pass --metric paper"),
    # checked before working: arguments, data, the results folder (once, not per run)
    ("negative seed", [*DML, "--seed", "-1"], r"'--seed': -1 is not in the range 0<=x<=4294967295"),
    ("unknown device", [*DML, "--device", "tpu"], r"unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
    ("width not a number", [*DML, "--width", "nan"], r"'--width': nan is not a finite number"),
    ("negative width on the command line", [*DML, "--width", "-1"], r"'--width': -1.0 is not in the range x>0"),
    ("negative DataLoader workers", [*DML, "--workers", "-1"], r"--workers must be in \[0, 256\], got -1"),
    ("negative PAC-Bayes samples", ["pacbayes", "r.json", "--samples", "-3"],
     r"'--samples': -3 is not in the range x>=1"),
    ("zero PAC-Bayes epsilon", ["pacbayes", "r.json", "--epsilon", "0"], r"'--epsilon': 0.0 is not in the range x>0"),
    ("PAC-Bayes epsilon not a number", ["pacbayes", "r.json", "--epsilon", "nan"], r"nan is not a finite number"),
    ("zero PAC-Bayes tolerance", ["pacbayes", "r.json", "--tolerance", "0"], r"'--tolerance': 0.0 is not in the range"),
    ("zero PAC-Bayes iterations", ["pacbayes", "r.json", "--max-iterations", "0"], r"'--max-iterations': 0 is not"),
    ("zero landscape grid step", ["landscape", "--ours", "a.json", "--other", "b.json", "--grid-step", "0"],
     r"'--grid-step': 0.0 is not in the range x>0"),
    ("zero torchrun processes", ["plan", "--table", "3", "--torchrun", "0"],
     r"'--torchrun': 0 is not in the range 1<=x<=1024"),
    ("more torchrun processes than a machine runs", ["plan", "--table", "3", "--torchrun", "9223372036854775808"],
     r"'--torchrun': 9223372036854775808 is not in the range 1<=x<=1024"),
    ("missing regression expectations", ["regress", "--expected", "nope.json"], r"no expectations at nope.json"),
    ("truncated regression expectations", lambda tmp: _expectations(tmp, '{"tolerance": {"loss_rel": 1e-6'),
     r"expected.json is not a readable expectations file \(JSONDecodeError: .*\); restore it from git"),
    ("wrong-typed regression expectations", lambda tmp: _expectations(tmp, json.dumps(
        {"tolerance": {"loss_rel": "tight", "acc_abs": 0.5}, "methods": {}})),
     r"expected.json is not a readable expectations file \(ValueError: .*'tight'\)"),
    ("expectations of the wrong shape", lambda tmp: _expectations(tmp, json.dumps(
        {"tolerance": {"loss_rel": 1e-6, "acc_abs": 0.5}, "methods": ["dml"]})),
     r"expected.json is not a readable expectations file \(AttributeError: "),
    ("regress --update into a folder under a file", _regress_update_under_a_file,
     r"results folder '.*a-file' is not writable: it is a file"),
    ("landscape with a damaged record", _landscape_damaged_other, r"record 'other.json' is unreadable"),
    ("ONE with a last batch of one image", [*SMOKE, "--method", "one", "--train-samples", "33"],
     r"33 training images in batches of 32 leave a last batch of one image, which one cannot train on"),
    ("FFL on VGG16 with a last batch of one image",
     [*SMOKE, "--method", "ffl", "--backbone", "vgg16", "--width", "0.125", "--train-samples", "65"],
     r"65 training images in batches of 32 leave a last batch of one image, which ffl cannot train on"),
    ("--slurm without =",
     ["run", "--table", "3", "--profile", "pipeline", "--executor", "slurm", "--slurm", "partition"],
     r"--slurm expects key=value, got 'partition'"),
    ("run without the table's data", lambda tmp: _run_missing_cifar(tmp, corrupt=False),
     r"CIFAR-10 not found under .*data .*pass --download"),
    ("run with corrupted data", lambda tmp: _run_missing_cifar(tmp, corrupt=True),
     r"CIFAR-10 under .*data is corrupted .*fails its md5 check"),
    ("run with runs/ a file", lambda tmp: _runs_is_a_file(tmp, "run"), r"results/runs' is not a folder: .* is a file"),
    ("table with runs/ a file", lambda tmp: _runs_is_a_file(tmp, "table"), r"results/runs' is not a folder"),
    ("run with the results folder under a file", lambda tmp: _results_under_a_file(tmp, "run"),
     r"is not a folder: '.*a-file' is a file"),
    ("table with the results folder under a file", lambda tmp: _results_under_a_file(tmp, "table"),
     r"is not a folder: '.*a-file' is a file"),
    ("report with the results folder under a file", lambda tmp: _results_under_a_file(tmp, "report"),
     r"is not a folder: '.*a-file' is a file"),
    ("table of a profile without records", _pipeline_records_only,
     r"no records of table3 for profile 'paper'.*records exist for profile pipeline \(pass --profile pipeline\)"),
    ("--seeds and --seed-list", ["run", "--table", "3", "--profile", "pipeline", "--seeds", "2", "--seed-list", "42"],
     r"pass --seeds \(a count from 42\) or --seed-list \(the seeds\), not both"),
    ("malformed --seed-list", ["plan", "--table", "3", "--seed-list", "42,x"],
     r"'--seed-list': expects seeds like 42,43"),
    ("repeated seed in --seed-list", ["plan", "--table", "3", "--seed-list", "42,42"],
     r"--seed-list needs distinct seeds"),
    ("too many seeds", ["run", "--table", "3", "--seeds", "100000", "--dry-run"],
     r"'--seeds': 100000 is not in the range"),
    ("runs of a folder that does not exist", lambda tmp: ["runs", "--results", str(tmp / "nope")],
     r"results folder '.*nope' does not exist"),
    ("--slurm without --executor slurm", ["run", "--table", "3", "--profile", "pipeline", "--slurm", "slurm_partition=x"],
     r"--slurm applies to --executor slurm only"),
    ("--pack with one seed per cell", ["run", "--table", "3", "--profile", "smoke", "--pack", "2"],
     r"--pack 2 trains a cell's seeds as one pack, but each cell here has one seed"),
    ("--wait without --executor slurm", ["run", "--table", "3", "--profile", "pipeline", "--wait"],
     r"--wait applies to --executor slurm only"),
    ("sbatch without srun", lambda tmp: _fake_slurm(tmp, "sbatch"), r"needs SLURM, but 'srun' is not on PATH",
     {"PATH": "{tmp}/bin"}),
    ("a partition sbatch refuses", lambda tmp: _fake_slurm(tmp, "sbatch", "srun"),
     r"^error: SLURM refused the submission: sbatch: error: invalid partition specified: nope$", {"PATH": "{tmp}/bin"}),
    ("--executor slurm without SLURM",
     ["run", "--table", "3", "--profile", "pipeline", "--method", "okdph", "--executor", "slurm",
      "--slurm", "slurm_partition=gpu"], r"needs SLURM, but 'sbatch' is not on PATH", {"PATH": "{tmp}/no-bin"}),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None): a refused input creates no empty folder either."""
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,args,message,env", [(*c, {})[:4] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case, args, message, env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders (runs/, results/) land in the temp dir
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    args = args(tmp_path) if callable(args) else args
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (case, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert "Traceback" not in result.output
    assert re.search(message, lines[0]), (case, lines[0])
    assert _snapshot(tmp_path) == before, "nothing on disk changes"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*.lock"))


def test_debug_shows_the_traceback():
    result = CliRunner().invoke(main, [*DML, "--set", "omega=0.5", "--debug"])
    assert result.exit_code != 0 and result.exception is not None
    assert "unknown hyper-parameter 'omega'" in str(result.exception)


def test_preempted_is_its_own_exit_code(tmp_path, monkeypatch):
    """Not an error: one line saying how to resume, exit 75."""
    from okdph.engine import checkpoint as ckpt

    def preempt(*args, **kwargs):
        raise ckpt.Preempted("run-x: stopped by SIGTERM after epoch 0; rerun the same command to resume")

    monkeypatch.setattr("okdph.engine.run.train_run", preempt)
    result = CliRunner().invoke(main, [*DML, "--out", str(tmp_path)])
    assert result.exit_code == ckpt.PREEMPTED_EXIT == 75
    assert result.stderr.strip().splitlines() == [
        "preempted: run-x: stopped by SIGTERM after epoch 0; rerun the same command to resume"]
    assert os.listdir(tmp_path) == []


TINY = ["--epochs", "1", "--train-samples", "64", "--width", "0.125"]


def test_a_damaged_record_is_set_aside_and_the_run_trains_again(tmp_path):
    """Not a bad input: the damaged file is named, kept as <name>.corrupt, and the run trains again;
    the same command once more says the record exists and trains nothing, unless --force."""
    cfg = RunConfig(method="dml", profile="pipeline", epochs=1, train_samples=64, width=0.125,
                    out_dir=str(tmp_path / "runs"))
    path = cfg.record_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": 1, "run_id": ')
    args = [*DML, *TINY, "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"warning: record '{path}' is unreadable" in result.stderr and f"{path.name}.corrupt" in result.stderr
    assert Path(f"{path}.corrupt").read_text() == '{"schema": 1, "run_id": '  # kept, never deleted

    first = read_record(path, cfg.run_id())
    assert first["status"] == "complete"

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.stdout.startswith(f"recorded: {path} exists, nothing to do (--force")
    assert read_record(path)["created"] == first["created"] and read_record(path)["timing"] == first["timing"]
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0 and forced.stdout.startswith("complete: ")
    assert read_record(path)["timing"] != first["timing"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.corrupt"]


@pytest.mark.parametrize("damage", ["truncated", "acc high", "history null", "not a record", "acc NaN", "acc 1000",
                                    "acc -5", "curve NaN", "no metrics", "seed not the run id's",
                                    "method not the run id's", "another recipe"])
def test_a_damaged_record_is_not_done(tmp_path, damage):
    from okdph.engine.run import is_done

    cfg = RunConfig(method="dml", profile="pipeline", out_dir=str(tmp_path))
    path = pipeline_record(tmp_path)  # a valid record of another run, edited into this run's
    record = json.loads(path.read_text())
    record.update(run_id=cfg.run_id(), **cfg.identity())
    cfg.record_path().write_text(json.dumps(record))
    assert is_done(cfg)
    if damage == "truncated":
        cfg.record_path().write_text(json.dumps(record)[:50])
    elif damage == "acc high":
        record["metrics"]["paper"]["acc"] = "high"
    elif damage == "history null":
        record["history"] = None
    elif damage.startswith("acc "):
        record["metrics"]["paper"]["acc"] = float(damage.split()[1])  # json.dumps writes NaN as NaN
    elif damage == "curve NaN":
        next(iter(record["history"]["test_acc"].values()))[0] = float("nan")
    elif damage == "no metrics":
        del record["metrics"]
    elif damage == "seed not the run id's":
        record["seed"] = 43
    elif damage == "method not the run id's":
        record["method"] = "kdcl"
    elif damage == "another recipe":  # the profile's recipe changed since (the run id names the profile only)
        record["recipe"]["lr"] = 0.5 * record["recipe"]["lr"]
    else:
        record = [record]
    if damage != "truncated":
        cfg.record_path().write_text(json.dumps(record))
    assert not is_done(cfg)
    with pytest.raises(DamagedRecord) as caught:
        read_record(cfg.record_path(), cfg.run_id())
    if damage == "another recipe":
        assert "trained with another pipeline recipe (lr 0.05; now lr 0.1)" in str(caught.value)


def test_records_are_strict_json_with_a_diverged_loss_as_null(tmp_path):
    from okdph.engine.record import atomic_write_json

    path = tmp_path / "r.json"
    atomic_write_json(path, {"status": "diverged at epoch 0, step 3", "loss": [1.5, float("inf"), float("nan")]})
    assert path.read_text() == '{\n "status": "diverged at epoch 0, step 3",\n "loss": [\n  1.5,\n  null,\n  null\n ]\n}\n'
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-standard token {token}"))


@pytest.mark.parametrize("command", ["run", "table", "report"])
def test_a_read_only_results_folder_is_one_line(command, tmp_path, monkeypatch):
    """chmod 555 where the tests run as a user; as root (who writes anyway) the probe file the
    commands write to prove the folder takes files is refused as a read-only mount refuses it."""
    results = tmp_path / "results"
    pipeline_record(results / "runs")
    if os.geteuid() == 0:
        import tempfile

        def read_only(*args, dir=None, **kwargs):
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    else:
        for folder in (results / "runs", results):
            folder.chmod(0o555)
        monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as on a read-only mount: only a write tells
    args = {"run": ["run", "--table", "3", "--profile", "pipeline", "--method", "dml"],
            "table": ["table", "3", "--profile", "pipeline"], "report": ["report"]}[command]
    before = _snapshot(tmp_path)
    try:
        result = CliRunner().invoke(main, [*args, "--results", str(results)])
    finally:
        for folder in (results, results / "runs"):
            folder.chmod(0o755)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"^error: results folder '.*results(/runs|/tables)?' is not writable: "
                                         r"Permission denied$", lines[0]), lines
    assert _snapshot(tmp_path) == before


def test_bare_command_prints_the_help_and_exits_0():
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 0 and result.stdout.startswith("Usage: ") and "Commands:" in result.stdout
    assert result.stderr == ""


def test_a_file_system_error_mid_command_is_one_line(tmp_path, monkeypatch):
    """What no check can foresee (a folder turning read-only, a full disk) is still one line."""
    def refused(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "results" / "tables" / "table3-pipeline.md"))

    monkeypatch.setattr("okdph.bench.runner.render_table", refused)
    result = CliRunner().invoke(main, ["table", "3", "--profile", "pipeline", "--results", str(tmp_path / "results")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: No space left on device ({tmp_path}/results/tables/table3-pipeline.md); --debug shows where"]
    debug = CliRunner().invoke(main, ["table", "3", "--profile", "pipeline", "--results", str(tmp_path), "--debug"])
    assert isinstance(debug.exception, OSError)


def test_a_run_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """The estimate comes from the configuration (a meta-device forward), not from building the
    networks: 16 wide students on a machine with 1 GiB free are one line, in seconds."""
    import time

    from okdph.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 ** 30)
    monkeypatch.setattr("okdph.engine.run.train_locked", lambda *a, **k: pytest.fail("the run started"))
    started = time.perf_counter()
    result = CliRunner().invoke(main, [*DML, "--students", "16", "--width", "4", "--out", str(tmp_path / "runs")])
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2
    assert re.fullmatch(r"error: this run needs about [\d.]+ GiB of memory \(16 networks of resnet32 at width 4, "
                        r"batch 32\); cpu has 1.0 GiB free", result.stderr.strip())
    assert not (tmp_path / "runs").exists()


def test_the_memory_estimate_draws_no_random_numbers_and_grows_with_the_batch():
    from okdph.engine import memory

    state = torch.random.get_rng_state()
    one = memory.network_bytes("vgg16", 10, 0.25, 32, 32, 4)
    assert torch.equal(torch.random.get_rng_state(), state)
    two = memory.network_bytes("vgg16", 10, 0.25, 64, 32, 4)
    params = sum(p.numel() for p in torch.nn.Module.parameters(__import__("okdph.models", fromlist=["x"])
                                                                 .create_backbone("vgg16", 10, width=0.25)))
    assert two - one == one - 4 * params * 4 > 0  # activations double with the batch, parameters stay
    assert memory.run_bytes("vgg16", 10, 0.25, 32, 32, models=3) == 4 * one


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_during_set_up_stops_the_run_at_once(signame, tmp_path):
    """A stand-in for a slow build (60 s): the signal ends the command within seconds, with one line
    and the preempted exit code, and leaves neither the run's lock nor its folder behind."""
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\nimport okdph.engine.run as run\n"
            "def slow(*a, **k):\n    print('building', file=sys.stderr, flush=True)\n    time.sleep(60)\n"
            "run.build_engine = slow\nfrom okdph.cli import main\n"
            "main(['train', '--method', 'dml', '--profile', 'pipeline', '--quiet', '--out', sys.argv[1]])\n")
    out = tmp_path / "results" / "runs"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "building"
    sent = time.perf_counter()
    proc.send_signal(getattr(signal, signame))
    stderr = proc.stderr.read()
    assert proc.wait(timeout=30) == 75 and time.perf_counter() - sent < 10
    assert stderr.strip().splitlines() == [f"preempted: stopped by {signame} during set-up, before the first step; "
                                           "rerun the same command to start the run"]
    assert not (tmp_path / "results").exists()


def test_a_full_disk_names_the_file_and_what_was_saved(tmp_path, monkeypatch):
    """"File too large" from a write names the file it was writing; when it hits the table after the
    runs, the line says the runs are recorded."""
    import errno

    from okdph.bench import executors
    from okdph.engine import record

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(record.json, "dump", too_large)
    with pytest.raises(OSError) as caught:
        record.atomic_write_json(tmp_path / "a.json", {})
    assert caught.value.filename == str(tmp_path / "a.json") and list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setattr(executors, "train_run", lambda cfg, **_: _fake_complete_record(cfg))
    monkeypatch.setattr("okdph.bench.runner.write_table", lambda *a, **k: too_large())
    result = CliRunner().invoke(main, ["run", "--table", "3", "--profile", "pipeline", "--method", "dml",
                                       "--results", str(tmp_path / "results"), "--jobs", "1", "--quiet"])
    assert result.exit_code == 2
    assert re.fullmatch(r"error: File too large; the table was not written, but the 6 runs trained now are recorded "
                        r"in .*results/runs \(`okdph-bench table` renders them\); --debug shows where",
                        result.stderr.strip())
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 6


def _fake_complete_record(cfg):
    from okdph.engine.record import atomic_write_json

    finished = {"acc": 50.0, "epoch": 0, "head": "student0"}
    record = {"schema": 1, "run_id": cfg.run_id(), "status": "complete", **cfg.identity(),
              "history": {"test_acc": {"student0": [50.0]}}, "metrics": {"paper": finished, "final": finished}}
    atomic_write_json(cfg.record_path(), record)
    return record
