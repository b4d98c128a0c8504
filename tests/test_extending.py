"""README "Extending", run as written: the example method's file, its entry-point line and its command."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def add_a_method_section() -> str:
    text = README.read_text()
    start = text.index("### Add a method")
    return text[start:text.index("\n### ", start + 1)]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_the_readme_example_method_trains_as_written(tmp_path):
    section = add_a_method_section()
    (module,) = code_blocks(section, "python")
    (toml,) = code_blocks(section, "toml")
    (shell,) = code_blocks(section, "bash")
    # The package as pip would install it: the file the example names, and its entry point.
    path = re.match(r"# (\S+)", module).group(1)
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(module)
    info = tmp_path / "okd_mean-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: okd-mean\nVersion: 0.1\n")
    (group,) = re.findall(r'^\[project\.entry-points\."([^"]+)"\]$', toml, flags=re.M)
    points = re.findall(r'^(\w+) = "([^"]+)"$', toml, flags=re.M)
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in points))
    command = shlex.split(shell.split("&&")[-1])  # after `pip install -e .`
    assert command[:2] == ["okdph-bench", "train"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-m", "okdph.cli", *command[1:], "--out", str(out), "--quiet",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["method"] == "mean_teacher" and record["status"] == "complete"
    assert record["hparams"] == {"temperature": 4.0, "weight": 1.0}
    assert set(record["history"]["train_loss"]) == {"ce/student0", "ce/student1", "kd/student0", "kd/student1"}


@pytest.mark.slow
def test_a_method_whose_package_fails_to_import_is_one_line_and_spares_the_others(tmp_path):
    (tmp_path / "okd_broken.py").write_text("raise ImportError('needs a library that is not installed')\n")
    info = tmp_path / "okd_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: okd-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[okdph.strategies]\nbroken = okd_broken:Broken\n")
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from okdph.errors import ConfigError\n"
            "from okdph.strategy import get_strategy\n"
            "assert get_strategy('dml').name == 'dml'\n"
            "try:\n    get_strategy('broken')\nexcept ConfigError as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("method 'broken' could not be loaded (ImportError: needs a library that is "
                                   "not installed); fix or uninstall its package")


TINY_LOADER = '''
import numpy as np


def tiny_arrays(root, train, download):
    """64 training or 32 test images of two classes: bright or dark squares."""
    rng = np.random.default_rng(0 if train else 1)
    count = 64 if train else 32
    targets = np.arange(count) % 2
    images = rng.integers(0, 64, (count, 32, 32, 3)) + 160 * targets[:, None, None, None]
    return images.astype(np.uint8), targets.astype(np.int64)
'''


@pytest.mark.slow
def test_a_cifar_like_dataset_is_one_loader_file_and_its_registration(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from okdph.cli import main
    from okdph.data import info

    (tmp_path / "tiny_data.py").write_text(TINY_LOADER)  # the one file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(info, "_BY_NAME", dict(info._BY_NAME))  # the registration stays in this test
    info.register_dataset(info.DatasetInfo("tiny2", 2, 32, (0.5, 0.5, 0.5), (0.3, 0.3, 0.3), "hflip", "Tiny-2",
                                           loader="tiny_data:tiny_arrays"))
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, ["train", "--method", "dml", "--dataset", "tiny2", "--profile", "pipeline",
                                       "--out", str(out), "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (record_path,) = out.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["dataset"] == "tiny2" and record["status"] == "complete"
    assert record["data"]["train_size"] == 64 and record["data"]["test_size"] == 32
    assert record["engine"] == "fast" and record["recipe"]["epochs"] == 1  # a CIFAR-family, in-memory dataset
    with pytest.raises(ValueError, match="already registered"):
        info.register_dataset(info.get_info("tiny2"))
