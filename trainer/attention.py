"""Fused multi-head attention (PyTorch SDPA or xformers) in nn.MultiheadAttention's place."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "xformers")

# xformers reads attention-bias rows at 8-element aligned offsets (fp16/bf16; fp32 needs 4).
_BIAS_ALIGN = 8


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any, p: float) -> torch.Tensor:
    """xformers' kernel on [B, L, H, D] tensors: FusedAttention's only call, so CPU tests can stand in for it."""
    import xformers.ops

    return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=p)


@functools.cache
def xformers_problem(device: str) -> str:
    """Why xformers cannot train on `device`, or "" when it can (probed once per device)."""
    try:
        import xformers.ops
    except ImportError:
        return "xformers is not installed (pip install xformers)"
    # A wheel built for another torch imports fine yet may have no kernel for this build: find
    # out here rather than at the first training step. Every xformers CUDA kernel takes fp16.
    q = torch.zeros(1, 8, 1, 32, device=device, dtype=torch.float16, requires_grad=True)
    try:
        out = xformers.ops.memory_efficient_attention(q, q, q, attn_bias=xformers.ops.LowerTriangularMask())
        out.sum().backward()
    except RuntimeError as e:  # xformers raises a RuntimeError subclass when no operator fits
        reason = str(e).splitlines()[0].rstrip(":") if str(e) else type(e).__name__
        return f"xformers has no working kernel on {device} ({reason}); reinstall it for torch {torch.__version__}"
    return ""


def _xformers_causal() -> Any:
    """xformers' lazily-applied causal bias (never materialised on the GPU)."""
    from xformers.ops import LowerTriangularMask

    return LowerTriangularMask()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's mask convention (bool True = blocked, float = added) as a float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True when `mask` is exactly open_clip's causal mask: -inf above the diagonal, 0 elsewhere."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1] or not mask.is_floating_point():
        return False
    n = mask.shape[0]
    expected = torch.full((n, n), float("-inf"), dtype=mask.dtype, device=mask.device).triu_(1)
    return torch.equal(mask, expected)


class FusedAttention(nn.Module):
    """Batch-first attention holding nn.MultiheadAttention's own parameters (same state_dict keys)."""

    def __init__(self, mha: nn.MultiheadAttention, backend: str, causal: bool = False) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if not mha.batch_first or mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only batch-first nn.MultiheadAttention with a packed in_proj can be fused")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.backend = backend
        # Causal applies when no mask is passed; a passed mask is applied exactly as
        # nn.MultiheadAttention would, so callers that build their own masks keep their meaning.
        self.causal = causal
        self.calls = 0  # lets tests prove the fused path ran
        # Adopt the very Parameters: no copy, and anything already holding them stays valid.
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def extra_repr(self) -> str:
        return f"{self.embed_dim}, heads={self.num_heads}, backend={self.backend}, causal={self.causal}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Attention over [B, L, E]; returns (output, None) like nn.MultiheadAttention(need_weights=False)."""
        if need_weights:
            raise ValueError("fused attention does not compute attention weights")
        self.calls += 1
        batch, length, _ = query.shape
        if key is query and value is query:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:  # ZeRO-3 hands every module input over as a tensor of its own, even for self-attention
            weights = self.in_proj_weight.chunk(3)
            biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v))  # [B, L, H, D]
        p = self.dropout if self.training else 0.0
        if self.backend == "xformers":
            out = _xformers_attention(q, k, v, self._xformers_bias(attn_mask, q), p)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=self._sdpa_mask(attn_mask, batch, q.dtype),
                dropout_p=p,
                is_causal=self.causal and attn_mask is None,
            ).transpose(1, 2)
        return self.out_proj(out.reshape(batch, length, self.embed_dim)), None

    def _sdpa_mask(self, mask: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """An explicit mask as SDPA wants it: additive, [L, S] or [B, H, L, S]."""
        if mask is None:
            return None
        mask = additive_mask(mask, dtype)
        if mask.ndim == 3:  # nn.MultiheadAttention's [B*H, L, S]
            mask = mask.view(batch, self.num_heads, *mask.shape[1:])
        return mask

    def _xformers_bias(self, mask: torch.Tensor | None, q: torch.Tensor) -> Any:
        """An explicit mask as xformers wants it: a dense [B, H, L, S] bias with aligned rows."""
        if mask is None:
            return _xformers_causal() if self.causal else None
        batch, length, heads, _ = q.shape
        mask = additive_mask(mask, q.dtype)
        if mask.ndim == 3:
            mask = mask.view(batch, heads, *mask.shape[1:])
        keys = mask.shape[-1]
        padded = -(-keys // _BIAS_ALIGN) * _BIAS_ALIGN
        # Slicing a wider buffer is xformers' documented way to get aligned rows for any length.
        bias = torch.empty(batch, heads, length, padded, dtype=q.dtype, device=q.device)[..., :keys]
        return bias.copy_(mask)
