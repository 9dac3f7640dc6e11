"""CTP: compatible momentum contrast and topology preservation (Zhu et al., ICCV 2023, "CTP: Towards
Vision-Language Continual Pretraining via Compatible Momentum Contrast and Topology Preservation").

Following the paper's code for CLIP-style towers (its MLM terms have no counterpart here):

* A momentum encoder θ_m, never trained: in the first plan step a copy of the initial model moved
  by θ_m <- 0.995 θ_m + 0.005 θ each optimizer step; in later steps re-initialised to the previous
  step's weights θ_old and moved by θ_m <- 0.9 θ_m + 0.05 θ + 0.05 θ_old ("compatible": it absorbs
  the new and the old model).
* Momentum contrast: queues of the momentum encoder's image and text features (`queue` each); with
  keys K_T = [momentum text features of the global batch; text queue] and K_I alike,
  L_moco = ½ [CE(z_I K_Tᵀ / τ) + CE(z_T K_Iᵀ / τ)], the positive being the sample's own momentum
  feature. The paper's code uses the rank's own rows as positives and negatives; here the whole
  global batch is, so 2 ranks compute what 1 does.
* Topology preservation (from the second step): for X in i2t, t2i, i2i, t2t the row-wise
  KL(softmax(S_X^old / τ) || softmax(S_X / τ)) between the frozen previous model's and the
  student's cosine-similarity matrices over the global batch (a sample's own column left out of
  i2i and t2t), L_TP = ½ (KL_i2t + KL_t2i) + ½ (KL_i2i + KL_t2t).

τ = 0.07 is fixed, as in the paper. The queues start empty at every plan step (the paper keeps
them across tasks; they hold two steps of keys at its batch size, so only a task's first steps
differ) and fill with every optimizer step's momentum features; they and the momentum encoder
are in every checkpoint, so a resumed step continues exactly. `CTP_ER` is this method with a
replay plan (plan.strategy: replay or cumulative-*).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from trainer.distributed import gather_with_grad
from trainer.methods.base import Method, YearContext
from trainer.methods.distill import kl_rows
from trainer.methods.models import frozen_copy, full_weights, teacher_dtype
from trainer.methods.momentum import MomentumEncoder
from trainer.objectives.base import Outputs
from trainer.plugins import check_range

log = logging.getLogger("tic")

SELF = -1000.0  # a sample's own column in i2i / t2t, as the paper's code masks it
PAIRS = (("i2t", "image", "text"), ("t2i", "text", "image"), ("i2i", "image", "image"), ("t2t", "text", "text"))


@dataclass(kw_only=True)
class CtpOptions:
    temperature: float = 0.07
    """τ of the momentum contrast and of the topology distributions (fixed, as in the paper)."""
    queue: int = 1024
    """Momentum features kept per modality."""
    momentum_first: float = 0.995
    """Momentum in the first plan step (towards the trained model only)."""
    momentum: float = 0.9
    """Momentum in later steps, the rest split equally between the trained and the previous model."""
    moco_weight: float = 1.0
    """Multiplier of the momentum contrast."""
    topology_weight: float = 1.0
    """Multiplier of topology preservation."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """The frozen copies' precision: auto = bf16 on CUDA, fp32 on the CPU."""

    def validate(self, key: str) -> None:
        check_range(f"{key}.temperature", self.temperature, 0.0, open_low=True)
        check_range(f"{key}.queue", self.queue, 0)
        check_range(f"{key}.momentum_first", self.momentum_first, 0.0, 1.0)
        check_range(f"{key}.momentum", self.momentum, 0.0, 1.0)
        check_range(f"{key}.moco_weight", self.moco_weight, 0.0)
        check_range(f"{key}.topology_weight", self.topology_weight, 0.0)


def topology_kl(student: Outputs, old: Outputs, temperature: float, rank: int) -> torch.Tensor:
    """L_TP over this rank's rows against every rank's columns (the mean over ranks is the batch's)."""
    s = {m: student[f"{m}_features"].float() for m in ("image", "text")}
    o = {m: old[f"{m}_features"].float() for m in ("image", "text")}
    all_s = {m: gather_with_grad(v) for m, v in s.items()}
    all_o = {m: gather_with_grad(v) for m, v in o.items()}
    rows = s["image"].shape[0]
    own = torch.arange(rows, device=s["image"].device) + rank * rows
    terms = {}
    for name, q, c in PAIRS:
        new = s[q] @ all_s[c].T / temperature
        before = o[q] @ all_o[c].T / temperature
        if q == c:
            self_col = torch.zeros_like(new, dtype=torch.bool)
            self_col[torch.arange(rows), own] = True
            new = new.masked_fill(self_col, SELF / temperature)
            before = before.masked_fill(self_col, SELF / temperature)
        terms[name] = kl_rows(before, new, 1.0).mean()
    return (terms["i2t"] + terms["t2i"]) / 2 + (terms["i2i"] + terms["t2t"]) / 2


