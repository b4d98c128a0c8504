"""The harness: tables as data, expansion into runs, presets, rendering from records, resume,
plan commands and the command line. Records here are synthetic unless a test says otherwise."""
from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
from click.testing import CliRunner

from okdph.bench import executors, runner
from okdph.bench.choices import Execution, TableChoices
from okdph.bench.experiments import (FIRST_SEED, cell_config, expand, get_table, list_tables, okdph_preset,
                                     unique_configs)
from okdph.bench.render import collect, markdown, markdown_table
from okdph.bench.report import write_report
from okdph.bench.store import ResultStore
from okdph.cli import main
from okdph.engine.record import atomic_write_json
from okdph.okdph import OKDPHConfig
from okdph.strategy import ConfigError, Interval, build_config

SEVEN = ["dml", "one", "kdcl", "okddip", "ffl", "pcl", "okdph"]


def fake_record(cfg, acc, *, final=None, status="complete", engine=None, epochs=3):
    """A record as train_run writes it, with made-up numbers."""
    cfg = replace(cfg, engine=engine) if engine else cfg
    identity = cfg.identity()
    curve = [acc - 2.0 * (epochs - 1 - e) for e in range(epochs)]
    record = {"schema": 1, "run_id": cfg.run_id(), "status": status, **identity,
              "history": {"test_acc": {"student0": curve, "student1": [a - 1 for a in curve]}},
              "metrics": {"paper": {"acc": acc, "epoch": epochs - 1, "head": "student0"},
                          "final": {"acc": acc - 1 if final is None else final, "epoch": epochs - 1,
                                    "head": "student0"}},
              "created": "2026-01-01T00:00:00+00:00"}
    atomic_write_json(cfg.record_path(), record)
    return record


# --------------------------------------------------------------------------------------------------
# Tables as data and their expansion


def test_every_table_loads_and_names_its_source():
    assert list_tables() == ("main-cifar", "main-imagenet", "main-noisy-limited", "table3", "table4", "table5")
    for table_id in list_tables():
        table = get_table(table_id)
        assert table.source and table.cells and set(c.method for c in table.cells) == set(table.methods)
        assert len({c.slug() for c in table.cells}) == len(table.cells)  # no cell twice


def test_table3_has_every_cell_of_the_supplement():
    table = get_table("3")
    assert table is get_table("table3") is get_table("S3")
    assert len(table.cells) == 2 * 3 * 2 * 7 == 84
    assert {(c.dataset, c.backbone, c.students) for c in table.cells} == {
        (d, b, n) for d in ("cifar10", "cifar100") for b in ("resnet32", "vgg16") for n in (2, 3, 4)}
    assert list(table.methods) == SEVEN
    values = {c.slug(): c.paper for c in table.cells}
    assert values["cifar10-resnet32-standard-n2-okdph"] == 95.01
    assert values["cifar100-vgg16-standard-n4-okdph"] == 78.06
    assert values["cifar100-vgg16-standard-n3-pcl"] == 75.89
    assert all(v is not None for v in values.values())


def test_other_tables_cell_counts():
    assert len(get_table("4").cells) == 2 * 3 * 7
    assert {c.setting for c in get_table("4").cells} == {"noisy", "limited10", "limited1"}
    t5 = get_table("5")
    assert len(t5.cells) == 2 * 5 * 4 and t5.metric == "pacbayes" and t5.better == "lower"
    assert {c.students for c in t5.cells if c.method == "base"} == {1}
    cifar = get_table("main-cifar")
    assert len(cifar.cells) == 2 * 5 * 8 and cifar.methods[0] == "base"
    assert sum(c.paper is not None for c in cifar.cells) == 30  # 28 inferred from Table 3, 2 for R110 C100
    imagenet = get_table("main-imagenet")
    assert {(c.backbone, c.dataset) for c in imagenet.cells} == {("resnet18", "imagenet")}
    assert [c.paper for c in imagenet.cells if c.paper is not None] == [70.66]
    noisy = get_table("main-noisy-limited")
    assert len(noisy.cells) == 2 * 2 * 3 * 7 and all(c.paper is None for c in noisy.cells)


