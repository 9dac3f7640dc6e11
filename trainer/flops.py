"""FLOPs per sample of a CLIP model (counted by torch, and by formula) and the device's dense peak."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: Any, text_length: int | None = None) -> int:
    """Forward FLOPs for one image-text pair (text of `text_length` tokens, default the context).

    Run under SDPA's math kernel: torch's counter has no formula for the fused CPU kernel (it
    counts 0 for attention there) and sees nothing inside xformers. Gradients stay enabled so
    that vanilla nn.MultiheadAttention (attention "torch") cannot take its inference fast path,
    a fused op the counter does not see either.
    """
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, *size, device=device)
    text = torch.zeros(1, text_length or model.context_length, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(image, text)
    model.train(was_training)
    return counter.get_total_flops()


def train_flops(model: Any, text_length: int | None = None) -> int:
    """FLOPs to train on one pair: forward + backward (twice the forward)."""
    return 3 * forward_flops(model, text_length)


@dataclass(frozen=True)
class AnalyticFlops:
    """Forward FLOPs of one image-text pair by formula, split into dense matmuls and attention."""

    matmul: int
    """Patch embedding, every block's projections and MLP, and the two output projections."""
    attention: int
    """QK^T and attention x V of every block (full square, also for the causal text tower)."""

    @property
    def total(self) -> int:
        return self.matmul + self.attention


def _blocks(tower: nn.Module) -> list[ResidualAttentionBlock]:
    return [m for m in tower.modules() if isinstance(m, ResidualAttentionBlock)]


def _tower_flops(blocks: list[ResidualAttentionBlock], tokens: int) -> tuple[int, int]:
    """(matmul, attention) FLOPs of a stack of blocks over `tokens` tokens."""
    matmul = attention = 0
    for block in blocks:
        # Every weight of 2+ dims in a block is a projection applied to every token
        # (in_proj, out_proj, c_fc, c_proj), whatever the width, heads or MLP ratio.
        matmul += 2 * tokens * sum(p.numel() for p in block.parameters() if p.ndim >= 2)
        width = block.ln_1.normalized_shape[0]
        attention += 2 * (2 * tokens * tokens * width)  # scores and weighted values, all heads
    return matmul, attention


def _projection_numel(proj: Any) -> int:
    """Weights of a tower's projection: an nn.Linear, a parameter matrix, or none."""
    if proj is None:
        return 0
    return proj.weight.numel() if isinstance(proj, nn.Linear) else proj.numel()


def analytic_flops(model: Any, text_length: int | None = None) -> AnalyticFlops:
    """Forward FLOPs of an open_clip-native ViT CLIP from its shapes (what the counter should see).

    `text_length`: tokens the text tower runs over (trimmed batches, see text_trim); default the context.
    """
    visual = model.visual
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("analytic FLOPs cover class-token / average pooling, not attentional pooling")
    patches = visual.grid_size[0] * visual.grid_size[1]
    image_matmul, image_attention = _tower_flops(_blocks(visual.transformer), patches + 1)  # + class token
    text_matmul, text_attention = _tower_flops(_blocks(model.transformer), text_length or model.context_length)
    # The patch embedding is a matmul of every patch with the flattened conv kernel; each tower
    # projects one pooled vector to the embedding.
    matmul = (
        2 * patches * visual.conv1.weight.numel()
        + image_matmul
        + text_matmul
        + 2 * _projection_numel(visual.proj)
        + 2 * _projection_numel(model.text_projection)
    )
    return AnalyticFlops(matmul=matmul, attention=image_attention + text_attention)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul on `device`: the practical dense peak MFU is taken against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # first calls pick kernels and fault pages in
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
