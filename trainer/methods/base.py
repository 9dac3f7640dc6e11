"""The method seam: continual methods that read the previous year's model or data.

A method (distillation, a parameter penalty, an exemplar selector, weight merging, ...) gets hooks
at year start, per optimizer step and at year end, adds named loss terms to the objective's loss,
and is Stateful: what it keeps (a teacher, a Fisher, a momentum encoder) travels in every
checkpoint. The plan decides which data a step sees; a method decides what the model learns from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.objectives.base import NoOptions, Objective, Outputs
from trainer.plan import YearStep
from trainer.rundir import RunDir


@dataclass
class YearContext:
    """What a method sees at a year boundary."""

    cfg: Config
    dist: DistInfo
    run: RunDir
    step: YearStep
    model: nn.Module
    """The module being trained (under ZeRO-3 its parameters are partitioned outside forward)."""
    objective: Objective
    previous: Callable[[], dict[str, torch.Tensor]] | None
    """fp32 weights the previous plan step handed on (its checkpoint's); None in the first step."""
    previous_tag: str | None = None
    """The previous plan step's tag (its newest year); None in the first step."""
    earlier: list[str] = field(default_factory=list)
    """The years (tasks) the plan's earlier steps trained, in order."""


class Method:
    """Base of every continual method; every hook is optional."""

    Options: ClassVar[type] = NoOptions
    """The dataclass of the method's own settings (`methods[i].options` in the config)."""

    def __init__(self, cfg: Config, dist: DistInfo, options: Any) -> None:
        self.cfg, self.dist, self.options = cfg, dist, options

    @classmethod
    def conflict(cls, cfg: Config) -> str:
        """Why the method cannot run with this config (its plan, say), or "" when it can."""
        return ""

    def year_start(self, ctx: YearContext) -> None:
        """Before the step's first optimizer step (also when a step resumes mid-year)."""

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Terms added to the objective's loss for one micro-batch, by name (logged as loss/<method>/<name>)."""
        return {}

    def after_step(self, ctx: YearContext) -> None:
        """After each optimizer step (EMA updates, counters)."""

    def year_end(self, ctx: YearContext) -> None:
        """After the step's last optimizer step, before its yearly checkpoint is written."""

    def flops_per_sample(self, model_flops: float, first: bool = False) -> float:
        """Extra training FLOPs per sample the method adds (a teacher's forward, say); `first`: in the
        plan's first step, where there is no previous model."""
        return 0.0

    def year_end_flops(self, model_flops: float) -> float:
        """FLOPs the method spends once per plan step at its end (a Fisher pass, say)."""
        return 0.0

    def handed_on(self, ctx: YearContext) -> dict[str, torch.Tensor] | None:
        """The weights the step hands on instead of its trained ones (merging), or None.

        Called on every rank after `year_end`; rank 0's result is written into the yearly
        checkpoint, and warm starts, teachers, evaluation and export read it from there, while
        resuming still loads the trained weights."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned; a method without state accepts {}."""
