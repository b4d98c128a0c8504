"""The result store: the run records of a results folder, and the cell each one belongs to.

    results/runs/<run_id>.json     one record per run (okdph.engine.run.train_run writes it atomically)
    results/tables/<stem>.md|csv|json  rendered tables     results/figures/  learning curves
    results/figures/analysis/      PAC-Bayes-per-epoch and loss-landscape figures (okdph.analysis)
    results/REPORT.md              every rendered table with its figures

A run is recorded once its record exists: the runner skips it. A cell's records are those whose run
id is the one the cell's configuration gets with the record's seed and engine: the whole identity
(RunConfig.identity: method, backbone, dataset, setting, students, overrides, fidelity, profile,
epochs, width, precision, …) matches but the seed, so seeds added later simply raise the cell's n,
and a cell never mixes profiles or fidelities (nor engines: the renderer checks that).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

from okdph.engine.run import RunConfig

_COARSE = ("method", "backbone", "dataset", "setting", "students", "profile", "fidelity")


def _coarse(fields: dict) -> tuple:
    return tuple(fields.get(k) for k in _COARSE)


class ResultStore:
    """Records under `root/runs`, read once and indexed by their main fields."""

    def __init__(self, root="results"):
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.tables_dir = self.root / "tables"
        self.figures_dir = self.root / "figures"
        self.analysis_dir = self.figures_dir / "analysis"  # `pacbayes --per-epoch`, `landscape` (+ data)
        self._index: dict[tuple, list[dict]] | None = None

    def is_recorded(self, cfg: RunConfig) -> bool:
        return cfg.record_path().exists()

    def refresh(self) -> None:
        self._index = None

    def records(self) -> list[dict]:
        return [r for group in self._build().values() for r in group]

    def _build(self) -> dict[tuple, list[dict]]:
        if self._index is None:
            self._index = {}
            for path in sorted(self.runs_dir.glob("*.json")):
                try:
                    record = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError) as exc:  # records are written atomically:
                    warnings.warn(f"skipping unreadable record {path}: {exc}", stacklevel=2)  # a foreign file
                    continue
                if not isinstance(record, dict) or "run_id" not in record:
                    continue
                self._index.setdefault(_coarse(record), []).append(record)
        return self._index

    def records_for(self, cfg: RunConfig, engine: str | None = None) -> list[dict]:
        """Records of every seed of `cfg`'s cell (of `engine` only, when given), by seed."""
        candidates = self._build().get(_coarse(cfg.identity()), [])
        found = [r for r in candidates if (engine is None or r.get("engine") == engine)
                 and r["run_id"] == replace(cfg, seed=r.get("seed"), engine=r.get("engine")).run_id()]
        return sorted(found, key=lambda r: (r.get("seed", 0), r.get("created", "")))
