"""A run's options declared once (okdph.config): the command line, the run id and the plan line
all derive from RunConfig's fields."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
from click.testing import CliRunner

from okdph.bench.executors import train_command
from okdph.bench.experiments import expand, get_table
from okdph.cli import config_from_options, config_options
from okdph.config import CELL, RunConfig, option, parse_run_id

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WithSmoothing(RunConfig):
    """A field added in one edit: its role and its option."""

    label_smoothing: float = option(CELL, 0.0, flags=("--label-smoothing",), kind="float", new=True,
                                    help="Label smoothing of every cross-entropy.")


def test_a_new_field_is_in_the_command_line_the_run_id_and_the_plan_line():
    seen = {}

    @click.command()
    @config_options(WithSmoothing)
    def train(**options):
        seen["cfg"] = config_from_options(WithSmoothing, options)

    result = CliRunner().invoke(train, ["--method", "dml", "--profile", "smoke", "--label-smoothing", "0.1",
                                        "--set", "temperature=4"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.label_smoothing == 0.1 and cfg.overrides == (("temperature", "4"),)
    assert "--label-smoothing FLOAT" in CliRunner().invoke(train, ["--help"]).output

    plain = WithSmoothing(method="dml", profile="smoke", overrides=(("temperature", "4"),))
    assert plain.run_id() == RunConfig(method="dml", profile="smoke", overrides=(("temperature", "4"),)).run_id()
    assert cfg.run_id() != plain.run_id() and cfg.identity()["label_smoothing"] == 0.1
    assert cfg.cell_key() != plain.cell_key()  # a cell field: another table cell, not another seed

    line = shlex.split(train_command(cfg))
    assert line[line.index("--label-smoothing") + 1] == "0.1"
    assert "--label-smoothing" not in train_command(plain)  # at its default it is left out
    # the plan line, parsed by the same options, gives back the same run
    result = CliRunner().invoke(train, line[2:line.index("--skip-recorded")])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].run_id() == cfg.run_id()


def test_run_ids_of_the_committed_reference_table_are_unchanged():
    table = json.loads((ROOT / "results" / "reference" / "tables" / "table3-smoke.json").read_text())
    committed = {run_id for cell in table["cells"] for run_id in cell["run_ids"]}
    made = {run.config.run_id() for run in expand(get_table("3"), profile="smoke")}
    assert committed and committed <= made


def test_a_run_id_is_parsed_back():
    cfg = RunConfig(method="okdph", backbone="wrn20_8", dataset="cifar100", setting="limited10", students=3,
                    fidelity="paper", profile="quick", seed=44)
    parsed = parse_run_id(cfg.run_id())
    assert (parsed["method"], parsed["setting"], parsed["students"], parsed["fidelity"], parsed["profile"],
            parsed["seed"]) == ("okdph", "limited10", 3, "paper", "quick", 44)
    assert parsed["head"] == "okdph-wrn20_8-cifar100"
    assert parse_run_id("not-a-run") is None
