"""Initial weights from outside the run: an open_clip / TiC-CLIP .pt, or another run's year."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config, ConfigError
from trainer.rundir import RunDir, year_tag
from trainer.weights.consolidate import load_weights
from trainer.weights.open_clip import check_fits, read_open_clip_checkpoint

log = logging.getLogger("tic")


def _split_run_year(source: str) -> tuple[RunDir, str] | None:
    """'runs/x:2016' -> (runs/x, 'year-2016'); None for a file path."""
    head, sep, year = source.rpartition(":")
    if sep and year and Path(head).is_dir():
        return RunDir(Path(head)), year_tag(year)
    return None


def check_supported_source(source: str) -> None:
    """Fail before training starts when --start-from names nothing loadable."""
    run = _split_run_year(source)
    if run is None and not Path(source).is_file():
        raise ConfigError(f"--start-from: {source} is neither a .pt file nor <run folder>:<year>")
    if run is not None and not run[0].tag_dir(run[1]).is_dir():
        raise ConfigError(f"--start-from: {run[0].path} has no checkpoint {run[1]}")


def weights_from(source: str, model: nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """State dict for `model` from `source`, checked key by key and shape by shape."""
    run = _split_run_year(source)
    if run is not None:
        state = load_weights(run[0].checkpoints, run[1])
    else:
        state = read_open_clip_checkpoint(Path(source))
        if not cfg.model.force_quick_gelu:
            # A state dict holds no activation: OpenAI and TiC-CLIP weights need QuickGELU.
            log.warning(
                "--start-from %s: GELU and QuickGELU cannot be told apart from weights; if these were "
                "trained with QuickGELU (OpenAI, TiC-CLIP), set model.force_quick_gelu=true",
                source,
            )
    check_fits(state, model, f"--start-from {source}")
    return state
