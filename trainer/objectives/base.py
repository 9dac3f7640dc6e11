"""The objective seam: what a training step learns from, given the model's outputs for a batch.

The loop asks the run's objective for the model outputs of a batch (`forward`) and for the loss of
those outputs (`loss`); it never names an objective. An objective may ask the pipeline for extra
views of each sample (`views`), keep state across steps (`after_step`, `state_dict`), and tells
the planner its training FLOPs per sample (`flops_per_sample`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from trainer.config import Config
from trainer.distributed import DistInfo

Outputs = dict[str, torch.Tensor]
"""Model outputs of a batch by name; per-sample tensors have the batch as their first dimension."""
ImageView = Callable[[Image.Image], torch.Tensor]


@dataclass
class LossOutput:
    """A step's loss and the named terms it is made of (logged as loss/<name>)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(kw_only=True)
class NoOptions:
    """An objective or method without options of its own."""


class Objective(ABC):
    """Base of every objective; subclasses define `loss` and override whatever else they need."""

    Options: ClassVar[type] = NoOptions
    """The dataclass of the objective's own settings (`objective.options` in the config)."""
    sample_outputs: ClassVar[tuple[str, ...]] = ("image_features", "text_features")
    """The outputs that are per sample (concatenated over micro-batches by feature-cache accumulation)."""
    feature_cache: ClassVar[bool] = False
    """True when the loss depends on the batch only through `sample_outputs`, so open_clip's
    feature-cache accumulation (train.accumulation=features) computes its exact gradient."""

    def __init__(self, cfg: Config, dist: DistInfo, options: Any) -> None:
        self.cfg, self.dist, self.options = cfg, dist, options

    def views(self, preprocess: ImageView) -> dict[str, ImageView]:
        """Extra image views of every sample the pipeline must deliver, by batch key.

        Each view's augmentation randomness is keyed by (seed, sample key, view name)."""
        return {}

    def forward(self, model: Callable[..., Any], batch: Mapping[str, Any]) -> Outputs:
        """The model outputs the loss needs; `model` is the DeepSpeed engine (or the bare module)."""
        return dict(model(image=batch["image"], text=batch["text"]))

    @abstractmethod
    def loss(self, outputs: Outputs, batch: Mapping[str, Any]) -> LossOutput:
        """The loss of `outputs` (one micro-batch, or the whole step's under feature-cache accumulation)."""

    def after_step(self, outputs: Outputs) -> None:
        """Called after each optimizer step with the last micro-batch's outputs (queues, EMAs)."""

    def flops_per_sample(self, model_flops: float) -> float:
        """Training FLOPs per sample, given the model's (3 x forward of one image-text pair)."""
        return model_flops

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned; an objective without state accepts {}."""
