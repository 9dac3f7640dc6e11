"""DeepSpeed engine: config built from ours, open_clip_train's weight-decay groups, warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import DistInfo


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto = bf16 on CUDA, fp32 elsewhere (bf16 autocast on CPU is ~30x slower here)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(cfg: Config, world_size: int, accum_steps: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict; train_batch_size = micro x world x accumulation, asserted here."""
    ds, o = cfg.deepspeed, cfg.optim
    assert cfg.train.micro_batch * world_size * accum_steps == cfg.train.global_batch
    offload = ds.offload_optimizer != "none"
    optimizer_params: dict[str, Any] = {
        "lr": o.lr,
        "betas": list(o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
    }
    if device.type != "cuda" and not offload:
        # torch's fused CPU AdamW: one pass over the weights instead of the ~10 of its CPU default,
        # the single-tensor loop (foreach has no CPU kernels); ~10x faster on the 64 px benchmark
        # model and no JIT build of DeepSpeed's op. The same fp32 update; only float rounding
        # order differs (test_engine bounds the difference).
        optimizer_params["torch_adam"] = True
        optimizer_params["fused"] = True
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {
            "device": ds.offload_optimizer,
            "pin_memory": device.type == "cuda",
            **({"nvme_path": ds.nvme_path} if ds.offload_optimizer == "nvme" else {}),
        }
    if ds.offload_param != "none":
        zero["offload_param"] = {
            "device": ds.offload_param,
            "pin_memory": device.type == "cuda",
            **({"nvme_path": ds.nvme_path} if ds.offload_param == "nvme" else {}),
        }
    precision = resolve_precision(cfg.model.precision, device)
    config: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # Always written: DeepSpeed clips at 1.0 when the key is absent, but optim.grad_clip=0 means off.
    config["gradient_clipping"] = o.grad_clip
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip_train's rule: no decay for ndim < 2, norms, biases and logit_scale."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights and everything else (gains, biases, logit_scale)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak LR after `step` optimizer steps: linear warmup, then cosine or const."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "const" or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(cfg: Config, total_steps: int, warmup: int) -> Callable[[Any], Any]:
    """A callable DeepSpeed gives its optimizer to; DeepSpeed steps and checkpoints the result."""
    min_ratio = cfg.optim.min_lr / cfg.optim.lr

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.optim.schedule, min_ratio)
        )

    return make


def build_engine(
    model: nn.Module,
    cfg: Config,
    dist: DistInfo,
    accum_steps: int,
    total_steps: int,
    warmup: int,
    load_universal: bool = False,
) -> Any:
    """Wrap `model` in a DeepSpeed engine with a fresh optimizer and LR schedule.

    `load_universal`: the engine will load a universal checkpoint (one written on another
    number of ranks, see checkpoint.to_universal).
    """
    import deepspeed

    config = deepspeed_config(cfg, dist.world_size, accum_steps, dist.device)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=config,
        lr_scheduler=scheduler_factory(cfg, total_steps, warmup),
        dist_init_required=False,
    )
    return engine


def logit_scale_bound(max_scale: float, dtype: torch.dtype) -> float:
    """The cap on the log-space parameter: ln(max_scale), rounded up to a value `dtype` holds.

    In bf16, ln(100) lies between 4.594 and 4.625 (scales 98.86 and 102.0): rounding up lets the
    scale reach the cap, and the loss (objectives/clip.py) takes min(scale, max_scale) from there.
    """
    exact = math.log(max_scale)
    held = torch.tensor(exact).to(dtype)
    if held.double() < exact:
        held = torch.nextafter(held, torch.tensor(math.inf, dtype=dtype))
    return float(held)


@torch.no_grad()
def clamp_logit_scale(engine: Any, max_scale: float) -> None:
    """open_clip_train's clamp of logit_scale to [0, ln(max_scale)] after an optimizer step, on every copy.

    Under ZeRO 1-3 and DeepSpeed's bf16 optimizer the parameter that steps is an fp32 master copy
    held by the optimizer, written back over the module's after each step, so it is the one
    clamped (every rank calls this: reading a full ZeRO 1-2 parameter is a collective). Under
    ZeRO-3 each rank clamps its own slice, master and module copy: the clamp is elementwise, and
    DeepSpeed's full-parameter setter fails on a rank whose slice of a 1-element parameter is empty.
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    param = getattr(engine.module, "logit_scale", None)
    if not isinstance(param, nn.Parameter):
        return
    if hasattr(param, "ds_id"):
        own: torch.Tensor = param.ds_tensor  # type: ignore[attr-defined]
        high = logit_scale_bound(max_scale, own.dtype)
        local = safe_get_local_fp32_param(param)
        if local is not None and local.numel():
            safe_set_local_fp32_param(param, local.clamp(0.0, high))
        own.clamp_(0.0, high)
        return
    high = logit_scale_bound(max_scale, param.dtype)
    master = safe_get_full_fp32_param(param)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(0.0, high))
    param.data.clamp_(0.0, high)
