"""Which checkpoints to evaluate and where their weights come from: a run's yearly checkpoints or .pt files."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import COMPLETE, is_complete
from trainer.eval.evaluator import Evaluator
from trainer.eval.matrix import CheckpointRef, Matrix
from trainer.eval.metrics import HEADLINE
from trainer.rundir import CheckpointError, RunDir, year_tag
from trainer.weights.consolidate import load_weights
from trainer.weights.open_clip import read_open_clip_checkpoint

log = logging.getLogger("tic")

_YEAR_IN_NAME = re.compile(r"(?<!\d)(\d{4})(?!\d)")


def load_ref(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 open_clip state dict."""
    path = Path(ref.source)
    if ref.kind == "deepspeed":
        return load_weights(path.parent, path.name)
    return read_open_clip_checkpoint(path)


def stamp(ref: CheckpointRef) -> float:
    """Modification time of what defines the weights (changes when a checkpoint is rewritten)."""
    path = Path(ref.source)
    return (path / COMPLETE if ref.kind == "deepspeed" else path).stat().st_mtime


def run_checkpoints(run_dir: Path) -> list[CheckpointRef]:
    """The complete yearly checkpoints of a run, in plan order, with each step's years."""
    run = RunDir(Path(run_dir))
    ckpt_dir, plan_file = run.checkpoints, run.plan_file
    if plan_file.is_file():
        try:
            plan = json.loads(plan_file.read_text())
            steps = [(s["tag"], tuple(s.get("new_years") or [s["tag"]])) for s in plan["steps"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{plan_file}: not a readable plan ({e})") from None
    else:
        steps = [(t, (t,)) for t in run.year_tags()]
    refs = []
    for tag, years in steps:
        folder = run.tag_dir(year_tag(tag))
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


def build_matrix(refs: list[CheckpointRef], evaluator: Evaluator, info: dict[str, Any] | None = None) -> Matrix:
    """Evaluate every checkpoint on every eval year of `evaluator` (collective: all ranks call it)."""
    results = {}
    for ref in refs:
        t0 = time.perf_counter()
        results[ref.name] = evaluator.evaluate(load_ref(ref), name=ref.source)
        head = ", ".join(f"{y} {100 * r[HEADLINE]:.1f}" for y, r in results[ref.name].items() if HEADLINE in r)
        log.info("%s: %s %% [%s] (%.1fs)", ref.name, HEADLINE, head, time.perf_counter() - t0)
    return Matrix(list(refs), list(evaluator.years), results, dict(info or {}))


def fingerprint(refs: list[CheckpointRef], data_root: str, years: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """What the results depend on; equal fingerprints mean a saved matrix is still current."""
    return {
        "data": data_root,
        "eval_years": list(years),
        "options": options,
        "checkpoints": [[r.name, r.source, stamp(r)] for r in refs],
    }
