"""Run a function on N ranks in fresh processes (how distributed correctness is tested here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple, backend: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from trainer.distributed import init_distributed, shutdown

    init_distributed(backend)
    try:
        fn(rank, world, *args)
    finally:
        shutdown()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> None:
    """Call fn(rank, world, *args) on `world` spawned ranks (gloo unless told); fails if any rank raises.

    `fn` must be importable (module level) and report results through files in a tmp dir. Rank r
    gets LOCAL_RANK=r, so with backend="nccl" it runs on GPU r.
    """
    mp.start_processes(
        _entry, args=(fn, world, free_port(), args, backend), nprocs=world, start_method="spawn", join=True
    )


def clean_env() -> dict[str, str]:
    """The environment for a launched subprocess, without the rank variables this process set."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def deepspeed_train(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: int = 500) -> None:
    """`deepspeed --num_gpus 2 launch/train.py ARGS` (2 CPU ranks) with its output in `log`; it must exit 0."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(repo / "launch" / "train.py"),
        *args,
    ]
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**clean_env(), **(env or {})}, cwd=repo, timeout=timeout
        )
    assert proc.returncode == 0, log.read_text()[-3000:]
