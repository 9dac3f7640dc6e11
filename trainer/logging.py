"""Rank-0 console and tqdm, metrics.jsonl for every run, wandb when enabled (offline by default)."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.config import Config
from trainer.rundir import METRICS

log = logging.getLogger("tic")


def setup_console(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, one short format for the whole run."""
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("tic")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # open_clip warns on the root logger for every model built without pretrained weights, which
    # is every model here: weights come from our checkpoints.
    logging.getLogger().addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # open_clip's loss and DeepSpeed call collectives torch has renamed; users can do nothing about it.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed.* is deprecated", category=FutureWarning)


class MetricsLog:
    """Appends one JSON object per line to <run>/metrics.jsonl (rank 0) and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: Config, is_main: bool) -> None:
        self.is_main = is_main
        self.path = run_dir / METRICS
        self.file = open(self.path, "a", buffering=1) if is_main else None
        self.wandb: Any = None
        if is_main and cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.logging.name,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=cfg.to_dict(),
                resume="allow",
                id=f"{cfg.logging.name}-{cfg.digest()}",
            )

    def write(self, record: dict[str, Any], kind: str = "train") -> None:
        if not self.is_main:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **record}
        assert self.file is not None, "metrics written after close()"
        self.file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        if self.wandb is not None:
            step = record.get("global_step")
            numbers = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm | None:
    """A tqdm bar over optimizer steps on rank 0 (None elsewhere or when disabled)."""
    if not enabled:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
