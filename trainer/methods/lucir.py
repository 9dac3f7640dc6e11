"""LUCIR's less-forget constraint (Hou et al., CVPR 2019, "Learning a Unified Classifier
Incrementally via Rebalancing"), adapted to the two towers of a CLIP model.

LUCIR keeps the new model's normalised features of each sample close to the old model's:
L_G = lambda x (1 - cos(f_old(x), f(x))), with lambda = lambda_base x sqrt(|old classes| / |new
classes|). Here the features are both towers' embeddings and classes are tasks:

    lambda x ½ [mean_i (1 - cos(z_I,i^old, z_I,i)) + mean_i (1 - cos(z_T,i^old, z_T,i))],
    lambda = weight x sqrt(tasks trained before the step / the step's new tasks),

with the frozen previous step's model as f_old. LUCIR's margin ranking loss is over class weights,
which a contrastive model has none of; its exemplars come from plan.buffer_select=herding. The term
is per sample, so each rank's mean over its rows averages to the whole batch's over the ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from trainer.methods.base import Method, YearContext
from trainer.methods.models import previous_model
from trainer.objectives.base import Outputs
from trainer.plugins import check_range

log = logging.getLogger("tic")


@dataclass(kw_only=True)
class LucirOptions:
    weight: float = 5.0
    """lambda_base (5 in LUCIR), scaled by sqrt(old tasks / new tasks) each step."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The old model's precision: auto = bf16 on CUDA, fp32 on the CPU."""

    def validate(self, key: str) -> None:
        check_range(f"{key}.weight", self.weight, 0.0)


class Lucir(Method):
    """The less-forget constraint on both towers (see the module docstring)."""

    Options = LucirOptions

    def __init__(self, cfg: Any, dist: Any, options: LucirOptions) -> None:
        super().__init__(cfg, dist, options)
        self.old: Any = None
        self.scale = 0.0

    def year_start(self, ctx: YearContext) -> None:
        self.old = previous_model(self.cfg.model, ctx, self.dist.device, self.options.precision)
        self.scale = self.options.weight * math.sqrt(len(ctx.earlier) / len(ctx.step.new_years))
        if self.old is not None:
            log.info("lucir: less-forget weight %.3g", self.scale)

    def year_end(self, ctx: YearContext) -> None:
        self.old = None

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.old is None:
            return {}
        with torch.no_grad():
            old = self.old(image=batch["image"], text=batch["text"])
        terms = [
            (1 - F.cosine_similarity(outputs[k].float(), old[k].float(), dim=-1)).mean()
            for k in ("image_features", "text_features")
        ]
        return {"less_forget": self.scale * (terms[0] + terms[1]) / 2}

    def flops_per_sample(self, model_flops: float, first: bool = False) -> float:
        return 0.0 if first else model_flops / 3