def test_okdph_presets_come_from_tables_6_and_7():
    # Table 6, 2 students; Δ becomes the `interval` hyper-parameter
    assert okdph_preset("cifar100", "resnet32", 2) == (
        (("omega", "1.0"), ("beta", "0.5"), ("gamma", "1.0"), ("interval", "5b")), "Table 6")
    assert dict(okdph_preset("cifar100", "vgg16", 3)[0])["interval"] == "3e"     # VGG16-3
    assert dict(okdph_preset("cifar10", "resnet32", 4)[0])["interval"] == "5b"   # ResNet32-4
    # Table 7: noisy and limited data
    assert okdph_preset("cifar100", "resnet32", 2, "noisy")[0] == (
        ("omega", "1.0"), ("beta", "0.0"), ("gamma", "0.5"), ("interval", "5b"))
    assert okdph_preset("cifar100", "vgg16", 2, "limited1") == (
        (("omega", "0.8"), ("beta", "0.8"), ("gamma", "1.0"), ("interval", "1e")), "Table 7")
    assert okdph_preset("imagenet", "resnet18", 2) == ((), None)  # the paper gives none: defaults


def test_presets_are_applied_to_okdph_cells_only_and_validate():
    for table_id in list_tables():
        for cell in get_table(table_id).cells:
            if cell.method != "okdph":
                assert cell.overrides == () and cell.preset is None
                continue
            assert cell.preset is not None or cell.dataset == "imagenet"
            config = build_config(OKDPHConfig, dict(cell.overrides))  # the strings parse and validate
            if cell.preset:
                assert isinstance(config.interval, Interval)
    c = next(c for c in get_table("4").cells if c.method == "okdph" and c.dataset == "cifar100"
             and c.setting == "noisy")
    assert dict(c.overrides) == {"omega": "1.0", "beta": "0.5", "gamma": "0.5", "interval": "5b"}


def test_expansion_seeds_and_profiles(tmp_path):
    table = get_table("3")
    runs = expand(table, profile="paper", out_dir=str(tmp_path))
    assert len(runs) == 84 * 5
    assert sorted({r.config.seed for r in runs}) == [FIRST_SEED + r for r in range(5)] == [42, 43, 44, 45, 46]
    assert {r.config.dataset for r in runs} == {"cifar10", "cifar100"}
    assert len(expand(table, profile="quick", seeds=3)) == 84 * 3
    pipeline_runs = expand(table, profile="pipeline")
    assert len(pipeline_runs) == 84 and {r.config.seed for r in pipeline_runs} == {42}
    assert {r.config.dataset for r in pipeline_runs} == {"digits"}
    # pipeline cells that differ only in their dataset are one run; OKDPH's presets keep theirs apart
    distinct = unique_configs(pipeline_runs)
    assert len(distinct) < 84
    assert sum(c.method == "okdph" for c in distinct) > 6
    okdph = next(r for r in runs if r.cell.method == "okdph" and r.cell.backbone == "vgg16"
                 and r.cell.students == 3 and r.cell.dataset == "cifar100")
    assert dict(okdph.config.overrides) == {"omega": "0.3", "beta": "0.3", "gamma": "1.0", "interval": "3e"}
    assert okdph.config.students == 3 and okdph.config.profile == "paper"
    only = expand(table, profile="pipeline", methods=["okdph", "dml"])
    assert {r.cell.method for r in only} == {"okdph", "dml"} and len(only) == 24


