"""Copies of the model a method keeps beside the one being trained: frozen teachers, full weights.

A teacher is a plain module on every rank, never wrapped by DeepSpeed and never partitioned, so
under ZeRO-3 its forward needs no gather of the student's partitions; it sits in bf16 on CUDA
and in fp32 on the CPU (bf16 matmuls on the CPU are ~30x slower there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.model import create_model


def teacher_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The precision a frozen copy sits in: `auto` = bf16 on CUDA, fp32 elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def frozen_copy(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Any:
    """A model built from `cfg` holding `weights`, in eval mode, without gradients, in `dtype`."""
    model = create_model(cfg, device)[0]
    model.load_state_dict(dict(weights))
    model.output_dict = True
    model.to(dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def previous_model(cfg: ModelConfig, ctx: Any, device: torch.device, precision: str) -> Any:
    """A frozen copy of the weights the previous plan step handed on, or None in the first step."""
    if ctx.previous is None:
        return None
    return frozen_copy(cfg, ctx.previous(), device, teacher_dtype(device, precision))


def is_partitioned(module: nn.Module) -> bool:
    """True when `module`'s parameters are ZeRO-3 partitions outside forward."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@torch.no_grad()
def whole_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters whole, as fp32 copies on their device; ZeRO-3 partitions are gathered
    one parameter at a time (a collective there: every rank must call it)."""
    if not is_partitioned(module):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().float().clone()
    return out


@torch.no_grad()
def full_weights(module: nn.Module, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`module`'s state dict as fp32 CPU tensors in open_clip's shapes, its parameters taken from
    `params` (whole, by name) or else gathered by `whole_params` (a collective under ZeRO-3)."""
    params = whole_params(module) if params is None else params
    out = {}
    # Buffers are never partitioned; state_dict's keys come from the module.
    for key, value in module.state_dict().items():
        v = params.get(key, value).detach().cpu().clone()
        out[key] = v.float() if v.is_floating_point() else v
    if "logit_scale" in out:
        out["logit_scale"] = out["logit_scale"].reshape(())  # open_clip's 0-dim shape
    return out
