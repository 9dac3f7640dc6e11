"""The optimisation loop of one plan step: micro-batches -> objective (+ methods) -> DeepSpeed steps."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trainer.engine import clamp_logit_scale
from trainer.methods.base import Method
from trainer.objectives.base import Objective, Outputs


@dataclass
class StepRecord:
    """One optimizer step: its loss (objective + methods), the named terms, the LR it stepped with,
    timings and the micro-batches."""

    loss: float
    terms: dict[str, float]
    lr: float
    data_wait: float
    compute: float
    batches: list[dict[str, Any]]
    outputs: Outputs
    """The last micro-batch's model outputs (for after-step hooks)."""


def to_device(batch: Mapping[str, Any], device: torch.device, keys: Sequence[str]) -> dict[str, Any]:
    """The batch with its model inputs `keys` on `device`; copies of pinned tensors overlap with compute."""
    return {**batch, **{k: batch[k].to(device, non_blocking=True) for k in keys}}


def _total(
    objective: Objective,
    methods: Sequence[Method],
    outputs: Outputs,
    batch: Mapping[str, Any],
    own: Outputs,
    method_scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss of `outputs` plus every method's terms of the micro-batch's `own` outputs
    (scaled by `method_scale`), and all terms by name."""
    out = objective.loss(outputs, batch)
    total, terms = out.loss, dict(out.terms)
    for i, method in enumerate(methods):
        for name, term in method.loss_terms(own, batch).items():
            total = total + method_scale * term
            terms[f"{method_name(i, method)}/{name}"] = term
    return total, terms


def method_name(index: int, method: Method) -> str:
    """How a method's terms and state are named: its position and class, e.g. '0:Distillation'."""
    return f"{index}:{type(method).__name__}"


def _means(per_pass: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each term's mean over the passes, with one wait for the device instead of one per value."""
    names = sorted({n for p in per_pass for n in p})
    if not names:
        return {}
    values = torch.stack([torch.stack([p[n].detach().float() for p in per_pass if n in p]).mean() for n in names])
    return dict(zip(names, values.tolist()))


def accumulate_gradients(
    engine: Any,
    batches: list[dict[str, Any]],
    objective: Objective,
    device: torch.device,
    methods: Sequence[Method] = (),
    keys: Sequence[str] = ("image", "text"),
) -> tuple[float, dict[str, float], Outputs]:
    """DeepSpeed accumulation: each micro-batch is its own contrastive problem; gradients averaged."""
    losses, terms = [], []
    out: Outputs = {}
    for batch in batches:
        b = to_device(batch, device, keys)
        out = objective.forward(engine, b)
        loss, named = _total(objective, methods, out, b, out, 1.0)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        terms.append(named)
    # One wait for the device per optimizer step, not one per micro-batch as loss.item() would.
    return sum(torch.stack(losses).tolist()) / len(losses), _means(terms), out


def accumulate_features(
    engine: Any,
    batches: list[dict[str, Any]],
    objective: Objective,
    device: torch.device,
    methods: Sequence[Method] = (),
    keys: Sequence[str] = ("image", "text"),
) -> tuple[float, dict[str, float], Outputs]:
    """open_clip's feature cache: negatives span all micro-batches of the optimizer step.

    A no-grad pass caches every micro-batch's per-sample outputs; then each micro-batch is
    re-encoded with gradients and the full-batch loss is backpropagated through its rows only.
    The per-pass gradients sum to the gradient of the full-batch loss, so they are not divided by
    the accumulation count; a method's per-micro-batch terms are, to stay means over the step. An
    output shared by the whole batch (logit_scale) is in every pass's loss: each pass gives it
    1/passes of its gradient (`_share`).
    """
    # Both passes read the same device copies: one host-to-device transfer per micro-batch, for
    # holding the step's inputs on the device (small next to one micro-batch's activations).
    inputs = [to_device(b, device, keys) for b in batches]
    with torch.no_grad():
        cached = [objective.forward(engine, x) for x in inputs]
    loss = torch.zeros(())
    terms = []
    out: Outputs = {}
    for j, x in enumerate(inputs):
        out = objective.forward(engine, x)
        full = {
            k: torch.cat([out[k] if i == j else c[k] for i, c in enumerate(cached)])
            if k in objective.sample_outputs
            else _share(v, len(inputs))
            for k, v in out.items()
        }
        loss, named = _total(objective, methods, full, x, out, 1.0 / len(inputs))
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        terms.append(named)
    return loss.item(), _means(terms), out


def _share(value: Any, passes: int) -> Any:
    """`value` unchanged, with 1/passes of its gradient: a shared output (logit_scale) enters the
    full-batch loss of every pass, so only together do the passes give it its one gradient."""
    if not isinstance(value, torch.Tensor) or not value.requires_grad or passes == 1:
        return value
    # x.detach() + (x - x.detach()) / n is exactly x, and carries 1/n of x's gradient.
    return value.detach() + (value - value.detach()) / passes


def optimizer_steps(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    objective: Objective,
    methods: Sequence[Method],
    accum_steps: int,
    mode: str,
    device: torch.device,
    inputs: Sequence[str] = ("image", "text"),
    max_logit_scale: float | None = None,
) -> Iterator[StepRecord]:
    """Run optimizer steps until `batches` ends, yielding one record per step; `inputs` go to the device.

    With `max_logit_scale`, logit_scale is clamped to [0, ln(max_logit_scale)] after every step.
    """
    # With one micro-batch a step the feature cache is plain training plus a wasted forward.
    accumulate = accumulate_features if mode == "features" and accum_steps > 1 else accumulate_gradients
    while True:
        t0 = time.perf_counter()
        micro: list[dict[str, Any]] = []
        for _ in range(accum_steps):
            batch = next(batches, None)
            if batch is None:
                return
            micro.append(batch)
        t1 = time.perf_counter()
        # Read before stepping: afterwards the scheduler already holds the next step's LR.
        lr = float(engine.get_lr()[0])
        loss, terms, outputs = accumulate(engine, micro, objective, device, methods, inputs)
        if max_logit_scale is not None:
            clamp_logit_scale(engine, max_logit_scale)
        objective.after_step(outputs)
        yield StepRecord(loss, terms, lr, t1 - t0, time.perf_counter() - t1, micro, outputs)
