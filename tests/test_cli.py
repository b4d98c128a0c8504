"""The command line: a real pipeline run, `list`, one clear line for every bad input, every command
under `python -m okdph.cli`, no torch for --help and list, and strategies from entry points."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from okdph import names
from okdph.cli import main


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_names_everything():
    result = invoke("list")
    assert result.exit_code == 0
    for word in ("okdph", "dml", "kdcl", "base", "resnet32", "densenet40_12", "digits", "cutout", "limited10"):
        assert word in result.output


def test_list_shows_the_tables_and_list_methods_the_hyper_parameters():
    result = invoke("list")
    assert "  table3 (3, S3): " in result.output and "  main-imagenet (imagenet): " in result.output
    assert "(hyper-parameters: list --methods)" in result.output
    methods = invoke("list", "--methods")
    assert methods.exit_code == 0
    lines = {line.split(" ", 1)[0]: line for line in methods.output.splitlines()}
    assert set(names.strategy_names()) <= set(lines)
    from okdph.okdph import OKDPHConfig

    assert lines["okdph"].startswith("okdph (OKDPH): omega=" + str(OKDPHConfig().omega) + ", ")
    assert "interval=" in lines["okdph"] and "temperature=" in lines["dml"]


def test_train_pipeline_writes_a_complete_record(tmp_path):
    result = invoke("train", "--method", "okdph", "--profile", "pipeline", "--epochs", "1", "--quiet",
                    "--out", str(tmp_path), "--set", "interval=2b")
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "complete"
    assert record["method"] == "okdph" and record["dataset"] == "digits" and record["profile"] == "pipeline"
    assert record["hparams"]["interval"] == "2b" and record["fidelity"] == "official"
    assert record["heads"] == ["student0", "student1", "hwm"]
    assert record["views"] == ["hflip", "cutout", "augment"]
    assert set(record["history"]["test_acc"]) == {"student0", "student1", "hwm"}
    assert record["metrics"]["paper"]["acc"] == max(max(v) for v in record["history"]["test_acc"].values())
    assert record["metrics"]["final"]["head"] == "student0"
    assert record["provenance"]["torch"] and record["timing"]["train_samples_per_s"] > 0
    assert "best (max over heads" in result.output


BAD_INPUTS = [
    # a closed set is a click.Choice: its message names the value and every valid one
    (["--method", "dmll"], "'dmll' is not one of 'base', 'dml', 'ffl', 'kdcl', 'okddip', 'okdph', 'one', 'pcl'"),
    (["--method", "dml", "--backbone", "resnet33"], "'resnet33' is not one of 'densenet40_12', "),
    (["--method", "dml", "--dataset", "cifar1000"], "'cifar1000' is not one of 'cifar10', "),
    (["--method", "dml", "--setting", "noisey"], "'noisey' is not one of 'standard', "),
    (["--method", "dml", "--engine", "warp"], "'warp' is not one of 'auto', 'reference', 'fast'"),
    (["--method", "okdph", "--set", "omega=1.2"], "omega must be in [0, 1], got 1.2"),
    (["--method", "okdph", "--set", "interval=5x"], "malformed interval '5x'"),
    (["--method", "okdph", "--set", "beta"], "--set expects key=value, got 'beta'"),
    (["--method", "okdph", "--set", "T=4"], "unknown hyper-parameter 'T'; valid:"),
    (["--method", "dml", "--students", "1"], "dml needs at least 2 models, got 1"),
    (["--method", "okdph", "--students", "5"], "no published view assignment for OKDPH with 5 students"),
    (["--method", "dml", "--backbone", "resnet18"], "backbone 'resnet18' does not fit dataset 'digits'"),
    (["--method", "dml", "--epochs", "0"], "epochs must be in [1, 10000], got 0"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "--profile", "pipeline", "--quiet", "--out", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not list(tmp_path.glob("*.json"))


def test_missing_cifar_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--method", "dml", "--dataset", "cifar10", "--quiet",
                                       "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--download" in result.output


def test_dataset_required_outside_the_embedded_profiles(tmp_path):
    result = CliRunner().invoke(main, ["train", "--method", "dml", "--quiet", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--dataset is required" in result.output


# --------------------------------------------------------------------------------------------------
# The group: every command under `python -m okdph.cli`, no torch for --help and list, choices from
# torch-free names that match the registries, tables from their folder, third-party strategies

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(main.commands)


def _env(*first: Path) -> dict:
    """This checkout (and `first`) ahead of anything installed, for subprocesses."""
    path = os.pathsep.join([*map(str, first), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_the_group_has_every_command():
    assert COMMANDS == ["compare", "landscape", "list", "pacbayes", "plan", "regress", "report", "run", "runs",
                        "table", "train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_python_m_okdph_cli_runs_every_command(command):
    done = subprocess.run([sys.executable, "-m", "okdph.cli", command, "--help"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: python -m okdph.cli {command} ")


_NO_TORCH = """
import sys
from okdph.cli import main
for args in (["--help"], ["list"], *([name, "--help"] for name in main.commands)):
    assert main(args, standalone_mode=False) in (0, None), args  # --help returns 0, a command None
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy"))
assert not heavy, heavy[:5]
"""


def test_help_and_list_import_no_torch():
    done = subprocess.run([sys.executable, "-c", _NO_TORCH], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("okdph-bench") is None, reason="the console script is not installed")
@pytest.mark.parametrize("args", [["--help"], ["list"]])
def test_console_script_imports_no_torch(args):
    env = {**_env(), "PYTHONPROFILEIMPORTTIME": "1"}  # every import on stderr: "import time: ... | name"
    done = subprocess.run(["okdph-bench", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "okdph.cli" in imported and "torch" not in imported


def test_every_command_takes_debug_and_the_group_handles_user_errors():
    for command in main.commands.values():
        assert "--debug" in [opt for param in command.params for opt in param.opts], command.name
    quiet = sorted(c.name for c in main.commands.values() if any("--quiet" in p.opts for p in c.params))
    assert quiet == ["landscape", "pacbayes", "run", "train"]  # the commands that draw progress bars


def test_choices_match_the_registries():
    from okdph import models
    from okdph.data import info
    from okdph.config import RunConfig
    from okdph.engine import recipe
    from okdph.strategy import list_strategies

    assert names.strategy_names() == list_strategies()
    assert list(names.BACKBONES) == models.list_backbones()
    assert list(names.DATASETS) == [i.name for i in info._INFOS]
    assert set(info.SETTING_DISPLAY_NAMES) == set(names.SETTINGS)
    choices = {f.name: f.metadata["cli"]["choices"] for f in dataclasses.fields(RunConfig) if f.metadata.get("cli")}
    assert choices["engine"] is names.ENGINES and choices["precision"] is names.PRECISIONS
    assert choices["profile"] is names.PROFILES is recipe.PROFILES and choices["backbone"] is names.BACKBONES


# ---- display names live on the registries


def test_every_strategy_and_backbone_has_its_display_name():
    from okdph import models
    from okdph.data import info
    from okdph.strategy import display_name, get_strategy, list_strategies

    for name in list_strategies():
        cls = get_strategy(name)
        assert "display_name" in vars(cls) and display_name(name) == cls.display_name, name
    assert [display_name(m) for m in ("okdph", "okddip", "one", "base")] == ["OKDPH", "OKDDip", "ONE", "Base"]
    assert {b: models.display_name(b) for b in models.list_backbones()} == {
        "densenet40_12": "DenseNet40-12", "resnet110": "ResNet110", "resnet18": "ResNet18", "resnet32": "ResNet32",
        "vgg16": "VGG16", "wrn20_8": "WRN20-8"}
    assert all(info.display_name(d) for d in names.DATASETS) and info.display_name("cifar100") == "CIFAR-100"
    assert info.display_name("limited10") == "10%" and display_name("gone") == models.display_name("gone") == "gone"


def test_the_renderer_reads_display_names_from_the_registries(monkeypatch):
    from okdph.bench import render
    from okdph.bench.choices import TableChoices
    from okdph.bench.experiments import get_table
    from okdph.strategy import get_strategy

    monkeypatch.setattr(get_strategy("okddip"), "display_name", "Peer Attention")
    table = get_table("4")
    text = render.markdown_table(table,
                                 render.collect(TableChoices(table, profile="pipeline"), render.ResultStore("nowhere")))
    header = [cell.strip() for cell in text.splitlines()[0].split("|")]
    assert "Peer Attention" in header and "DML" in header and "OKDDip" not in header
    assert render.display("backbone", "wrn20_8") == "WRN20-8" and render.display("setting", "noisy") == "Noisy"


def test_analysis_imports_neither_the_harness_nor_the_cli():
    for path in sorted((ROOT / "okdph" / "analysis").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                assert not module.startswith(("okdph.bench", "okdph.cli")), (path.name, module)


# ---- tables are the JSON files of okdph/bench/tables/


def test_tables_are_the_files_of_the_tables_folder():
    from okdph.bench.experiments import get_table, list_tables

    files = {p.stem for p in names.TABLE_DIR.glob("*.json") if "cells" in json.loads(p.read_text())}
    assert set(list_tables()) == files and len(files) >= 6
    assert all(get_table(t).id == t for t in files)  # a table's id is its file name
    width = {"terminal_width": 10_000, "max_content_width": 10_000}  # no line wrapping inside a name
    helps = [CliRunner().invoke(main, [command, "--help"], **width).output for command in ("run", "plan", "table")]
    for table_id in files:
        assert all(table_id in text for text in helps), table_id


@pytest.mark.parametrize("spelling,table_id", [
    ("3", "table3"), ("table3", "table3"), ("S3", "table3"), ("s3", "table3"), ("TABLE3", "table3"),
    ("4", "table4"), ("S4", "table4"), ("5", "table5"), ("s5", "table5"), ("main-cifar", "main-cifar"),
    ("main-imagenet", "main-imagenet"), ("imagenet", "main-imagenet"), ("main-noisy-limited", "main-noisy-limited"),
    ("noisy-limited", "main-noisy-limited"), ("Main-CIFAR", "main-cifar"),
])
def test_every_table_spelling_still_works(spelling, table_id):
    from okdph.bench.experiments import get_table
    from okdph.cli import TABLE

    assert get_table(TABLE.convert(spelling, None, None)).id == table_id


# ---- a third-party strategy through an entry point

_FAKE_MODULE = '''
from baselines.dml import DML
from okdph.strategy import register_strategy


class FakeOKD(DML):
    """DML under another name, without the decorator: registered under its entry point's name."""

    display_name = "Fake OKD"


