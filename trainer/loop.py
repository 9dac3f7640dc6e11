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


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images and tokens on `device`; copies of pinned tensors overlap with compute."""
    return batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True)


def _features(engine: Any, inputs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    image, text = inputs
    return engine(image=image, text=text)


def accumulate_gradients(
    engine: Any, batches: list[dict[str, Any]], loss_fn: ContrastiveLoss, device: torch.device
) -> float:
    """DeepSpeed accumulation: each micro-batch is its own contrastive problem; gradients averaged."""
    losses = []
    for batch in batches:
        out = _features(engine, _to_device(batch, device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    # One wait for the device per optimizer step, not one per micro-batch as loss.item() would.
    return sum(torch.stack(losses).tolist()) / len(losses)


def accumulate_features(
    engine: Any, batches: list[dict[str, Any]], loss_fn: ContrastiveLoss, device: torch.device
) -> float:
    """open_clip's feature cache: negatives span all micro-batches of the optimizer step.

    A no-grad pass caches every micro-batch's features; then each micro-batch is re-encoded with
    gradients and the full-batch loss is backpropagated through its rows only. The per-pass
    gradients sum to the gradient of the full-batch loss, so they are not divided by the
    accumulation count.
    """
    # Both passes read the same device copies: one host-to-device transfer per micro-batch, for
    # holding the step's inputs on the device (small next to one micro-batch's activations).
    inputs = [_to_device(b, device) for b in batches]
    with torch.no_grad():
        cached = [_features(engine, x) for x in inputs]
    loss = None
    for j, x in enumerate(inputs):
        out = _features(engine, x)
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
