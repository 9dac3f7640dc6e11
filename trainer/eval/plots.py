"""Matplotlib figures of eval matrices: a heatmap per metric, line plots comparing runs.

Figures are built with the object API (no pyplot state), so they render with Agg anywhere and
tests can inspect them before they are saved.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from trainer.eval.matrix import SUMMARIES, Matrix, relation

# The metrics drawn by default; every metric is in matrix.json / matrix.csv either way.
HEATMAPS = ("mean_R1", "strict_mean_R1", "i2t_R1", "t2i_R1", "mean_R5", "zs_top1", "zs_top5", "zs_balanced")
_TITLES = {"in_domain": "in-domain", "backward": "backward transfer", "forward": "forward transfer"}


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def heatmap(matrix: Matrix, metric: str, title: str = "") -> Figure:
    """Checkpoints (rows) x eval years (columns) in %, every cell annotated, in-domain cells outlined."""
    grid = np.array(matrix.grid(metric), dtype=float) * 100
    rows, cols = grid.shape
    fig = Figure(figsize=(max(5.0, 0.75 * cols + 3.0), max(3.2, 0.5 * rows + 2.0)), layout="constrained")
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=low, vmax=max(high, low + 1e-6), aspect="auto")
    ax.set_xticks(range(cols), labels=matrix.years, rotation=45 if cols > 8 else 0)
    ax.set_yticks(range(rows), labels=[c.name for c in matrix.checkpoints])
    ax.set_xlabel("eval year")
    ax.set_ylabel("checkpoint (trained through)")
    fig.colorbar(image, ax=ax, label=f"{metric} (%)")
    size = 9 if cols <= 8 else 7
    for i, ref in enumerate(matrix.checkpoints):
        for j, year in enumerate(matrix.years):
            v = grid[i, j]
            dark = np.isfinite(v) and (v - low) < 0.5 * (high - low)
            ax.text(
                j,
                i,
                "-" if not np.isfinite(v) else f"{v:.1f}",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if dark else "black",
            )
            if relation(year, ref.train_years) == "in_domain":
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    s = matrix.summary(metric)
    parts = "  ".join(f"{label} {_pct(s[p])}" for p, label in zip(SUMMARIES, ("ID", "BWT", "FWT", "mean")))
    ax.set_title(f"{title + ': ' if title else ''}{metric} (%)\n{parts}   (red: in-domain)", fontsize=10)
    return fig


def save_heatmaps(matrix: Matrix, out_dir: Path, metrics: list[str] | None = None) -> list[Path]:
    """heatmap_<metric>.png for each of `metrics` that was measured (default: HEATMAPS) into `out_dir`."""
    paths = []
    measured = matrix.metrics()
    for metric in [m for m in (metrics or HEATMAPS) if m in measured]:
        path = Path(out_dir) / f"heatmap_{metric}.png"
        heatmap(matrix, metric, matrix.info.get("run", "")).savefig(path, dpi=110)
        paths.append(path)
    return paths


def compare_figure(matrices: dict[str, Matrix], metric: str) -> Figure:
    """One line per run: in-domain, backward and forward per checkpoint, and the last checkpoint per eval year."""
    names = list(dict.fromkeys(c.name for m in matrices.values() for c in m.checkpoints))
    years = sorted({y for m in matrices.values() for y in m.years})
    fig = Figure(figsize=(16, 4.2), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    for run, m in matrices.items():
        rows = m.summary(metric)["checkpoints"]
        for ax, part in zip(axes, SUMMARIES[:3]):
            ys = [_value(rows.get(n, {}).get(part)) for n in names]
            ax.plot(range(len(names)), ys, marker="o", label=run)
        last = m.checkpoints[-1].name
        axes[3].plot(range(len(years)), [100 * m.value(last, y, metric) for y in years], marker="o", label=run)
    for ax, part in zip(axes, SUMMARIES[:3]):
        ax.set_title(_TITLES[part])
        ax.set_xticks(range(len(names)), labels=names)
        ax.set_xlabel("checkpoint (trained through)")
    axes[3].set_title("last checkpoint, per eval year")
    axes[3].set_xticks(range(len(years)), labels=years, rotation=45 if len(years) > 8 else 0)
    axes[3].set_xlabel("eval year")
    axes[0].set_ylabel(f"{metric} (%)")
    axes[0].legend()
    fig.suptitle(f"{metric} (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _value(v: float | None) -> float:
    return math.nan if v is None else 100 * v


def save_compare(matrices: dict[str, Matrix], out_dir: Path, metrics: list[str]) -> list[Path]:
    """compare_<metric>.png for each metric into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in metrics:
        path = out_dir / f"compare_{metric}.png"
        compare_figure(matrices, metric).savefig(path, dpi=110)
        paths.append(path)
    return paths


def compare_table(matrices: dict[str, Matrix], metric: str) -> str:
    """Runs x (ID, BWT, FWT, mean) of one metric, in %."""
    width = max([3, *(len(r) for r in matrices)])
    lines = [f"{metric} (%)", f"{'run':<{width}}     ID    BWT    FWT   mean"]
    for run, m in matrices.items():
        s = m.summary(metric)
        lines.append(f"{run:<{width}} " + " ".join(f"{_pct(s[p]):>6}" for p in SUMMARIES))
    return "\n".join(lines)
