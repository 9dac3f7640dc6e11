"""Per-GPU memory estimates: DeepSpeed model states plus an analytic activation model of open_clip ViT CLIP."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from trainer.config import Config, ModelConfig, contrastive_batch, contrastive_warning
from trainer.engine import resolve_precision
from trainer.model import ModelError, create_model, model_config

GIB = 2**30
ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STAT_BYTES = 4  # LayerNorm mean/rstd and attention log-sum-exp stay fp32 under bf16/fp16 too
INDEX_BYTES = 8  # token ids, pooling indices and loss labels are int64
LOSS_BYTES = 4  # the CLIP objective computes features and logits in fp32 under every precision
KERNELS = ("efficient", "math")


@dataclass(frozen=True)
class Tower:
    """The shape of one transformer tower, as far as saved activations care."""

    tokens: int
    width: int
    layers: int
    heads: int
    mlp: int
    quick_gelu: bool
    layer_scale: bool


@dataclass(frozen=True)
class StateRow:
    """Model-state memory of one ZeRO stage and offload setting."""

    stage: int
    offload: str
    gpu_bytes: int
    cpu_bytes: int


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def towers(cfg: dict, force_quick_gelu: bool = False) -> tuple[Tower, Tower]:
    """(vision, text) towers of an open_clip model config dict, with open_clip's defaults filled in."""
    v, t = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    if v.attentional_pool:
        raise ModelError("memory estimate: attentional pooling (vision_cfg.attentional_pool) is not modelled")
    quick = bool(cfg.get("quick_gelu", False) or force_quick_gelu)
    (ih, iw), (ph, pw) = _pair(v.image_size), _pair(v.patch_size)
    vision = Tower(
        (ih // ph) * (iw // pw) + 1,
        v.width,
        v.layers,
        v.width // v.head_width,
        int(v.width * v.mlp_ratio),
        quick,
        v.ls_init_value is not None,
    )
    text = Tower(
        t.context_length, t.width, t.layers, t.heads, int(t.width * t.mlp_ratio), quick, t.ls_init_value is not None
    )
    return vision, text


def block_bytes(tower: Tower, batch: int, act: int, checkpointing: bool, kernel: str = "efficient") -> int:
    """Bytes one residual block saves for backward."""
    n, w = tower.tokens, tower.width
    if checkpointing:  # torch.utils.checkpoint keeps only the block input and recomputes the rest
        return batch * n * w * act
    # ln_1 in/out, attention in/out, ln_2 in/out: 8w; the MLP keeps fc1 out + act out (QuickGELU's
    # sigmoid adds one more); LayerScale keeps its input twice; two LayerNorms keep mean+rstd.
    elems = n * (8 * w + (3 if tower.quick_gelu else 2) * tower.mlp + (2 * w if tower.layer_scale else 0))
    stats = 4 * n
    if kernel == "math":  # plain softmax(QK^T)V keeps the S x S probabilities, no log-sum-exp
        elems += tower.heads * n * n
    elif kernel == "efficient":  # flash / memory-efficient / xformers / CPU flash: q,k,v,out + lse only
        stats += tower.heads * n
    else:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    return batch * (elems * act + stats * STAT_BYTES)


def activation_bytes(
    cfg: dict,
    batch: int,
    precision: str,
    checkpointing: bool,
    kernel: str = "efficient",
    logits: tuple[int, int] | None = None,
    force_quick_gelu: bool = False,
) -> int:
    """Bytes autograd saves for backward in one forward of model + contrastive loss on `batch` pairs."""
    act = ACT_BYTES[precision]
    vision, text = towers(cfg, force_quick_gelu)
    v, t = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    embed = int(cfg["embed_dim"])
    total = 0
    for tower in (vision, text):
        total += tower.layers * block_bytes(tower, batch, act, checkpointing, kernel)
        total += batch * (embed + 2) * act  # F.normalize keeps its input and the norm twice
    # Vision: the conv keeps the image; ln_pre its input; then ln_post and the pooled token.
    n, w = vision.tokens, vision.width
    ih, iw = _pair(v.image_size)
    elems, stats = 3 * ih * iw, 0
    if not v.no_ln_pre:
        elems, stats = elems + n * w, stats + 2 * n
    tok = v.pool_type == "tok"
    if v.final_ln_after_pool:  # a token view keeps the whole last-block output alive
        elems, stats = elems + (n * w if tok else w) + w, stats + 2
    else:
        elems, stats = elems + n * w + (n * w if tok else w), stats + 2 * n
    total += batch * (elems * act + stats * STAT_BYTES)
    # Text: embedding keeps the ids, ln_final its input; first/last pooling views the whole output.
    n, w = text.tokens, text.width
    pooled = n * w if t.pool_type in ("first", "last") else w
    index = n + (2 if t.pool_type in ("argmax", "eos") else 0)
    total += batch * ((n * w + pooled) * act + 2 * n * STAT_BYTES + index * INDEX_BYTES)
    # Loss: features and scaled features of the rows, gathered columns, two log-softmax outputs.
    rows, cols = logits or (batch, batch)
    features = 4 * rows * embed + (2 * cols * embed if rows != cols else 0)
    total += (features + 2 * rows * cols) * LOSS_BYTES + rows * INDEX_BYTES
    return total


def loss_shape(micro: int, world: int, cfg: Config) -> tuple[int, int]:
    """(rows, cols) of each rank's logits: local loss scores its own rows against every column."""
    if cfg.train.accumulation == "features":  # negatives span the whole global batch
        cols = max(cfg.train.global_batch, micro * world)
    else:
        cols = micro * world
    return (cols // world if cfg.train.local_loss else cols), cols


def measure_saved_bytes(
    model: Any,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    checkpointing: bool,
) -> int:
    """Unique non-parameter storage bytes autograd saves in one forward of `model` + `loss_fn`."""
    model.set_grad_checkpointing(checkpointing)
    # Parameters and buffers are model states (DeepSpeed's estimate), not activations.
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A saved view keeps its whole storage alive, so the storage is what costs memory. Only the
        # innermost hooks run: inside a checkpointed block torch.utils.checkpoint's own hooks take
        # over, and what reaches us is what checkpointing keeps (the block inputs).
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(image=images, text=texts)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = loss_fn(*out[:3])
    del loss, out
    return sum(saved.values())


@functools.cache
def param_counts(name: str) -> tuple[int, int]:
    """(total, largest layer) parameters of a model, counted by DeepSpeed on the model the trainer builds."""
    return _deepspeed()[2](create_model(ModelConfig(name=name, attention="sdpa"))[0])


def _deepspeed() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """DeepSpeed's zero2 and zero3 model-state estimators and its parameter counter."""
    # DeepSpeed's logger writes to the stdout of its import; keep ours clean for tables and JSON.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs, model_to_params


def state_rows(total: int, largest: int, gpus_per_node: int, nodes: int) -> list[StateRow]:
    """GPU and CPU (per node) bytes of params, grads and Adam states per ZeRO stage and offload."""
    zero2, zero3, _ = _deepspeed()
    world = gpus_per_node * nodes
    cpu, gpu = zero2(total, gpus_per_node, nodes, cpu_offload=False)
    off_cpu, off_gpu = zero2(total, gpus_per_node, nodes, cpu_offload=True)
    # DeepSpeed has no stage-0/1 estimator. Stage 0 partitions nothing: the ZeRO-2 estimator on one
    # GPU (2 bytes of 16-bit params + 18 of grads, fp32 master and Adam per param). ZeRO-1 shares
    # DeepSpeed's stage_1_and_2 optimizer but keeps the 16-bit grads whole: ZeRO-2 plus the grads'
    # unpartitioned share (all 2 bytes per param when offloaded: ZeRO-2-offload keeps none on GPU).
    rows = [
        StateRow(0, "none", zero2(total, 1, 1, cpu_offload=False)[1], cpu),
        StateRow(1, "none", gpu + 2 * total - 2 * total // world, cpu),
        StateRow(1, "cpu optimizer", off_gpu + 2 * total, off_cpu),
        StateRow(2, "none", gpu, cpu),
        StateRow(2, "cpu optimizer", off_gpu, off_cpu),
    ]
    # zero_init=False: the trainer builds the model whole, then hands it to deepspeed.initialize.
    for offload, opt, param in (
        ("none", False, False),
        ("cpu optimizer", True, False),
        ("cpu optimizer+param", True, True),
    ):
        z3 = zero3(total, largest, gpus_per_node, nodes, cpu_offload=opt, cpu_offload_params=param, zero_init=False)
        rows.append(StateRow(3, offload, z3[1], z3[0]))
    return rows


def max_micro_batch(fits: Callable[[int], bool], limit: int = 1 << 20) -> int:
    """The largest micro-batch b <= limit with fits(b); fits must be monotone (0 when none fits)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi) (or hi beyond the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_report(cfg: Config, gpus_per_node: int, nodes: int, gpu_mem_gib: float) -> dict[str, Any]:
    """Per-GPU memory of every ZeRO stage/offload for `cfg` on a cluster, and the largest micro-batch that fits."""
    world = gpus_per_node * nodes
    precision = resolve_precision(cfg.model.precision, torch.device("cuda"))  # a GPU-cluster report
    mcfg = model_config(cfg.model.name)
    total, largest = param_counts(cfg.model.name)
    quick = cfg.model.force_quick_gelu
    vision, text = towers(mcfg, quick)
    act = ACT_BYTES[precision]

    def activations(b: int, ckpt: bool) -> int:
        return activation_bytes(mcfg, b, precision, ckpt, "efficient", loss_shape(b, world, cfg), quick)

    def working_set(b: int) -> int:
        # Backward holds one block's activations on top: the recomputed block under checkpointing,
        # the activation gradients of the block being differentiated without.
        return max(block_bytes(tw, b, act, False) for tw in (vision, text))

    cap = gpu_mem_gib * GIB
    micro = cfg.train.micro_batch
    rows = []
    for r in state_rows(total, largest, gpus_per_node, nodes):
        row: dict[str, Any] = {
            "stage": r.stage,
            "offload": r.offload,
            "states_gpu": r.gpu_bytes,
            "states_cpu_node": r.cpu_bytes,
        }
        for ckpt, key in ((False, "off"), (True, "on")):
            row[f"total_ckpt_{key}"] = r.gpu_bytes + activations(micro, ckpt) + working_set(micro)

            def fits(b: int, states: int = r.gpu_bytes, ckpt: bool = ckpt) -> bool:
                return states + activations(b, ckpt) + working_set(b) <= cap

            row[f"max_micro_ckpt_{key}"] = max_micro_batch(fits)
        rows.append(row)
    ds, per_step = cfg.deepspeed, micro * world
    offload = (
        "cpu optimizer+param"
        if ds.offload_param != "none"
        else ("cpu optimizer" if ds.offload_optimizer != "none" else "none")
    )  # nvme is offloaded too
    return {
        "model": cfg.model.name,
        "params": total,
        "largest_layer_params": largest,
        "precision": precision,
        "micro_batch": micro,
        "gpus_per_node": gpus_per_node,
        "nodes": nodes,
        "world": world,
        "global_batch": cfg.train.global_batch,
        # None: the trainer refuses this cluster size (global batch not a multiple of micro x world).
        "accumulation": cfg.train.global_batch // per_step if cfg.train.global_batch % per_step == 0 else None,
        "accumulation_mode": cfg.train.accumulation,
        "contrastive_batch": contrastive_batch(cfg, world),
        "contrastive_warning": contrastive_warning(cfg, world),
        "gpu_mem_gib": gpu_mem_gib,
        "zero_stage": ds.zero_stage,
        "config_offload": offload,
        "activations_ckpt_off": activations(micro, False),
        "activations_ckpt_on": activations(micro, True),
        "working_set": working_set(micro),
        "rows": rows,
    }