class Ctp(Method):
    """Compatible momentum contrast with topology preservation (see the module docstring)."""

    Options = CtpOptions

    def __init__(self, cfg: Any, dist: Any, options: CtpOptions) -> None:
        super().__init__(cfg, dist, options)
        self.momentum: MomentumEncoder | None = None
        self.old: Any = None
        self.old_weights: dict[str, torch.Tensor] | None = None
        self.state_step = -1  # the plan step the momentum encoder and queues belong to
        self.queues: dict[str, torch.Tensor] = {}
        self.pending: list[dict[str, torch.Tensor]] = []
        self.loaded: Mapping[str, Any] | None = None

    def year_start(self, ctx: YearContext) -> None:
        o, device = self.options, self.dist.device
        dtype = teacher_dtype(device, o.precision)
        self.old = self.old_weights = None
        if ctx.previous is not None:
            weights = ctx.previous()
            self.old_weights = {k: v.to(device) for k, v in weights.items()}
            self.old = frozen_copy(self.cfg.model, weights, device, dtype)
            start = weights
        else:
            start = full_weights(ctx.model)  # a collective under ZeRO-3
        self.momentum = MomentumEncoder(self.cfg.model, start, device, dtype)
        dim = _embed_dim(self.momentum.model)
        self.queues = {m: torch.empty(0, dim, device=device) for m in ("image", "text")}
        self.pending = []
        if self.loaded is not None and int(self.loaded["step"]) == ctx.step.index:
            self.momentum.load_state_dict(self.loaded["momentum"])
            self.queues = {m: q.to(device) for m, q in self.loaded["queues"].items()}
        self.loaded = None
        self.state_step = ctx.step.index

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        assert self.momentum is not None, "year_start builds the momentum encoder"
        o, rank = self.options, self.dist.rank
        with torch.no_grad():
            mom = self.momentum.model(image=batch["image"], text=batch["text"])
            keys = {m: gather_with_grad(mom[f"{m}_features"].float()) for m in ("image", "text")}
        if torch.is_grad_enabled():
            self.pending.append(keys)
        z = {m: outputs[f"{m}_features"].float() for m in ("image", "text")}
        rows = z["image"].shape[0]
        target = torch.arange(rows, device=z["image"].device) + rank * rows
        moco = 0.0 * z["image"].sum()
        for q, c in (("image", "text"), ("text", "image")):
            bank = torch.cat([keys[c], self.queues[c]])
            moco = moco + F.cross_entropy(z[q] @ bank.T / o.temperature, target) / 2
        terms = {"moco": o.moco_weight * moco}
        if self.old is not None:
            with torch.no_grad():
                old = self.old(image=batch["image"], text=batch["text"])
            terms["topology"] = o.topology_weight * topology_kl(outputs, old, o.temperature, rank)
        return terms

    def after_step(self, ctx: YearContext) -> None:
        assert self.momentum is not None
        o = self.options
        for keys in self.pending:
            for m in ("image", "text"):
                self.queues[m] = torch.cat([keys[m], self.queues[m]])[: o.queue]
        self.pending = []
        if self.old_weights is None:
            self.momentum.update(ctx.model, o.momentum_first, None, 0.0)
        else:
            self.momentum.update(ctx.model, o.momentum, self.old_weights, 0.5)

    def year_end(self, ctx: YearContext) -> None:
        self.old = self.old_weights = None

    def flops_per_sample(self, model_flops: float, first: bool = False) -> float:
        # The momentum encoder's forward, and from the second step the old model's.
        return (1 if first else 2) * model_flops / 3

    def state_dict(self) -> dict[str, Any]:
        if self.momentum is None:
            return {}
        return {
            "step": self.state_step,
            "momentum": self.momentum.state_dict(),
            "queues": {m: q.detach().cpu().clone() for m, q in self.queues.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Restored before year_start, which builds the encoder and then takes this over.
        self.loaded = state or None


def _embed_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[1])
    return int(model.visual.output_dim)
