"""CLIP: open_clip's distributed contrastive loss, with a logit-scale cap that holds under ZeRO."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from open_clip.loss import ClipLoss

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.objectives.base import LossOutput, Objective, Outputs


class ContrastiveLoss:
    """InfoNCE over the batch gathered from every rank (open_clip's ClipLoss does the gathering).

    The cap on exp(logit_scale) is applied to the value used in the loss, not by clamping the
    parameter in place: under ZeRO the optimizer's fp32 master copy is written back after every
    step and would silently undo an in-place clamp.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        self.max_scale = max_logit_scale
        self.clip = ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=True,
            rank=rank,
            world_size=world_size,
        )

    def scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """The capped scale; `logit_scale` is open_clip's forward output, exp(parameter).

        Clamping after exp is the same cap as clamping the log-space parameter, with zero
        gradient above the cap, and it needs the parameter only inside the model's forward,
        where ZeRO-3 has gathered it.
        """
        return logit_scale.clamp(max=self.max_scale).reshape(())

    def __call__(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        # Under bf16/fp16 the features arrive in half precision, and logits up to 100 and the
        # cross-entropy would carry ~3 significant digits. Features are only B x D, so the loss
        # (and the gather) in fp32 is cheap; for fp32 features .float() is a no-op.
        return self.clip(image_features.float(), text_features.float(), self.scale(logit_scale).float())


class ClipObjective(Objective):
    """InfoNCE over image-text pairs (Radford et al. 2021), as open_clip trains it; settings in `train.*`."""

    feature_cache = True

    def __init__(self, cfg: Config, dist: DistInfo, options: Any) -> None:
        super().__init__(cfg, dist, options)
        t = cfg.train
        self.contrastive = ContrastiveLoss(
            dist.rank, dist.world_size, t.local_loss, t.gather_with_grad, t.max_logit_scale
        )

    def loss(self, outputs: Outputs, batch: Mapping[str, Any]) -> LossOutput:
        return LossOutput(self.contrastive(outputs["image_features"], outputs["text_features"], outputs["logit_scale"]))
