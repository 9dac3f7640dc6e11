"""The train-year x eval-year matrix: its rows, cells and TiC summaries (pure data, no I/O).

A cell is in-domain when its eval year is one the checkpoint's plan step added (one year per
step, except a first step grouping several years, whose years are all in-domain), backward when
the eval year is older than all of them, forward when newer. Each summary is the mean over the
cells of its kind (TiC-CLIP: the diagonal, the lower and the upper triangle); `mean` is over all
cells. Years compare as strings, so yearly (2016) and monthly (201603) names both work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.eval.metrics import HEADLINE, METRICS

FORMAT = "tic-eval/1"
SUMMARIES = ("in_domain", "backward", "forward", "mean")


@dataclass(frozen=True)
class CheckpointRef:
    """One row of the matrix: a yearly DeepSpeed checkpoint of a run, or an open_clip .pt file."""

    name: str
    train_years: tuple[str, ...]
    source: str
    kind: str
    """'deepspeed' (a run's checkpoints/year-YYYY folder) or 'pt' (open_clip / TiC-CLIP file)."""


def relation(eval_year: str, train_years: tuple[str, ...] | list[str]) -> str | None:
    """in_domain, backward or forward; None when the years are not comparable (no train year, 'all')."""
    comparable = all(y.isdigit() and len(y) == len(eval_year) for y in train_years)
    if not train_years or not eval_year.isdigit() or not comparable:
        return None
    if eval_year in train_years:
        return "in_domain"
    return "backward" if eval_year < min(train_years) else "forward" if eval_year > max(train_years) else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def transfer_summary(values: dict[str, float], train_years: tuple[str, ...] | list[str]) -> dict[str, float | None]:
    """One checkpoint's in-domain, backward, forward and overall mean of {eval year: value}."""
    kinds = {y: relation(y, train_years) for y in values}
    out = {part: _mean([v for y, v in values.items() if kinds[y] == part]) for part in SUMMARIES[:3]}
    out["mean"] = _mean(list(values.values()))
    return out


@dataclass
class Matrix:
    """Results of every checkpoint on every eval year."""

    checkpoints: list[CheckpointRef]
    years: list[str]
    results: dict[str, dict[str, dict[str, float]]]
    """checkpoint name -> eval year -> metric -> value."""
    info: dict[str, Any] = field(default_factory=dict)
    """Options, data root and checkpoint stamps the results were computed with."""

    def metrics(self) -> list[str]:
        """Metrics present in any cell, in METRICS order."""
        seen = {m for by_year in self.results.values() for ms in by_year.values() for m in ms}
        return [m for m in METRICS if m in seen]

    def value(self, name: str, year: str, metric: str) -> float:
        """One cell's metric, NaN when not measured."""
        return self.results.get(name, {}).get(year, {}).get(metric, math.nan)

    def grid(self, metric: str) -> list[list[float]]:
        """Rows = checkpoints, columns = eval years; NaN where not measured."""
        return [[self.value(c.name, y, metric) for y in self.years] for c in self.checkpoints]

    def summary(self, metric: str) -> dict[str, Any]:
        """Run-level in-domain / backward / forward / mean over cells, and each checkpoint's own."""
        cells: dict[str, list[float]] = {part: [] for part in SUMMARIES}
        rows = {}
        for c in self.checkpoints:
            values = {y: v for y in self.years if not math.isnan(v := self.value(c.name, y, metric))}
            rows[c.name] = transfer_summary(values, c.train_years)
            for y, v in values.items():
                cells["mean"].append(v)
                if (kind := relation(y, c.train_years)) is not None:
                    cells[kind].append(v)
        return {**{part: _mean(cells[part]) for part in SUMMARIES}, "checkpoints": rows}

    def to_json(self) -> dict[str, Any]:
        """The matrix.json content: metric meanings, cells, summaries of every metric, info."""
        metrics = self.metrics()
        return {
            "format": FORMAT,
            "headline": HEADLINE,
            "metrics": {m: METRICS[m] for m in metrics},
            "eval_years": self.years,
            "checkpoints": [{**asdict(c), "train_years": list(c.train_years)} for c in self.checkpoints],
            "results": self.results,
            "summary": {m: self.summary(m) for m in metrics},
            "info": self.info,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Matrix:
        """The matrix back from to_json() output."""
        refs = [CheckpointRef(c["name"], tuple(c["train_years"]), c["source"], c["kind"]) for c in d["checkpoints"]]
        return cls(refs, list(d["eval_years"]), d["results"], d.get("info", {}))