@pytest.mark.parametrize("call,message", [
    (lambda: get_table("7"), "unknown table '7'; valid: 3, 4, 5, main-cifar, main-imagenet, main-noisy-limited"),
    (lambda: expand(get_table("3"), profile="fast"), "unknown profile 'fast'; valid: paper, quick, smoke, pipeline"),
    (lambda: expand(get_table("main-imagenet"), profile="pipeline"), "valid: paper, quick"),
    (lambda: expand(get_table("3"), profile="pipeline", seeds=0), "seeds must be >= 1"),
    (lambda: expand(get_table("3"), profile="pipeline", methods=["base"]), "method 'base' is not in table3; valid:"),
])
def test_expansion_errors_name_the_valid_choices(call, message):
    with pytest.raises(ConfigError, match=None) as err:
        call()
    assert message in str(err.value)


# --------------------------------------------------------------------------------------------------
# Rendering from records


def _cells(table, **where):
    return [c for c in table.cells if all(getattr(c, k) == v for k, v in where.items())]


def test_rendering_mean_std_n_delta_bold_and_missing_paper(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("main-cifar")
    row = _cells(table, dataset="cifar10", backbone="resnet32")
    by_method = {c.method: c for c in row}
    for seed, acc in zip((42, 43, 44), (93.0, 94.0, 95.0)):   # okdph: 94 ± 1, n=3
        fake_record(cell_config(by_method["okdph"], profile="quick", seed=seed, out_dir=str(store.runs_dir)), acc)
    fake_record(cell_config(by_method["dml"], profile="quick", out_dir=str(store.runs_dir)), 90.5)  # n=1
    fake_record(cell_config(by_method["base"], profile="quick", out_dir=str(store.runs_dir)), 91.25)  # no paper
    # another profile's and another fidelity's records never enter these cells
    fake_record(cell_config(by_method["dml"], profile="pipeline", out_dir=str(store.runs_dir)), 10.0)
    fake_record(cell_config(by_method["dml"], profile="quick", fidelity="paper", out_dir=str(store.runs_dir)), 99.0)

    everything = collect(TableChoices(table, profile="quick"), store)
    results = {r.cell.method: r for r in everything if r.cell in row}
    okdph = results["okdph"]
    assert (okdph.n, okdph.mean, okdph.std) == (3, 94.0, 1.0)
    assert okdph.delta == pytest.approx(94.0 - 95.01) and okdph.best
    assert results["dml"].n == 1 and results["dml"].std is None and not results["dml"].best
    assert results["base"].cell.paper is None and results["base"].delta is None
    assert results["one"].n == 0

    text = markdown_table(table, everything)
    lines = text.splitlines()
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header[:3] == ["Dataset", "Backbone", ""] and header[3:] == [
        "Base", "DML", "ONE", "KDCL", "OKDDip", "FFL", "PCL", "OKDPH", "OKDPH vs best baseline"]
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "").strip()) <= {""}
    assert lines[1].rstrip("|").endswith(":")                 # numbers right-aligned
    ours = next(line for line in lines if "| ours" in line and "CIFAR-10 " in line and "ResNet32 " in line)
    assert "**94.00 ± 1.00 (n=3)**" in ours and "90.50 (n=1)" in ours and "91.25 (n=1)" in ours
    assert ours.split("|")[-2].strip() == "n < 2"             # the best baseline (Base) has one run
    paper = lines[lines.index(ours) + 1]
    assert "| paper" in paper and "**95.01†**" in paper and "94.27‡" in paper
    assert paper.split("|")[4].strip() == "–"                 # Base: no paper value
    delta = lines[lines.index(ours) + 2]
    assert "-1.01" in delta and "-3.77" in delta and delta.split("|")[4].strip() == "–"
    # rows without any paper value get no paper or Δ line
    ours100 = next(line for line in lines if "CIFAR-100" in line and "WRN20-8" in line)
    after = lines[lines.index(ours100) + 1] if lines.index(ours100) + 1 < len(lines) else ""
    assert "| paper" not in after

    final = {r.cell.method: r for r in collect(TableChoices(table, profile="quick", metric="final"),
                                               store, cells=row)}
    assert final["okdph"].mean == 93.0   # the deployed head at the last epoch (acc - 1 in fake_record)


