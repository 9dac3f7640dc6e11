"""open_clip-format weights out (.pt or local-dir) and in (TiC-CLIP / open_clip .pt files), checked against a model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Config
from trainer.files import atomic_write
from trainer.model import ModelError, model_config
from trainer.rundir import CheckpointError, RunDir
from trainer.weights.consolidate import load_weights

LOCAL_DIR_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
"""What open_clip's `local-dir:` loader reads, and all an export folder holds."""


def run_weights(run: RunDir, tag: str, cfg: Config) -> dict[str, torch.Tensor]:
    """fp32 weights of `tag` with the logit scale capped as training used it."""
    ckpt_dir = run.checkpoints
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.glob("*") if p.is_dir()) if ckpt_dir.is_dir() else []
        raise CheckpointError(f"{ckpt_dir / tag}: no such checkpoint (have: {', '.join(have) or 'none'})")
    weights = load_weights(ckpt_dir, tag)
    # Training caps exp(logit_scale) in the loss, so the raw value may sit above the cap; open_clip
    # applies exp() unclamped, and exported logits must equal the ones we trained with.
    weights["logit_scale"] = weights["logit_scale"].clamp(max=math.log(cfg.train.max_logit_scale))
    return weights


def _epoch(run: RunDir, tag: str) -> int:
    """open_clip's 'epoch' field: the number of plan steps this checkpoint has completed."""
    state = run.train_state(tag)
    return int(state["plan_step"]) + (1 if state.get("year_complete") else 0)


def export_pt(run_dir: Path, tag: str, out: Path, overwrite: bool = False) -> Path:
    """{"state_dict", "epoch", "name"}: what `create_model_and_transforms(name, pretrained=out)` loads."""
    out = Path(out)
    # Checked before the weights are read: a wrong --out costs nothing and touches nothing.
    if out.is_dir() or (out.exists() and not overwrite):
        raise CheckpointError(f"--out: {out} exists" + ("" if out.is_dir() else "; pass --overwrite to replace it"))
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    payload = {"state_dict": run_weights(run, tag, cfg), "epoch": _epoch(run, tag), "name": cfg.logging.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: torch.save(payload, tmp))


def export_local_dir(
    run_dir: Path, tag: str, out: Path, preprocess_cfg: dict[str, Any], overwrite: bool = False
) -> Path:
    """open_clip_config.json + open_clip_model.safetensors, loadable as `local-dir:<out>`."""
    from safetensors.torch import save_file

    out = Path(out)
    # Checked before the weights are read: a wrong --out costs nothing and touches nothing. An
    # earlier export is replaced only when asked; anything else in the folder, never.
    held = {p.name for p in out.iterdir()} if out.is_dir() else None
    if out.exists() and (held is None or not held <= set(LOCAL_DIR_FILES)):
        raise CheckpointError(f"--out: {out} exists and is not an open_clip local-dir export; choose a new folder")
    if held and not overwrite:
        raise CheckpointError(f"--out: {out} holds an earlier export; pass --overwrite to replace it")
    run = RunDir(Path(run_dir))
    cfg = run.load_config()
    weights = run_weights(run, tag, cfg)
    model_cfg = dict(model_config(cfg.model.name))
    if cfg.model.force_quick_gelu:
        model_cfg["quick_gelu"] = True

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / LOCAL_DIR_FILES[0]).write_text(
            json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=1)
        )
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / LOCAL_DIR_FILES[1]))

    return atomic_write(out, write)


def load_hint(cfg: Config, out: Path, fmt: str) -> str:
    """How plain open_clip loads an export; for a .pt, whether it needs QuickGELU (weights cannot say)."""
    if fmt == "local-dir":
        return f"open_clip: create_model_and_transforms('local-dir:{out}')"  # its config records the activation
    name = cfg.model.name
    register = ""
    if name.endswith(".json"):
        register, name = f"open_clip.add_model_config('{name}'), then ", Path(name).stem
    flag = ", force_quick_gelu=True" if cfg.model.force_quick_gelu else ""
    quick = cfg.model.force_quick_gelu or bool(model_config(cfg.model.name).get("quick_gelu"))
    return f"open_clip: {register}create_model_and_transforms('{name}', pretrained='{out}'{flag})" + (
        "; the model uses QuickGELU" if quick else ""
    )


def read_open_clip_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a foreign open_clip / TiC-CLIP .pt (never unpickles arbitrary objects)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - pickle / zip errors differ by torch version; all mean "not loadable"
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
    wrong = sorted(k for k in set(own) & set(state) if not _same_shape(state[k].shape, own[k]))
    if missing or extra or wrong:
        shapes = [f"{k} ({tuple(state[k].shape)} here, {tuple(own[k])} in the model)" for k in wrong]
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", shapes))
            if keys
        )
        raise ModelError(f"{source}: does not fit model.name ({detail})")


def _same_shape(a: torch.Size, b: torch.Size) -> bool:
    """Equal shapes; a scalar stored 0-dim or as [1] (logit_scale in open_clip vs DeepSpeed) is one."""
    return a == b or (a.numel() == b.numel() == 1 and len(a) <= 1 and len(b) <= 1)
