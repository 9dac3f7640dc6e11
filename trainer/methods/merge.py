"""Weight-space merging across years: the checkpoint a plan step hands on is a blend of weights.

`interpolate` (WiSE-FT, Wortsman et al. 2022; the merging FoMo-in-Flux, Roth et al. 2024, found
the best trade-off): after a step, hand on alpha x trained + (1 - alpha) x the weights the
previous step handed on (the first step hands on its trained weights). `ema`: hand on an
exponential moving average of the weights kept during the step (decay per optimizer step, updated
every `ema_every` steps), started from the step's initial weights.

The merged weights go into the yearly checkpoint as handed_on.safetensors: the next step's warm
start, a distillation teacher, evaluation and export read them, while the DeepSpeed checkpoint
keeps the trained weights, so a resumed run continues exactly. The EMA is in every checkpoint
(fp32, 4 bytes per parameter on every rank); under ZeRO-3 each EMA update gathers the
parameters, so set ema_every above 1 there to amortise it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer.methods.base import Method, YearContext
from trainer.methods.models import full_weights, whole_params
from trainer.plugins import check_range

log = logging.getLogger("tic")


@dataclass(kw_only=True)
class MergeOptions:
    mode: Literal["interpolate", "ema"] = "interpolate"
    """interpolate the trained with the previous weights, or hand on an EMA kept during training."""
    alpha: float = 0.5
    """interpolate: the trained weights' share (1 = no merging)."""
    ema_decay: float = 0.999
    """ema: the average's decay per update."""
    ema_every: int = 1
    """ema: optimizer steps between updates."""

    def validate(self, key: str) -> None:
        check_range(f"{key}.alpha", self.alpha, 0.0, 1.0)
        check_range(f"{key}.ema_decay", self.ema_decay, 0.0, 1.0)
        check_range(f"{key}.ema_every", self.ema_every, 1)


class Merge(Method):
    """Hands on merged weights at every step's end (see the module docstring)."""

    Options = MergeOptions

    @classmethod
    def conflict(cls, cfg: Any) -> str:
        if cfg.plan.strategy == "restart":
            return (
                "merge: plan.strategy=restart trains every step from scratch, and weights trained "
                "apart from a common start do not interpolate; merge a warm-started plan"
            )
        return ""

    def __init__(self, cfg: Any, dist: Any, options: MergeOptions) -> None:
        super().__init__(cfg, dist, options)
        self.ema: dict[str, torch.Tensor] = {}
        self.ema_step = -1  # the plan step the EMA belongs to
        self.updates = 0
        self.steps = 0

    def year_start(self, ctx: YearContext) -> None:
        if self.options.mode != "ema" or self.ema_step == ctx.step.index:
            return  # interpolation keeps nothing; a resumed step has its EMA from the checkpoint
        self.ema = {n: p.float().clone() for n, p in whole_params(ctx.model).items()}
        self.ema_step, self.updates, self.steps = ctx.step.index, 0, 0

    def after_step(self, ctx: YearContext) -> None:
        if self.options.mode != "ema":
            return
        self.steps += 1
        if self.steps % self.options.ema_every:
            return
        d = self.options.ema_decay
        with torch.no_grad():
            for n, p in whole_params(ctx.model).items():
                self.ema[n].mul_(d).add_(p.to(self.ema[n].device), alpha=1 - d)
        self.updates += 1

    def handed_on(self, ctx: YearContext) -> dict[str, torch.Tensor] | None:
        if self.options.mode == "ema":
            log.info("merge: handing on the EMA of %d updates (decay %g)", self.updates, self.options.ema_decay)
            return full_weights(ctx.model, self.ema)
        if ctx.previous is None:
            return None
        trained = full_weights(ctx.model)  # a collective under ZeRO-3
        a = self.options.alpha
        previous = ctx.previous()
        log.info("merge: handing on %g x trained + %g x the previous step's weights", a, 1 - a)
        return {k: _blend(a, v, previous[k]) for k, v in trained.items()}

    def state_dict(self) -> dict[str, Any]:
        if self.options.mode != "ema":
            return {}
        return {
            "ema": {n: v.detach().cpu().clone() for n, v in self.ema.items()},
            "ema_step": self.ema_step,
            "updates": self.updates,
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        device = self.dist.device
        self.ema = {n: v.to(device) for n, v in state["ema"].items()}
        self.ema_step, self.updates, self.steps = int(state["ema_step"]), int(state["updates"]), int(state["steps"])


def _blend(a: float, trained: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    if not trained.is_floating_point():
        return trained
    return a * trained + (1 - a) * previous.reshape(trained.shape)