@register_strategy("fakedec")
class Decorated(DML):
    """With the decorator: it names the class, and the display name defaults to that name."""
'''

def _fake_distribution(root: Path) -> Path:
    """An installed distribution `fake-okd` as pip leaves one: its module and its .dist-info."""
    info = root / "fake_okd-0.1.dist-info"
    info.mkdir(parents=True)
    (root / "fake_okd.py").write_text(_FAKE_MODULE)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-okd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[okdph.strategies]\nfakeokd = fake_okd:FakeOKD\n"
                                           "fakedec = fake_okd:Decorated\n")
    return root


def test_third_party_strategy_through_an_entry_point(tmp_path, monkeypatch):
    site = _fake_distribution(tmp_path)
    listed = subprocess.run([sys.executable, "-m", "okdph.cli", "list"], env=_env(site), cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "methods:   base, dml, fakedec, fakeokd, ffl" in listed.stdout

    from okdph import strategy

    monkeypatch.syspath_prepend(str(site))  # importlib.metadata now finds fake_okd-0.1.dist-info
    monkeypatch.setattr(strategy, "_REGISTRY", dict(strategy._REGISTRY))  # the fakes leave with the test
    monkeypatch.setattr(strategy, "_LOADED", False)
    monkeypatch.delitem(sys.modules, "fake_okd", raising=False)
    assert {"fakeokd", "fakedec", "dml", "okdph"} <= set(strategy.list_strategies())
    fake = strategy.get_strategy("fakeokd")
    assert fake.name == "fakeokd" and strategy.display_name("fakeokd") == "Fake OKD"
    assert strategy.get_strategy("fakedec").__name__ == "Decorated" and strategy.display_name("fakedec") == "fakedec"
    assert strategy.get_strategy("dml").name == "dml"  # the parent keeps its name


@pytest.mark.slow
def test_third_party_strategy_trains_from_the_command_line(tmp_path):
    env = _env(_fake_distribution(tmp_path / "site"))
    done = subprocess.run([sys.executable, "-m", "okdph.cli", "train", "--method", "fakeokd", "--profile", "pipeline",
                           "--epochs", "1", "--quiet", "--out", str(tmp_path / "runs")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = (tmp_path / "runs").glob("fakeokd-*.json")
    assert json.loads(record.read_text())["method"] == "fakeokd"


# ---- where results go: one folder for every command, ignored by git


def test_train_then_table_shows_the_run(tmp_path, monkeypatch):
    """train's default --out is the runs/ of the results folder that table reads."""
    monkeypatch.chdir(tmp_path)
    trained = CliRunner().invoke(main, ["train", "--method", "dml", "--profile", "pipeline", "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert len(list((tmp_path / "results" / "runs").glob("dml-*.json"))) == 1
    shown = CliRunner().invoke(main, ["table", "3"])
    assert shown.exit_code == 0, shown.output
    assert "(n=1)" in shown.stdout and "profile pipeline: the first with records" in shown.stderr
    assert (tmp_path / "results" / "tables" / "table3-pipeline.md").exists()


def test_what_the_commands_write_is_ignored_by_git_and_the_committed_results_are_not():
    from okdph.bench.store import ResultStore

    store = ResultStore("results")
    assert [o.default for o in main.commands["train"].params if o.name == "out_dir"] == [str(store.runs_dir)]
    written = [store.runs_dir / "dml-x.json", store.runs_dir / "dml-x.ckpt.pt", store.runs_dir / "dml-x.traj" / "e.pt",
               store.tables_dir / "table3-pipeline.md", store.figures_dir / "table3-pipeline" / "cell.png",
               store.analysis_dir / "pacbayes-resnet32-digits.png", store.root / "REPORT.md",
               store.root / "slurm" / "123" / "log.out"]
    try:
        done = subprocess.run(["git", "check-ignore", "--no-index", *map(str, written)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no git checkout ({exc})")
    assert done.stdout.split() == list(map(str, written)), done.stderr
    assert "results/reference/tables/table3-smoke.md" in tracked and "results/regression/expected.json" in tracked
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *tracked], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout == "", "committed results lie where the commands write"


def test_output_cut_short_by_a_closed_pipe_is_no_error(tmp_path):
    """`okdph-bench plan ... | head -1`: the pipe closes early; no traceback, no error line."""
    done = subprocess.run(f"{shlex.quote(sys.executable)} -m okdph.cli plan --table 3 --seeds 30 --results "
                          f"{shlex.quote(str(tmp_path))} | head -1", shell=True, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("# 2520 runs of table 3 (paper)") and done.stderr == ""


# ---- small things users expect: runs, table --out, --seed-list


def test_runs_lists_records_damaged_and_interrupted_runs(tmp_path):
    from test_bad_input import pipeline_record

    runs = tmp_path / "runs"
    first = pipeline_record(runs, "dml")
    pipeline_record(runs, "kdcl")
    damaged = runs / "okdph-resnet32-digits-standard-n2-official-pipeline-seed43-0123abcd.json"
    damaged.write_text('{"schema": 1, "run_id": ')
    (runs / "pcl-resnet32-digits-standard-n2-official-pipeline-seed44-89abcdef.ckpt.pt").write_bytes(b"")
    result = CliRunner().invoke(main, ["runs", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["method", "cell", "seed", "status", "paper", "final", "age"]
    dml = next(line for line in lines if line.startswith("dml "))
    assert dml.split()[1:8] == ["resnet32", "digits", "standard", "n2", "official", "pipeline", "42"]
    assert dml.split()[8:11] == ["complete", "11.00", "10.00"] and dml.endswith(" d")  # made 2026-01-01
    assert any(line.startswith("okdph ") and " 43 " in line and "damaged" in line for line in lines)
    assert any(line.startswith("pcl ") and " 44 " in line and "interrupted" in line for line in lines)
    assert lines[-1] == f"4 runs in {runs}: 2 complete, 1 damaged, 1 interrupted"
    assert f"warning: record '{damaged}' is unreadable" in result.stderr
    paper_only = CliRunner().invoke(main, ["runs", "--results", str(tmp_path), "--profile", "paper"])
    assert paper_only.stdout.strip() == f"0 runs in {runs}"
    interrupted = CliRunner().invoke(main, ["runs", "--results", str(tmp_path), "--profile", "pipeline",
                                            "--method", "pcl"])
    assert interrupted.stdout.splitlines()[-1] == f"1 runs in {runs}: 1 interrupted"
    only = CliRunner().invoke(main, ["runs", "--results", str(tmp_path), "--method", "dml", "--ids"])
    assert first.stem in only.stdout and "kdcl" not in only.stdout and only.stdout.splitlines()[-1].endswith(
        "1 runs in " + str(runs) + ": 1 complete")


def test_table_out_writes_where_asked(tmp_path):
    from test_bad_input import pipeline_record

    pipeline_record(tmp_path / "results" / "runs")
    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(main, ["table", "3", "--profile", "pipeline", "--results", str(tmp_path / "results"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [f"table3-pipeline.{ext}" for ext in ("csv", "json", "md")]
    assert not (tmp_path / "results" / "tables").exists()


def test_seed_list_runs_exactly_those_seeds(tmp_path):
    result = invoke("run", "--table", "3", "--profile", "pipeline", "--method", "dml", "--seed-list", "42,50",
                    "--dry-run", "--results", str(tmp_path))
    seeds = sorted({line.split("-seed")[1].split("-")[0] for line in result.output.splitlines()[1:]})
    assert seeds == ["42", "50"] and result.output.startswith("table3 (pipeline): 12 cells, 12 runs")
    planned = invoke("plan", "--table", "3", "--profile", "pipeline", "--method", "dml", "--seed-list", "7",
                     "--results", str(tmp_path))
    assert all("--seed 7 " in line for line in planned.output.splitlines()[1:]) and planned.output.count("\n") == 7
