"""FLOPs per sample of a CLIP model, counted by torch on a real forward pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def forward_flops(model: nn.Module) -> int:
    """Forward FLOPs for one image-text pair.

    Run under SDPA's math kernel: torch's counter has no formula for the fused CPU kernel (it
    counts 0 for attention there) and sees nothing inside xformers.
    """
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, *size, device=device)
    text = torch.zeros(1, model.context_length, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(image, text)
    model.train(was_training)
    return counter.get_total_flops()


def train_flops(model: nn.Module) -> int:
    """FLOPs to train on one pair: forward + backward (twice the forward)."""
    return 3 * forward_flops(model)
