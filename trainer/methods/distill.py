"""LwF-style distillation from the frozen previous-year model (Li & Hoiem 2016, "Learning without
Forgetting"), in the in-batch form the CTP benchmark and ZSCL use for CLIP.

For a batch of N pairs, the teacher (the previous plan step's weights, frozen) and the student give
image->text and text->image similarity distributions over the batch's N candidates, each row a
softmax of logit_scale x cosine similarity / T (each model its own logit scale, the student's
capped like the objective's). The term is

    T^2 x mean over rows of KL(p_teacher || p_student), averaged over both directions,

times `weight`. With `rows: replay` only rows of years older than the step's new years are
distilled (candidates are still the whole batch). Rows are this rank's, candidates every rank's:
each rank's term is scaled so that the mean over ranks is the term of the whole batch, and
DeepSpeed's gradient averaging makes it the whole batch's gradient on any number of ranks.
Under feature-cache accumulation the candidates are one micro-batch per rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from trainer.distributed import all_reduce_sum, gather_with_grad
from trainer.methods.base import Method, YearContext
from trainer.methods.models import previous_model
from trainer.objectives.base import Outputs
from trainer.plugins import check_range

log = logging.getLogger("tic")


@dataclass(kw_only=True)
class DistillOptions:
    weight: float = 1.0
    """Multiplier of the distillation term."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions (the term is scaled by T^2)."""
    rows: Literal["all", "replay"] = "all"
    """Distil every row of the batch, or only rows of replayed (older) years."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The teacher's precision: auto = bf16 on CUDA, fp32 on the CPU."""

    def validate(self, key: str) -> None:
        check_range(f"{key}.weight", self.weight, 0.0)
        check_range(f"{key}.temperature", self.temperature, 0.0, open_low=True)


def kl_rows(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per row, T^2 x KL(softmax(teacher / T) || softmax(student / T))."""
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    s = F.log_softmax(student.float() / temperature, dim=1)
    return (t.exp() * (t - s)).sum(1) * temperature**2


def similarity_kl(
    student: Outputs, teacher: Outputs, temperature: float, rows: torch.Tensor, max_scale: float, world: int
) -> torch.Tensor:
    """This rank's share of the whole batch's mean row KL, both directions averaged.

    `rows` marks this rank's rows that count; the mean is over the counted rows of every rank.
    """
    s_img, s_txt = student["image_features"].float(), student["text_features"].float()
    t_img, t_txt = teacher["image_features"].float(), teacher["text_features"].float()
    s_scale = student["logit_scale"].float().reshape(()).clamp(max=max_scale)
    t_scale = teacher["logit_scale"].float().reshape(())
    all_s_img, all_s_txt = gather_with_grad(s_img), gather_with_grad(s_txt)
    all_t_img, all_t_txt = gather_with_grad(t_img), gather_with_grad(t_txt)
    i2t = kl_rows(t_scale * t_img @ all_t_txt.T, s_scale * s_img @ all_s_txt.T, temperature)
    t2i = kl_rows(t_scale * t_txt @ all_t_img.T, s_scale * s_txt @ all_s_img.T, temperature)
    counted = all_reduce_sum([float(rows.sum())])[0]
    if counted == 0:
        return 0.0 * (i2t.sum() + t2i.sum())  # keeps the graph: every rank backpropagates alike
    per_row = (i2t + t2i) / 2
    return (per_row * rows).sum() * world / counted


class Distillation(Method):
    """Distil the previous plan step's frozen model into the student (see the module docstring)."""

    Options = DistillOptions

    def __init__(self, cfg: Any, dist: Any, options: DistillOptions) -> None:
        super().__init__(cfg, dist, options)
        self.teacher: Any = None
        self.new_years: set[str] = set()

    def year_start(self, ctx: YearContext) -> None:
        self.new_years = set(ctx.step.new_years)
        # The first step has nothing to distil from.
        self.teacher = previous_model(self.cfg.model, ctx, self.dist.device, self.options.precision)
        if self.teacher is not None:
            dtype = str(next(self.teacher.parameters()).dtype).replace("torch.", "")
            log.info("distillation: teacher = the previous step's weights (%s)", dtype)

    def year_end(self, ctx: YearContext) -> None:
        self.teacher = None

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        with torch.no_grad():
            teacher = self.teacher(image=batch["image"], text=batch["text"])
        device = outputs["image_features"].device
        if self.options.rows == "replay":
            rows = torch.tensor([y not in self.new_years for y in batch["year"]], dtype=torch.float32, device=device)
        else:
            rows = torch.ones(outputs["image_features"].shape[0], device=device)
        kl = similarity_kl(
            outputs, teacher, self.options.temperature, rows, self.cfg.train.max_logit_scale, self.dist.world_size
        )
        return {"kl": self.options.weight * kl}

    def flops_per_sample(self, model_flops: float, first: bool = False) -> float:
        return 0.0 if first else model_flops / 3  # one teacher forward; training is 3 x forward