def test_smoke_rows_name_their_data_ties_are_not_bold_and_seed_lists_are_named(tmp_path):
    """A smoke row trains on digits: its label says so (the paper's dataset is the row it stands
    for); a row whose every cell ties (all at chance) has no best; seeds from --seed-list are listed."""
    store = ResultStore(tmp_path)
    table = get_table("3")
    row = _cells(table, dataset="cifar10", backbone="resnet32", students=2)
    for cell in row:
        for seed in (42, 50):
            fake_record(cell_config(cell, profile="smoke", seed=seed, out_dir=str(store.runs_dir)), 10.0)
    results = collect(TableChoices(table, profile="smoke"), store, cells=row)
    assert not any(r.best for r in results)
    text = markdown(TableChoices(table, profile="smoke", fidelity="official", metric="paper"), results, store.runs_dir)
    ours = next(line for line in text.splitlines() if "| ours" in line)
    assert ours.startswith("| digits (CIFAR-10 row) | ResNet32") and "**" not in ours
    assert "(seeds 42, 50)" in text and "42 + r" not in text

    fake_record(cell_config(row[0], profile="smoke", seed=44, out_dir=str(store.runs_dir)), 40.0)
    store.refresh()
    results = collect(TableChoices(table, profile="smoke"), store, cells=row)
    assert [r.cell.method for r in results if r.best] == [row[0].method]


