"""The matrix written and read: matrix.json, matrix.csv, heatmaps, and the console table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from trainer.eval.matrix import SUMMARIES, Matrix, relation
from trainer.eval.metrics import HEADLINE, METRICS
from trainer.eval.plots import save_heatmaps
from trainer.files import write_text_atomic
from trainer.rundir import CheckpointError


def write_matrix(matrix: Matrix, out_dir: Path, heatmaps: list[str] | None = None) -> list[Path]:
    """matrix.json, matrix.csv and a heatmap PNG per metric (default: plots.HEATMAPS) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_text_atomic(out_dir / "matrix.json", json.dumps(_no_nan(matrix.to_json()), indent=1))
    csv_path = out_dir / "matrix.csv"
    metrics = matrix.metrics()
    counts = ["samples", "skipped", "zs_samples"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "train_years", "eval_year", "relation", *counts, *metrics])
        for c in matrix.checkpoints:
            for y in matrix.years:
                cell = matrix.results.get(c.name, {}).get(y, {})
                w.writerow(
                    [
                        c.name,
                        " ".join(c.train_years),
                        y,
                        relation(y, c.train_years) or "",
                        *[cell.get(k, "") for k in counts],
                        *[_fmt(cell.get(m)) for m in metrics],
                    ]
                )
    return [json_path, csv_path, *save_heatmaps(matrix, out_dir, heatmaps)]


def read_matrix(path: Path) -> Matrix:
    """A matrix.json written by write_matrix."""
    try:
        return Matrix.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable matrix.json ({e})") from None


def _fmt(v: float | None) -> str:
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


def _pct(v: float | None, width: int = 6) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{100 * v:>{width}.1f}"


def console_table(matrix: Matrix, metric: str = HEADLINE) -> str:
    """Checkpoints x eval years of one metric in %, in-domain cells starred, with the TiC summaries."""
    summary = matrix.summary(metric)
    width = max([len("checkpoint"), *(len(c.name) for c in matrix.checkpoints)])
    lines = [
        f"{metric} (%): {METRICS.get(metric, metric)}",
        f"{'checkpoint':<{width}} " + " ".join(f"{y:>6}" for y in matrix.years) + " |     ID    BWT    FWT   mean",
    ]
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
