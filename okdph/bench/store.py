"""The result store: the run records of a results folder, and the cell each one belongs to.

    results/runs/<run_id>.json     one record per run (okdph.engine.run.train_run writes it atomically)
    results/tables/<stem>.md|csv|json  rendered tables     results/figures/  learning curves
    results/figures/analysis/      PAC-Bayes-per-epoch and loss-landscape figures (okdph.analysis)
    results/REPORT.md              every rendered table with its figures

`results/` is every command's default (`train --out results/runs`), and git ignores what the
commands write there (.gitignore); committed outputs live in results/reference/, where no command writes.

A run is recorded once its record exists: the runner skips it. A cell's records are those whose
cell fields (RunConfig's fields marked "cell": method, backbone, dataset, setting, students,
overrides, fidelity, profile, epochs, width, precision, …) equal the cell configuration's, and whose
run id is the one that configuration gets with the record's seed and engine. Seeds added later
simply raise the cell's n, and a cell never mixes profiles or fidelities (nor engines: the renderer
checks that).

A damaged record (unparseable, or a field of the wrong type: okdph.engine.record.record_problem) is
never silently dropped: it is not counted as recorded (`run` trains the run again, which sets the
file aside as `<name>.corrupt`), the store reports it by name once (`report`, a callable taking one
line; the CLI prints it), and the tables count a cell's damaged records (`damaged_for`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from okdph.config import RunConfig, cell_key, parse_run_id
from okdph.engine.recipe import default_width
from okdph.engine.record import read_record
from okdph.errors import ConfigError, DamagedRecord

RESOLVED_ENGINES = ("reference", "fast")  # what a record's engine field holds


def _run_id_at(cfg: RunConfig, seed, engine) -> str | None:
    """The run id of `cfg` at another seed and engine, as a record or file name states them; None
    where they are no valid values (that record or file cannot be a run of this cell)."""
    try:
        return replace(cfg, seed=seed, engine=engine).run_id()
    except ConfigError:
        return None


class ResultStore:
    """Records under `root/runs`, read once and indexed by their main fields. `report` gets one
    line per damaged record, once each (by default nothing is printed: the tables count them)."""

    def __init__(self, root="results", *, report: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.tables_dir = self.root / "tables"
        self.figures_dir = self.root / "figures"
        self.analysis_dir = self.figures_dir / "analysis"  # `pacbayes --per-epoch`, `landscape` (+ data)
        self.report = report
        self.damaged: dict[Path, str] = {}  # damaged record -> why, as found so far
        self._index: dict[str, list[dict]] | None = None

    @classmethod
    def of(cls, results) -> ResultStore:
        """`results` itself when it is a store (the CLI passes one that reports), else a store on it."""
        return results if isinstance(results, ResultStore) else cls(results)

    def check_folder(self) -> None:
        """A results folder whose runs/ (or the folder itself, or a folder above it) is a file holds
        no records, and a run cannot write one there: one ConfigError line, not an empty table."""
        existing = self.runs_dir
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise ConfigError(f"results folder '{self.runs_dir}' is not a folder: '{existing}' is a file; "
                              "move it away or pass another --results")

    def check_writable(self, *folders: Path) -> None:
        """Each of `folders` (default: runs/ and tables/) takes a file; nothing is created."""
        from okdph.engine.run import check_writable

        self.check_folder()
        for folder in folders or (self.runs_dir, self.tables_dir):
            check_writable(folder, create=False)

    def _damaged(self, path: Path, exc: ConfigError) -> None:
        if path not in self.damaged:
            self.damaged[path] = str(exc)
            if self.report:
                self.report(f"{exc}; not counted as recorded" + (
                    f" (`okdph-bench run` or `train` trains the run again and sets the file aside as "
                    f"{path.name}.corrupt)" if isinstance(exc, DamagedRecord) else ""))

    def is_recorded(self, cfg: RunConfig) -> bool:
        """The run's record exists and is usable; a damaged one is reported and is not a record. A
        record of another run under this run's name is refused (ConfigError), never overwritten."""
        self.check_folder()
        path = cfg.record_path()
        if not path.exists():
            return False
        try:
            read_record(path, cfg.run_id())
        except DamagedRecord as exc:
            self._damaged(path, exc)
            return False
        return True

    def refresh(self) -> None:
        self._index = None

    def records(self) -> list[dict]:
        return [r for group in self._build().values() for r in group]

    def _build(self) -> dict[str, list[dict]]:
        if self._index is None:
            self.check_folder()
            self._index = {}
            for path in sorted(self.runs_dir.glob("*.json")):
                try:
                    record = read_record(path)
                except ConfigError as exc:  # damaged, or another run's record under this name
                    self._damaged(path, exc)
                    continue
                self._index.setdefault(cell_key(record), []).append(record)
        return self._index

    def records_for(self, cfg: RunConfig, engine: str | None = None) -> list[dict]:
        """Records of every seed of `cfg`'s cell (of `engine` only, when given), by seed."""
        candidates = self._build().get(cfg.cell_key(), [])
        found = [r for r in candidates if (engine is None or r.get("engine") == engine)
                 and r["run_id"] == _run_id_at(cfg, r.get("seed"), r.get("engine"))]
        return sorted(found, key=lambda r: (r.get("seed", 0), r.get("created", "")))

    def damaged_for(self, cfg: RunConfig, engine: str | None = None) -> list[Path]:
        """The damaged records of `cfg`'s cell (of `engine` only, when given): those whose file name
        is the run id of a seed of the cell (their content cannot be trusted to say so)."""
        self._build()
        found = []
        for path in self.damaged:
            parsed = parse_run_id(path.stem)
            if path.parent == self.runs_dir and parsed and any(
                    path.stem == _run_id_at(cfg, parsed["seed"], e)
                    for e in ((engine,) if engine else RESOLVED_ENGINES)):
                found.append(path)
        return sorted(found)

    def listing(self) -> list[dict]:
        """Every run of runs/, oldest first: one row per record (method, cell, seed, status, the
        metrics, when it was made), per damaged record (status "damaged") and per run interrupted
        before its record was written (a resume checkpoint alone: status "interrupted")."""
        rows = []
        for record in self.records():
            metrics = record.get("metrics", {})
            bound = metrics.get("pacbayes")
            rows.append({"run_id": record["run_id"], "method": record.get("method", "?"), "cell": cell_name(record),
                         "profile": record.get("profile"),
                         "seed": record.get("seed"), "status": record.get("status", "?"),
                         "paper": metrics.get("paper", {}).get("acc"), "final": metrics.get("final", {}).get("acc"),
                         "pacbayes": bound.get("value") if isinstance(bound, dict) else bound,
                         "converged": (record.get("pacbayes") or {}).get("converged"),
                         "created": record.get("created") or _mtime(self.runs_dir / f"{record['run_id']}.json")})
        others = [(path, "damaged") for path in self.damaged if path.parent == self.runs_dir]
        others += [(path, "interrupted") for path in self.runs_dir.glob("*.ckpt.pt")
                   if not path.with_name(path.name[:-len(".ckpt.pt")] + ".json").exists()]
        for path, status in others:
            run_id = path.name.split(".")[0]
            parsed = parse_run_id(run_id) or {}
            rows.append({"run_id": run_id, "method": parsed.get("method", run_id.split("-")[0]), "cell": run_id,
                         "profile": parsed.get("profile"), "seed": parsed.get("seed"), "status": status, "paper": None,
                         "final": None, "pacbayes": None, "converged": None, "created": _mtime(path)})
        return sorted(rows, key=lambda r: str(r["created"]))


def cell_name(record: dict) -> str:
    """A record's cell in a few words: backbone, dataset, setting, students, fidelity, profile and
    whatever else is not the default (epochs, width, train_samples, precision, hyper-parameters)."""
    parts = [str(record.get(k)) for k in ("backbone", "dataset", "setting")]
    parts += [f"n{record.get('students')}", str(record.get("fidelity")), str(record.get("profile"))]
    parts += [f"{k}={record[k]}" for k in ("epochs", "train_samples") if record.get(k) is not None]
    if record.get("width") not in (None, default_width(record.get("profile"), record.get("backbone"))):
        parts.append(f"width={record['width']}")
    if record.get("precision", "fp32") != "fp32":
        parts.append(str(record["precision"]))
    overrides = record.get("overrides")
    if isinstance(overrides, dict):
        parts += [f"{k}={v}" for k, v in overrides.items()]
    return " ".join(parts)


def _mtime(path: Path) -> str:
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return ""
