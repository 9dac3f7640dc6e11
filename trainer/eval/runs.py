"""What to evaluate (a run's yearly checkpoints or .pt files, which model, which data), then evaluate and write."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, ModelConfig
from trainer.distributed import DistInfo, barrier, broadcast_object
from trainer.eval.checkpoints import build_matrix, file_checkpoints, fingerprint, run_checkpoints
from trainer.eval.data import eval_years
from trainer.eval.evaluator import EvalOptions, Evaluator, options_dict
from trainer.eval.matrix import CheckpointRef, Matrix
from trainer.eval.report import read_matrix, write_matrix
from trainer.rundir import CheckpointError, RunDir

log = logging.getLogger("tic")


@dataclass(kw_only=True)
class EvalRequest:
    """One matrix to compute: from a run folder, from .pt files, or a run's settings with .pt files."""

    run: Path | None = None
    checkpoints: list[str] = field(default_factory=list)
    """open_clip .pt files, PATH or YEAR=PATH; empty = the run's yearly checkpoints."""
    model: str = ""
    """Model name or JSON config ('' = the run's)."""
    quick_gelu: bool = False
    data: str = ""
    """Dataset root ('' = the run's data.root)."""
    years: list[str] | None = None
    options: EvalOptions = field(default_factory=EvalOptions)
    out: Path | None = None
    """Output folder (None = <run>/eval, or eval/ next to the first .pt file)."""
    heatmaps: list[str] | None = None
    """Metrics to draw (None = plots.HEATMAPS)."""


@dataclass(frozen=True)
class Resolved:
    """An EvalRequest with everything it left out filled in."""

    model: ModelConfig
    data: str
    checkpoints: list[CheckpointRef]
    out: Path
    name: str


def resolve(req: EvalRequest) -> Resolved:
    """Fill what the request leaves out from the run folder; one-line errors for what is missing."""
    cfg = RunDir(req.run).load_config() if req.run is not None else None
    if req.quick_gelu and not req.model:
        raise ConfigError("--quick-gelu: goes with --model (a run's own model config already says)")
    if req.model:
        model = ModelConfig(name=req.model, force_quick_gelu=req.quick_gelu)
    elif cfg is not None:
        model = cfg.model
    else:
        raise ConfigError("--model: needed with --checkpoints when there is no --run to take it from")
    data = req.data or (cfg.data.root if cfg is not None else "")
    if not data:
        raise ConfigError("--data: needed when there is no --run (or the run's config has no data.root)")
    if req.checkpoints:
        refs = file_checkpoints(req.checkpoints)
    elif req.run is not None:
        refs = run_checkpoints(req.run)
    else:
        raise ConfigError("nothing to evaluate: give --run and/or --checkpoints")
    out = req.out or (Path(req.run) / "eval" if req.run is not None else Path(refs[0].source).parent / "eval")
    name = Path(req.run).name if req.run is not None else Path(refs[0].source).resolve().parent.name
    return Resolved(model, data, refs, Path(out), name)


def evaluate_request(req: EvalRequest, dist: DistInfo, reuse: bool = False) -> Matrix:
    """The matrix of `req`, written to its out folder by rank 0; with `reuse`, a current matrix.json is read instead."""
    r = resolve(req)
    years = list(eval_years(r.data, req.years))
    options = {k: v for k, v in options_dict(req.options).items() if k != "cache_mb"}  # no effect on results
    stamp = fingerprint(r.checkpoints, r.data, years, options)
    if reuse:
        # Rank 0 decides for all: other nodes may not see the same files, and all must evaluate or none.
        current = _current(r.out / "matrix.json", stamp) if dist.is_main else None
        current = broadcast_object(current)
        if current is not None:
            log.info("%s: results are current, not re-evaluated", r.out / "matrix.json")
            return Matrix.from_json(current)
    evaluator = Evaluator(r.model, r.data, years, req.options, dist)
    matrix = build_matrix(r.checkpoints, evaluator, {"run": r.name, "fingerprint": stamp})
    if dist.is_main:
        for path in write_matrix(matrix, r.out, req.heatmaps):
            log.debug("wrote %s", path)
        log.info("wrote %s (matrix.json, matrix.csv, heatmap_*.png)", r.out)
    barrier()
    return matrix


def _current(path: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    """The saved matrix as JSON if it was computed from exactly these inputs, else None."""
    if not path.is_file():
        return None
    try:
        matrix = read_matrix(path)
    except CheckpointError:
        return None
    return matrix.to_json() if matrix.info.get("fingerprint") == stamp else None
