"""Rank/world helpers that work under deepspeed, torchrun, SLURM and plain python."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adopt_slurm_env() -> None:
    """Under `srun` without a launcher, SLURM's variables name the rank; torch wants its own."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(backend: str = "auto") -> DistInfo:
    """Join (or create) the process group; a lone `python` process becomes a world of one."""
    import deepspeed

    _adopt_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


T = TypeVar("T")


def broadcast_object(obj: T, src: int = 0) -> T:
    """Send a picklable object from `src` to every rank (identity when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum small lists of numbers over ranks (for counters such as skipped samples)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    """Where tensors for a collective must live: NCCL only reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (a one-element list when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order, differentiable: the backward sums each
    rank's gradient of its rows, so a loss every rank computes over all rows gives world x the
    gradient, which DeepSpeed's averaging over ranks divides back."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Add up per-rank counters whose keys may differ between ranks."""
    total: dict[str, int] = {}
    for part in all_gather_object(counts):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
