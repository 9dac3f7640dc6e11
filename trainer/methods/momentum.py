"""A momentum encoder: a frozen copy of the model whose weights follow the trained ones by EMA.

Its fp32 master weights are whole on every rank. Under ZeRO 0-2 an update reads the module's
parameters directly; under ZeRO-3 each rank updates the slice of every parameter its own
partition holds (ZeRO-3 partitions a flattened parameter into equal contiguous slices) and the
ranks all-gather the updated slices, so the student's partitions are never gathered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from trainer.config import ModelConfig
from trainer.methods.models import frozen_copy, is_partitioned


class MomentumEncoder:
    """θ_m <- momentum x θ_m + (1 - momentum) x [(1 - old_share) x θ + old_share x θ_old], per step."""

    def __init__(
        self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        self.model: Any = frozen_copy(cfg, weights, device, dtype)
        self.master = {n: p.detach().float().clone() for n, p in self.model.named_parameters()}
        self.device = device

    @torch.no_grad()
    def update(
        self, student: nn.Module, momentum: float, old: Mapping[str, torch.Tensor] | None, old_share: float
    ) -> None:
        """One EMA step towards `student` (and `old`, whole fp32 weights, with weight `old_share`)."""
        new = (1 - momentum) * (1 - old_share if old is not None else 1.0)
        from_old = (1 - momentum) * old_share if old is not None else 0.0
        if is_partitioned(student):
            self._update_slices(student, momentum, new, old, from_old)
        else:
            for n, p in student.named_parameters():
                m = self.master[n]
                m.mul_(momentum).add_(p.detach().float().reshape(m.shape), alpha=new)
                if old is not None:
                    m.add_(old[n].reshape(m.shape), alpha=from_old)
        for n, p in self.model.named_parameters():
            p.copy_(self.master[n])

    def _update_slices(
        self,
        student: nn.Module,
        momentum: float,
        new: float,
        old: Mapping[str, torch.Tensor] | None,
        from_old: float,
    ) -> None:
        world, rank = tdist.get_world_size(), tdist.get_rank()
        params = list(student.named_parameters())
        parts = []
        for n, p in params:
            own: torch.Tensor = p.ds_tensor  # type: ignore[attr-defined]
            size = own.numel()
            flat = self.master[n].reshape(-1)
            lo, hi = min(rank * size, flat.numel()), min((rank + 1) * size, flat.numel())
            piece = torch.zeros(size, device=flat.device)
            piece[: hi - lo] = flat[lo:hi] * momentum + own.detach().float().reshape(-1)[: hi - lo] * new
            if old is not None:
                piece[: hi - lo] += old[n].reshape(-1)[lo:hi].to(flat.device) * from_old
            parts.append(piece)
        mine = torch.cat(parts)
        gathered = torch.empty(world * mine.numel(), device=mine.device)
        tdist.all_gather_into_tensor(gathered, mine)
        by_rank = gathered.reshape(world, -1)
        at = 0
        for (n, _), piece in zip(params, parts):
            size = piece.numel()
            whole = by_rank[:, at : at + size].reshape(-1)
            m = self.master[n]
            m.copy_(whole[: m.numel()].reshape(m.shape))
            at += size

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().cpu().clone() for n, v in self.master.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for n, p in self.model.named_parameters():
            self.master[n].copy_(state[n])
            p.copy_(self.master[n])