def test_lower_is_better_and_pacbayes_values(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("5")
    row = {c.method: c for c in _cells(table, dataset="cifar10", backbone="resnet32")}
    for method, bound in (("dml", 97.9), ("okdph", 97.1)):
        record = fake_record(cell_config(row[method], profile="pipeline", out_dir=str(store.runs_dir)), 50.0)
        record["metrics"]["pacbayes"] = bound
        atomic_write_json(store.runs_dir / f"{record['run_id']}.json", record)
    fake_record(cell_config(row["kdcl"], profile="pipeline", out_dir=str(store.runs_dir)), 50.0)  # no bound yet
    pipeline = collect(TableChoices(table, profile="pipeline"), store)
    results = {r.cell.method: r for r in pipeline if r.cell in row.values()}
    assert results["okdph"].best and not results["dml"].best and results["kdcl"].n == 0
    text = markdown_table(table, list(results.values()))
    assert "**97.10 (n=1)**" in text and "**97.26**" in text  # paper: Ours is the lowest bound too


def test_a_bound_whose_search_did_not_converge_is_marked(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("5")
    row = {c.method: c for c in _cells(table, dataset="cifar10", backbone="resnet110")}
    for method, converged in (("kdcl", False), ("dml", True)):
        record = fake_record(cell_config(row[method], profile="pipeline", out_dir=str(store.runs_dir)), 50.0)
        record["metrics"]["pacbayes"] = 50668534497.28 if not converged else 97.9
        record["pacbayes"] = {"converged": converged, "value": record["metrics"]["pacbayes"]}
        atomic_write_json(store.runs_dir / f"{record['run_id']}.json", record)
    results = collect(TableChoices(table, profile="pipeline"), store)
    text = markdown(TableChoices(table, profile="pipeline", fidelity="official", metric="paper"), results,
                    store.runs_dir)
    assert "50668534497.28 (n=1), 1 not converged" in text and "97.90 (n=1) |" in text.replace("**", "")
    assert "\"not converged\": the σ search" in text


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_text(path.read_text()[:40])
    else:
        record = json.loads(path.read_text())
        if how == "acc high":
            record["metrics"]["paper"]["acc"] = "high"
        else:
            record["history"] = None
        path.write_text(json.dumps(record))


def test_damaged_records_are_named_not_counted_and_trained_again(tmp_path, monkeypatch):
    """A truncated record, one with "acc": "high" and one with history null: each is reported by
    name, its cell says it has an unreadable record, and `run` does not count it as recorded."""
    table = get_table("3")
    cells = [c for c in table.cells if c.method == "dml" and c.dataset == "cifar10"][:4]
    store = ResultStore(tmp_path)
    paths = []
    for cell in cells:
        record = fake_record(cell_config(cell, profile="pipeline", out_dir=str(store.runs_dir)), 40.0)
        paths.append(store.runs_dir / f"{record['run_id']}.json")
    for path, how in zip(paths, ("truncated", "acc high", "history null")):
        _damage(path, how)
    result = CliRunner().invoke(main, ["table", "3", "--profile", "pipeline", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3 and all(any(p.name in w for w in warnings) for p in paths[:3])
    for problem in ("is unreadable", "metrics.paper is", "history is null"):
        assert any(problem in w for w in warnings), problem
    # in the pipeline profile a CIFAR-10 cell and its CIFAR-100 twin share their run: six cells
    assert result.stdout.count("(1 unreadable)") == 6 and "40.00 (n=1)" in result.stdout
    assert "are not counted (\"unreadable\": the command named them)" in result.stdout
    assert json.loads((tmp_path / "tables" / "table3-pipeline.json").read_text())["cells"][0]["unreadable"] == 1

    trained = []
    monkeypatch.setattr(executors, "train_run", lambda cfg, **_: trained.append(cfg.run_id()) or fake_record(cfg, 50.0))
    summary = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False), methods=["dml"],
                               results=tmp_path)
    assert summary.recorded == 1 and len(trained) == summary.runs - 1
    assert {p.stem for p in paths[:3]} <= set(trained) and paths[3].stem not in trained
    assert sorted(summary.damaged) == sorted(map(str, paths[:3]))


def test_cells_never_mix_engines(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("3")
    cell = table.cells[0]
    fake_record(cell_config(cell, profile="pipeline", seed=42, out_dir=str(store.runs_dir)), 20.0, engine="fast")
    fake_record(cell_config(cell, profile="pipeline", seed=43, out_dir=str(store.runs_dir)), 30.0, engine="reference")
    with pytest.raises(ConfigError, match="has records from engines fast, reference; pass --engine"):
        collect(TableChoices(table, profile="pipeline"), store)
    by_engine = collect(TableChoices(table, profile="pipeline", engine="reference"), store)
    assert by_engine[0].values == [30.0]


def test_runs_of_another_configuration_stay_out_of_a_cell(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("3")
    cfg = cell_config(table.cells[0], profile="quick", out_dir=str(store.runs_dir))
    fake_record(cfg, 20.0)
    fake_record(replace(cfg, seed=43, width=0.5), 30.0)                       # another width
    fake_record(replace(cfg, seed=44, overrides=(("temperature", "2"),)), 40.0)  # another hyper-parameter
    fake_record(replace(cfg, seed=45, epochs=7), 50.0)                        # another schedule
    assert collect(TableChoices(table, profile="quick"), store)[0].values == [20.0]


def test_written_table_files_and_stems(tmp_path):
    table = get_table("3")
    assert TableChoices(table, profile='paper', fidelity='official', metric='paper').stem() == "table3"
    assert TableChoices(table, profile='pipeline', fidelity='official', metric='paper').stem() == "table3-pipeline"
    assert TableChoices(table, profile='quick', fidelity='paper', metric='final').stem() == "table3-quick-paper-final"
    store = ResultStore(tmp_path)
    fake_record(cell_config(table.cells[0], profile="pipeline", out_dir=str(store.runs_dir)), 40.0)
    paths, text = runner.render_table(TableChoices.of("3", profile="pipeline"), results=tmp_path)
    assert paths["md"].name == "table3-pipeline.md" and text.startswith("# table3: ")
    # in the pipeline profile the CIFAR-100 twin of the cell is the same run on digits
    assert "2 of 84 cells have records" in text and "Pipeline profile" in text
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 84 and rows[0]["mean"] == "40.0" and rows[0]["n"] == "1" and rows[0]["paper"] == "94.27"
    data = json.loads(paths["json"].read_text())
    assert data["profile"] == "pipeline" and data["cells"][0]["run_ids"] and data["cells"][1]["n"] == 0


def test_report_links_a_learning_curve_per_cell(tmp_path):
    store = ResultStore(tmp_path)
    table = get_table("4")
    for cell in table.cells[:2]:
        for seed in (42, 43):
            fake_record(cell_config(cell, profile="quick", seed=seed, out_dir=str(store.runs_dir)), 60.0 + seed % 2)
    path = write_report(tmp_path)
    text = path.read_text()
    assert "## table4:" in text and "](figures/table4-quick/cifar10-densenet40_12-noisy-n2-dml.png)" in text
    pngs = sorted((tmp_path / "figures" / "table4-quick").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert (tmp_path / "tables" / "table4-quick.md").exists()
    assert "table3" not in text  # tables without records are left out


# --------------------------------------------------------------------------------------------------
# Resume, plan, command line


def test_resume_trains_only_the_runs_without_a_record(tmp_path, monkeypatch):
    trained = []

    def fake_train(cfg, progress=False, **_):
        trained.append(cfg.run_id())
        return fake_record(cfg, 50.0)

    monkeypatch.setattr(executors, "train_run", fake_train)
    first = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False),
                             methods=["dml", "kdcl"], results=tmp_path)
    assert first.trained == first.runs == 12 and first.recorded == 0 and not first.failed
    # more of the table: the twelve recorded runs are skipped
    trained.clear()
    second = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False),
                              methods=["dml", "kdcl", "okdph"], results=tmp_path)
    assert second.recorded == 12 and second.trained == len(trained) == second.runs - 12
    assert not any(run_id.startswith(("dml", "kdcl")) for run_id in trained)
    assert "(n=1)" in second.markdown
    # everything recorded: nothing to do
    trained.clear()
    third = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False),
                             methods=["dml", "kdcl", "okdph"], results=tmp_path)
    assert third.trained == 0 and trained == [] and third.recorded == third.runs


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    def flaky(cfg, progress=False, **_):
        if cfg.method == "kdcl":
            raise RuntimeError("out of memory\nmore detail")
        return fake_record(cfg, 50.0)

    monkeypatch.setattr(executors, "train_run", flaky)
    summary = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False),
                               methods=["dml", "kdcl"], results=tmp_path)
    assert summary.trained == 6 and len(summary.failed) == 6
    assert all(error == "RuntimeError: out of memory" for _, error in summary.failed)


