"""open_clip-format checkpoints out (.pt or local-dir) and in (TiC-CLIP / open_clip .pt files)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainer.checkpoint import CheckpointError
from trainer.config import Config, config_from_dict
from trainer.model import ModelError, model_config
from trainer.weights import load_weights


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def run_weights(run_dir: Path, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """fp32 weights of `tag` with the logit scale capped as training used it."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.glob("*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise CheckpointError(f"{ckpt_dir / tag}: no such checkpoint (have: {', '.join(have) or 'none'})")
    weights = load_weights(ckpt_dir, tag)
    # Training caps exp(logit_scale) in the loss, so the raw value may sit above the cap; open_clip
    # applies exp() unclamped, and exported logits must equal the ones we trained with.
    weights["logit_scale"] = weights["logit_scale"].clamp(max=math.log(cfg.train.max_logit_scale))
    return weights


def _epoch(run_dir: Path, tag: str) -> int:
    """open_clip's 'epoch' field: the number of plan steps this checkpoint has completed."""
    state = json.loads((Path(run_dir) / "checkpoints" / tag / "trainer_state.json").read_text())
    return int(state["plan_step"]) + (1 if state.get("year_complete") else 0)


def export_pt(run_dir: Path, tag: str, out: Path) -> Path:
    """{"state_dict", "epoch", "name"}: what `create_model_and_transforms(name, pretrained=out)` loads."""
    cfg = run_config(run_dir)
    payload = {"state_dict": run_weights(run_dir, tag, cfg), "epoch": _epoch(run_dir, tag), "name": cfg.logging.name}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def export_local_dir(run_dir: Path, tag: str, out: Path, preprocess_cfg: dict[str, Any]) -> Path:
    """open_clip_config.json + open_clip_model.safetensors, loadable as `local-dir:<out>`."""
    from safetensors.torch import save_file

    cfg = run_config(run_dir)
    weights = run_weights(run_dir, tag, cfg)
    model_cfg = dict(model_config(cfg.model.name))
    if cfg.model.force_quick_gelu:
        model_cfg["quick_gelu"] = True
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1)
    )
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "open_clip_model.safetensors"))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_open_clip_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a foreign open_clip / TiC-CLIP .pt (never unpickles arbitrary objects)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # pickle / zip errors differ by torch version; all mean "not loadable"
        raise CheckpointError(f"{path}: not a loadable open_clip checkpoint ({type(e).__name__})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors inside")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def check_fits(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Refuse weights whose keys or shapes differ from `model` (the `name` field is no guide)."""
    own = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if state[k].numel() != own[k].numel())
    if missing or extra or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", wrong))
            if keys
        )
        raise ModelError(f"{source}: does not fit model.name ({detail})")
