"""Text batches cut after their last end-of-text token, and a text tower that accepts them.

open_clip pads every caption to the context length (32 or 77) and runs the text tower over all of
it, yet an EOT-pooled causal tower reads its output at the EOT token (the largest id, found by
argmax) and no position sees the ones after it. So the positions after a batch's last EOT change
neither the features nor any gradient: cutting them is exact, and saves their share of the text
tower (on the 64 px benchmark, captions of at most 12 of 32 tokens: ~18% of the step).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from trainer.attention import FusedAttention, is_causal_mask


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` [B, L] up to and including the batch's last argmax (EOT) position."""
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


class TrimmedTokenizer:
    """An open_clip tokenizer whose batches stop after their last EOT token; all else is the tokenizer's."""

    def __init__(self, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return trim_tokens(self.tokenizer(texts, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def _encode_text(self: open_clip.CLIP, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text for any text length up to the context: embeddings and mask cut to it."""
    length = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
    mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
    x = self.ln_final(self.transformer(x, attn_mask=mask))
    x = text_global_pool(x, text, self.text_pool_type)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def allow_short_text(model: Any) -> bool:
    """Make `model` accept trimmed text batches when that is exact; True if it does now.

    Exact needs open_clip's own CLIP text tower (CustomTextCLIP towers build their own masks),
    argmax (EOT) pooling and causal attention in every text block: either the fused blocks made
    causal by swap_attention or open_clip's dense causal mask, cut to the length with the rest.
    """
    if type(model).encode_text is not open_clip.CLIP.encode_text or model.text_pool_type != "argmax":
        return False
    attns = [m for m in model.transformer.modules() if isinstance(m, (FusedAttention, nn.MultiheadAttention))]
    if model.attn_mask is None:
        causal = bool(attns) and all(isinstance(a, FusedAttention) and a.causal for a in attns)
    else:
        causal = is_causal_mask(model.attn_mask)
    if not causal:
        return False
    model.encode_text = types.MethodType(_encode_text, model)
    return True
