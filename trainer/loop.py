"""The optimisation loop of one plan step: micro-batches, accumulation, logging, stop points."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from trainer.loss import ContrastiveLoss


@dataclass
class StepState:
    """Where a plan step stands; saved in every checkpoint's client_state."""

    plan_step: int
    opt_step: int = 0
    """Optimizer steps done in this plan step."""
    global_step: int = 0
    """Optimizer steps done in the whole run (never reused, names mid-year tags)."""
    bad: dict[str, int] = field(default_factory=dict)
    """Corrupt samples this rank skipped so far in this plan step, by reason."""


def _features(engine: Any, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    image = batch["image"].to(device, non_blocking=True)
    text = batch["text"].to(device, non_blocking=True)
    return engine(image=image, text=text)


def accumulate_gradients(
    engine: Any, batches: list[dict[str, Any]], loss_fn: ContrastiveLoss, device: torch.device
) -> float:
    """DeepSpeed accumulation: each micro-batch is its own contrastive problem; gradients averaged."""
    total = 0.0
    for batch in batches:
        out = _features(engine, batch, device)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        engine.backward(loss)
        engine.step()
        total += loss.item()
    return total / len(batches)


def accumulate_features(
    engine: Any, batches: list[dict[str, Any]], loss_fn: ContrastiveLoss, device: torch.device
) -> float:
    """open_clip's feature cache: negatives span all micro-batches of the optimizer step.

    A no-grad pass caches every micro-batch's features; then each micro-batch is re-encoded with
    gradients and the full-batch loss is backpropagated through its rows only. The per-pass
    gradients sum to the gradient of the full-batch loss, so they are not divided by the
    accumulation count.
    """
    with torch.no_grad():
        cached = [_features(engine, b, device) for b in batches]
    loss = None
    for j, batch in enumerate(batches):
        out = _features(engine, batch, device)
        images = [out["image_features"] if i == j else c["image_features"] for i, c in enumerate(cached)]
        texts = [out["text_features"] if i == j else c["text_features"] for i, c in enumerate(cached)]
        loss = loss_fn(torch.cat(images), torch.cat(texts), out["logit_scale"])
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    return loss.item()


def optimizer_steps(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    loss_fn: ContrastiveLoss,
    accum_steps: int,
    mode: str,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """Run optimizer steps forever (until `batches` ends), yielding one record per step."""
    accumulate: Callable[..., float] = accumulate_features if mode == "features" else accumulate_gradients
    while True:
        t0 = time.perf_counter()
        micro: list[dict[str, Any]] = []
        for _ in range(accum_steps):
            batch = next(batches, None)
            if batch is None:
                return
            micro.append(batch)
        t1 = time.perf_counter()
        loss = accumulate(engine, micro, loss_fn, device)
        t2 = time.perf_counter()
        yield {
            "loss": loss,
            "data_wait": t1 - t0,
            "compute": t2 - t1,
            "batches": micro,
        }
