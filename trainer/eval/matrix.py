"""The train-year x eval-year matrix: which checkpoints, their results, TiC summaries, JSON / CSV / console.

A cell is in-domain when its eval year is one the checkpoint's plan step added (one year per
step, except a first step grouping several years, whose years are all in-domain), backward when
the eval year is older than all of them, forward when newer. Each summary is the mean over the
cells of its kind (TiC-CLIP: the diagonal, the lower and the upper triangle); `mean` is over all
cells. Years compare as strings, so yearly (2016) and monthly (201603) names both work.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from trainer.checkpoint import COMPLETE, CheckpointError, is_complete
from trainer.eval.metrics import HEADLINE, METRICS
from trainer.export import read_open_clip_checkpoint
from trainer.weights import load_weights

if TYPE_CHECKING:
    from trainer.evaluate import Evaluator

log = logging.getLogger("tic")

FORMAT = "tic-eval/1"
SUMMARIES = ("in_domain", "backward", "forward", "mean")
_YEAR_IN_NAME = re.compile(r"(?<!\d)(\d{4})(?!\d)")


@dataclass(frozen=True)
class CheckpointRef:
    """One row of the matrix: a yearly DeepSpeed checkpoint of a run, or an open_clip .pt file."""

    name: str
    train_years: tuple[str, ...]
    source: str
    kind: str
    """'deepspeed' (a run's checkpoints/year-YYYY folder) or 'pt' (open_clip / TiC-CLIP file)."""

    def load(self) -> dict[str, torch.Tensor]:
        """The checkpoint's fp32 open_clip state dict."""
        path = Path(self.source)
        if self.kind == "deepspeed":
            return load_weights(path.parent, path.name)
        return read_open_clip_checkpoint(path)

    def stamp(self) -> float:
        """Modification time of what defines the weights (changes when a checkpoint is rewritten)."""
        path = Path(self.source)
        return (path / COMPLETE if self.kind == "deepspeed" else path).stat().st_mtime


def run_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    """The complete yearly checkpoints of a run, in plan order, with each step's years."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    plan_file = run_dir / "plan.json"
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text())
            steps = [(s["tag"], tuple(s.get("new_years") or [s["tag"]])) for s in plan["steps"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{plan_file}: not a readable plan ({e})") from None
    else:
        tags = sorted(p.name.removeprefix("year-") for p in ckpt_dir.glob("year-*"))
        steps = [(t, (t,)) for t in tags]
    refs = []
    for tag, years in steps:
        folder = ckpt_dir / f"year-{tag}"
        if is_complete(folder):
            refs.append(CheckpointRef(tag, years, str(folder), "deepspeed"))
        elif folder.exists():
            log.warning("%s: incomplete checkpoint (no %s marker), left out", folder, COMPLETE)
    if not refs:
        raise CheckpointError(f"{ckpt_dir}: no complete yearly checkpoints (year-<YYYY>/ with a {COMPLETE} file)")
    return refs


def file_checkpoints(specs: list[str]) -> list[CheckpointRef]:
    """Rows for open_clip .pt files given as PATH or YEAR=PATH (a lone 4-digit year in the name counts)."""
    refs = []
    for spec in specs:
        year, sep, path = spec.partition("=")
        if not sep or "/" in year or Path(spec).is_file():
            path = spec
            found = _YEAR_IN_NAME.findall(Path(spec).stem)
            year = found[0] if len(found) == 1 else ""
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        name = year or Path(path).stem
        refs.append(CheckpointRef(name, (year,) if year else (), str(Path(path)), "pt"))
    names = [r.name for r in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise CheckpointError(
            f"--checkpoints: several files are named {', '.join(twice)}; write YEAR=PATH to tell them apart"
        )
    return refs


def relation(eval_year: str, train_years: tuple[str, ...] | list[str]) -> Optional[str]:
    """in_domain, backward or forward; None when the years are not comparable (no train year, 'all')."""
    comparable = all(y.isdigit() and len(y) == len(eval_year) for y in train_years)
    if not train_years or not eval_year.isdigit() or not comparable:
        return None
    if eval_year in train_years:
        return "in_domain"
    return "backward" if eval_year < min(train_years) else "forward" if eval_year > max(train_years) else None


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def transfer_summary(values: dict[str, float], train_years: tuple[str, ...] | list[str]) -> dict[str, Optional[float]]:
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


def build_matrix(refs: list[CheckpointRef], evaluator: Evaluator, info: Optional[dict[str, Any]] = None) -> Matrix:
    """Evaluate every checkpoint on every eval year of `evaluator` (collective: all ranks call it)."""
    results = {}
    for ref in refs:
        t0 = time.perf_counter()
        results[ref.name] = evaluator.evaluate(ref.load(), name=ref.source)
        head = ", ".join(f"{y} {100 * r[HEADLINE]:.1f}" for y, r in results[ref.name].items() if HEADLINE in r)
        log.info("%s: %s %% [%s] (%.1fs)", ref.name, HEADLINE, head, time.perf_counter() - t0)
    return Matrix(list(refs), list(evaluator.years), results, dict(info or {}))


def fingerprint(refs: list[CheckpointRef], data_root: str, years: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """What the results depend on; equal fingerprints mean a saved matrix is still current."""
    return {
        "data": data_root,
        "eval_years": list(years),
        "options": options,
        "checkpoints": [[r.name, r.source, r.stamp()] for r in refs],
    }


def write_matrix(matrix: Matrix, out_dir: Path, heatmaps: Optional[list[str]] = None) -> list[Path]:
    """matrix.json, matrix.csv and a heatmap PNG per metric (default: plots.HEATMAPS) into `out_dir`."""
    from trainer.eval.plots import save_heatmaps

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "matrix.json"
    tmp = json_path.with_name(".matrix.json.tmp")
    tmp.write_text(json.dumps(_no_nan(matrix.to_json()), indent=1))
    tmp.replace(json_path)
    csv_path = out_dir / "matrix.csv"
    metrics = matrix.metrics()
    counts = ["samples", "skipped", "zs_samples"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "train_years", "eval_year", "relation", *counts, *metrics])
        for c in matrix.checkpoints:
            for y in matrix.years:
                cell = matrix.results.get(c.name, {}).get(y, {})
                w.writerow([c.name, " ".join(c.train_years), y, relation(y, c.train_years) or "",
                            *[cell.get(k, "") for k in counts], *[_fmt(cell.get(m)) for m in metrics]])
    return [json_path, csv_path, *save_heatmaps(matrix, out_dir, heatmaps)]


def read_matrix(path: Path) -> Matrix:
    """A matrix.json written by write_matrix."""
    try:
        return Matrix.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable matrix.json ({e})") from None


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.6f}"


def _no_nan(x: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def _pct(v: Optional[float], width: int = 6) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{100 * v:>{width}.1f}"


def console_table(matrix: Matrix, metric: str = HEADLINE) -> str:
    """Checkpoints x eval years of one metric in %, in-domain cells starred, with the TiC summaries."""
    summary = matrix.summary(metric)
    width = max([len("checkpoint"), *(len(c.name) for c in matrix.checkpoints)])
    lines = [f"{metric} (%): {METRICS.get(metric, metric)}",
             f"{'checkpoint':<{width}} " + " ".join(f"{y:>6}" for y in matrix.years) + " |     ID    BWT    FWT   mean"]
    for c in matrix.checkpoints:
        cells = []
        for y in matrix.years:
            mark = "*" if relation(y, c.train_years) == "in_domain" else " "
            cells.append(_pct(matrix.value(c.name, y, metric), 5) + mark)
        row = summary["checkpoints"][c.name]
        lines.append(f"{c.name:<{width}} " + " ".join(cells) + " | " + " ".join(_pct(row[p]) for p in SUMMARIES))
    run = " ".join(_pct(summary[p]) for p in SUMMARIES)
    lines.append(f"{'run':<{width}} " + " " * 7 * len(matrix.years) + "| " + run)
    return "\n".join(lines)