def test_a_table_whose_every_run_failed_is_not_written(tmp_path, monkeypatch):
    def broken(cfg, progress=False, **_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(executors, "train_run", broken)
    summary = runner.run_table(TableChoices.of("3", profile="pipeline"), Execution(progress=False), methods=["dml"],
                               results=tmp_path)
    assert summary.trained == 0 and len(summary.failed) == 6
    assert summary.outputs == {} and summary.markdown == "" and not (tmp_path / "tables").exists()


def test_table_without_profile_renders_the_one_with_records(tmp_path):
    store = ResultStore(tmp_path)
    fake_record(cell_config(get_table("3").cells[0], profile="pipeline", out_dir=str(store.runs_dir)), 40.0)
    assert runner.default_profile("3", results=tmp_path) == "pipeline"
    result = CliRunner().invoke(main, ["table", "3", "--metric", "final", "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "profile pipeline: the first with records" in result.stderr
    assert "39.00 (n=1)" in result.stdout and (tmp_path / "tables" / "table3-pipeline-final.md").exists()
    assert runner.default_profile("4", results=tmp_path) == "paper"  # no records anywhere: paper, and
    result = CliRunner().invoke(main, ["table", "4", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "train some with okdph-bench run --table 4" in result.stderr


@pytest.mark.slow
def test_plan_prints_runnable_commands(tmp_path):
    commands = runner.plan_table(TableChoices.of("3", profile="pipeline"), methods=["dml"], results=tmp_path)
    assert len(commands) == 6 and all(c.startswith("okdph-bench train --method dml ") for c in commands)
    assert all("--skip-recorded" in c and "--seed 42" in c and f"--out {tmp_path}/runs" in c for c in commands)
    okdph = runner.plan_table(TableChoices.of("3", profile="paper"), methods=["okdph"], results=tmp_path)
    assert len(okdph) == 12 * 5 and "--set omega=1.0 --set beta=0.5 --set gamma=1.0 --set interval=5b" in okdph[6 * 5]
    ddp = runner.plan_table(TableChoices.of("main-imagenet", profile="paper"), Execution(ddp_procs=8),
                            methods=["okdph"], results=tmp_path)
    assert ddp[0].startswith("torchrun --standalone --nproc_per_node=8 --no-python okdph-bench train ")
    assert ddp[0].endswith("--ddp") and "--dataset imagenet" in ddp[0]

    # run the first planned command as it is printed (with this interpreter)
    argv = shlex.split(commands[0])
    assert argv[0] == "okdph-bench"
    done = subprocess.run([sys.executable, "-m", "okdph.cli", *argv[1:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    store = ResultStore(tmp_path)
    (record_path,) = store.runs_dir.glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["method"] == "dml" and record["profile"] == "pipeline" and record["status"] == "complete"
    assert len(runner.plan_table(TableChoices.of("3", profile="pipeline"), methods=["dml"], results=tmp_path)) == 5
    again = subprocess.run([sys.executable, "-m", "okdph.cli", *argv[1:]], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.startswith("recorded: ")


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args,message", [
    # click.Choice names the value and every valid one (tables by id and alias, compared in lower case)
    (["run", "--table", "7"], "'7' is not one of 'main-cifar', 'main-imagenet', 'imagenet', 'main-noisy-limited', "
                              "'noisy-limited', 'table3', '3', 's3', 'table4', '4', 's4', 'table5', '5', 's5'"),
    (["run", "--table", "3", "--profile", "fast"], "'fast' is not one of 'paper', 'quick', 'smoke', 'pipeline'"),
    (["run", "--table", "main-imagenet", "--profile", "pipeline"], "valid: paper, quick"),
    (["run", "--table", "3", "--metric", "best"], "'best' is not one of 'paper', 'final'"),
    (["run", "--table", "3", "--executor", "k8s"], "'k8s' is not one of 'local', 'slurm'"),
    (["table", "S9"], "'S9' is not one of 'main-cifar', "),
    (["table", "3", "--profile", "slow"], "'slow' is not one of 'paper', 'quick', 'smoke', 'pipeline'"),
    (["plan", "--table", "x"], "'x' is not one of 'main-cifar', "),
])
def test_bad_table_or_profile_is_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, args + ["--results", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_cli_dry_run_plan_and_table(tmp_path):
    result = invoke("run", "--table", "4", "--profile", "pipeline", "--dry-run", "--results", str(tmp_path))
    assert result.exit_code == 0
    first = result.output.splitlines()[0]
    assert first.startswith("table4 (pipeline): 42 cells, ") and "0 already recorded" in first
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    result = invoke("plan", "--table", "main-noisy-limited", "--profile", "quick", "--seeds", "2",
                    "--results", str(tmp_path))
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("# 168 runs") and len(lines) == 1 + 84 * 2
    # nothing recorded: no table of empty cells, but one line saying so
    result = CliRunner().invoke(main, ["table", "3", "--profile", "pipeline", "--results", str(tmp_path)])
    assert result.exit_code == 2 and "no records of table3 for profile 'pipeline'" in result.stderr
    assert not (tmp_path / "tables").exists()
