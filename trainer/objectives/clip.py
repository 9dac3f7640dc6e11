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

    The cap on exp(logit_scale) is open_clip_train's: the parameter is clamped to ln(cap) after
    every optimizer step (engine.clamp_logit_scale, on the optimizer's master copy under ZeRO). The
    loss also takes min(scale, cap), with the gradient of the scale itself: a bf16 parameter at
    its clamp reads 102.0 for a cap of 100, and must still get the gradient that moves it back.
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
        """min(`logit_scale`, cap) in fp32 with `logit_scale`'s own gradient (open_clip's exp(parameter))."""
        value = logit_scale.float().reshape(())
        return value + (value.clamp(max=self.max_scale) - value).detach()

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
