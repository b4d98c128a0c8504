"""The result store: the run records of a results folder, and the cell each one belongs to.

    results/runs/<run_id>.json     one record per run (okdph.engine.run.train_run writes it atomically)
    results/tables/<stem>.md|csv|json  rendered tables     results/figures/  learning curves
    results/figures/analysis/      PAC-Bayes-per-epoch and loss-landscape figures (okdph.analysis)
    results/REPORT.md              every rendered table with its figures

A run is recorded once its record exists: the runner skips it. A cell's records are those whose
cell fields (RunConfig's fields marked "cell": method, backbone, dataset, setting, students,
overrides, fidelity, profile, epochs, width, precision, …) equal the cell configuration's, and whose
run id is the one that configuration gets with the record's seed and engine. Seeds added later
simply raise the cell's n, and a cell never mixes profiles or fidelities (nor engines: the renderer
checks that).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

from okdph.engine.run import RunConfig, cell_key
from okdph.errors import ConfigError


class ResultStore:
    """Records under `root/runs`, read once and indexed by their main fields."""

    def __init__(self, root="results"):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.tables_dir = self.root / "tables"
        self.figures_dir = self.root / "figures"
        self.analysis_dir = self.figures_dir / "analysis"  # `pacbayes --per-epoch`, `landscape` (+ data)
        self._index: dict[str, list[dict]] | None = None

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

    def is_recorded(self, cfg: RunConfig) -> bool:
        self.check_folder()
        return cfg.record_path().exists()

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
                    record = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError) as exc:  # records are written atomically:
                    warnings.warn(f"skipping unreadable record {path}: {exc}", stacklevel=2)  # a foreign file
                    continue
                if not isinstance(record, dict) or "run_id" not in record:
                    continue
                self._index.setdefault(cell_key(record), []).append(record)
        return self._index

    def records_for(self, cfg: RunConfig, engine: str | None = None) -> list[dict]:
        """Records of every seed of `cfg`'s cell (of `engine` only, when given), by seed."""
        candidates = self._build().get(cfg.cell_key(), [])
        found = [r for r in candidates if (engine is None or r.get("engine") == engine)
                 and r["run_id"] == replace(cfg, seed=r.get("seed"), engine=r.get("engine")).run_id()]
        return sorted(found, key=lambda r: (r.get("seed", 0), r.get("created", "")))
