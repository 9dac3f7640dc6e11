"""Elastic weight consolidation (Kirkpatrick et al. 2017), online across years (Schwarz et al. 2018).

At each plan step's end the diagonal Fisher of the contrastive loss is estimated on `samples` of
the step's new years: the mean over global batches of `batch` pairs of the squared gradient of
the batch's loss (the CTP benchmark's estimate; its batches hold the same samples on any number
of ranks, yeardata.py, and every rank contributes its rows through the gathered loss, so the
estimate does not depend on the world size). Fishers accumulate as F <- decay x F + F_new. The
next steps add

    weight / 2 x sum_i F_i (theta_i - theta*_i)^2,

theta* = the weights the step started from (the previous step's handed-on weights).

Memory: F and theta* in fp32 on every rank, 8 bytes per parameter, not partitioned by ZeRO.
Under ZeRO-3 the penalty gathers the parameters (as forward does) once per micro-batch; the
Fisher pass runs on a plain fp32 copy of the model on every rank (one more model copy and its
gradients, at year end only). The Fisher is written to the run folder
(methods/ewc-fisher-<tag>.safetensors) before the yearly checkpoint is marked complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

from trainer.files import atomic_write
from trainer.methods.base import Method, YearContext
from trainer.methods.models import full_weights, is_partitioned
from trainer.methods.yeardata import PassSpec, rank_batches
from trainer.model import create_model
from trainer.objectives.base import Outputs
from trainer.objectives.clip import ContrastiveLoss
from trainer.plugins import check_range

log = logging.getLogger("tic")


@dataclass(kw_only=True)
class EwcOptions:
    weight: float = 5000.0
    """lambda: the penalty's multiplier (5000 in the CTP benchmark's EWC)."""
    samples: int = 1024
    """Samples of the step's new years the Fisher is estimated on."""
    batch: int = 128
    """Global batch of the Fisher pass (its contrastive batch; a multiple of the rank count)."""
    decay: float = 1.0
    """gamma of online EWC: F <- gamma x F + F_new (1 = every year's Fisher counts in full)."""

    def validate(self, key: str) -> None:
        check_range(f"{key}.weight", self.weight, 0.0)
        check_range(f"{key}.samples", self.samples, 1)
        check_range(f"{key}.batch", self.batch, 1)
        check_range(f"{key}.decay", self.decay, 0.0, 1.0)


def fisher_file(run_path: Path, tag: str) -> Path:
    return run_path / "methods" / f"ewc-fisher-{tag}.safetensors"


def _flat_grads(model: torch.nn.Module, names: list[str]) -> torch.Tensor:
    params = dict(model.named_parameters())
    grads = [params[n].grad for n in names]
    return torch.cat([torch.zeros(params[n].numel()) if g is None else g.reshape(-1) for n, g in zip(names, grads)])


def estimate_fisher(
    model: Any, batches: Iterator[dict[str, Any]], rank: int, world: int, max_scale: float
) -> dict[str, torch.Tensor]:
    """Mean over `batches` of the squared full-batch gradient of the contrastive loss, per parameter."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    loss_fn = ContrastiveLoss(rank, world, max_logit_scale=max_scale)
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=False)
        out = model(image=batch["image"].to(device), text=batch["text"].to(device))
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        flat = _flat_grads(model, names)
        if world > 1:
            # Each rank's loss is the whole batch's and its backward summed every rank's share
            # into its own rows: the sum over ranks is world x the batch's gradient.
            tdist.all_reduce(flat)
            flat /= world
        sq = flat.double() ** 2
        total = sq if total is None else total + sq
        count += 1
    assert total is not None and count
    mean = (total / count).float()
    out_dict, at = {}, 0
    for n in names:
        size = params[n].numel()
        out_dict[n] = mean[at : at + size].reshape(params[n].shape).cpu()
        at += size
    return out_dict


class Ewc(Method):
    """The online EWC penalty (see the module docstring)."""

    Options = EwcOptions

    def __init__(self, cfg: Any, dist: Any, options: EwcOptions) -> None:
        super().__init__(cfg, dist, options)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.params: list[tuple[str, torch.nn.Parameter]] = []
        self.partitioned = False

    def year_start(self, ctx: YearContext) -> None:
        self.fisher, self.anchor = {}, {}
        if ctx.previous is None or ctx.previous_tag is None:
            return
        path = fisher_file(ctx.run.path, ctx.previous_tag)
        if not path.is_file():
            log.warning("ewc: no Fisher of %s (%s); no penalty this step", ctx.previous_tag, path)
            return
        device = self.dist.device
        self.fisher = {k: v.to(device) for k, v in load_file(str(path)).items()}
        weights = ctx.previous()
        self.anchor = {k: weights[k].reshape(self.fisher[k].shape).to(device) for k in self.fisher}
        self.params = [(n, p) for n, p in ctx.model.named_parameters() if n in self.fisher]
        self.partitioned = is_partitioned(ctx.model)

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not self.fisher or not torch.is_grad_enabled():
            return {}
        gather: Any = contextlib.nullcontext()
        if self.partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in self.params])
        with gather:
            penalty = sum((self.fisher[n] * (p.float() - self.anchor[n]) ** 2).sum() for n, p in self.params)
        return {"penalty": self.options.weight / 2 * penalty}

    def year_end(self, ctx: YearContext) -> None:
        o = self.options
        weights = full_weights(ctx.model)  # a collective under ZeRO-3
        model, _, preprocess, tokenizer = create_model(self.cfg.model, self.dist.device)
        model.load_state_dict(weights)
        model.output_dict = True
        model.train()
        spec = PassSpec(self.cfg.data.root, list(ctx.step.new_years), o.samples, o.batch, self.cfg.train.seed)
        batches = rank_batches(spec, self.dist, preprocess, tokenizer)
        new = estimate_fisher(model, batches, self.dist.rank, self.dist.world_size, self.cfg.train.max_logit_scale)
        previous = {k: v.cpu() for k, v in self.fisher.items()}
        fisher = {k: v + o.decay * previous[k] if k in previous else v for k, v in new.items()}
        log.info("ewc: Fisher of %s on %d samples (mean %.3e)", ctx.step.tag, o.samples, _mean(fisher))
        if self.dist.is_main:
            path = fisher_file(ctx.run.path, ctx.step.tag)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp)))
        self.fisher, self.anchor, self.params = {}, {}, []

    def year_end_flops(self, model_flops: float) -> float:
        """FLOPs of the Fisher pass: forward and backward of `samples` pairs."""
        return self.options.samples * model_flops


def _mean(fisher: Mapping[str, torch.Tensor]) -> float:
    total = sum(float(v.double().sum()) for v in fisher.values())
    return total / max(1, sum(v.numel() for v in fisher.values()))
