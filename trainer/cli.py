"""Command line of launch/train.py: arguments -> Config -> ContinualRun, user errors -> exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from trainer.config import load_config
from trainer.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Train an open_clip model over a plan of years with DeepSpeed.",
        epilog="Overrides are dotted settings, e.g. optim.lr=1e-3 deepspeed.zero_stage=3",
    )
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument("--resume", default="", help="'auto' (newest complete checkpoint) or a checkpoint tag")
    p.add_argument(
        "--start-from", default="", help="initial weights: an open_clip/TiC-CLIP .pt file or <run folder>:<year>"
    )
    p.add_argument("--years", default="", help="run only these plan steps: 2019..2022, 2019,2021")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value")
    return p.parse_args(argv)


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of launch/train.py; returns the process exit status."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from trainer.continual import ContinualRun
        from trainer.distributed import init_distributed, shutdown
        from trainer.host import tune_cpu_process
        from trainer.logging import setup_console
        from trainer.preemption import Preempted

        dist = init_distributed(cfg.deepspeed.backend)
        tune_cpu_process(dist.device)
        setup_console(dist.rank)
        try:
            ContinualRun(cfg, dist, resume=args.resume, start_from=args.start_from, years=args.years).run()
        except Preempted as e:
            # One write per line: every rank says it, into one shared log.
            sys.stderr.write(f"train: {e}\n")
        finally:
            shutdown()
        return 0
    except UserError as e:
        if _is_rank0():
            sys.stderr.write(f"train: error: {e}\n")
        return 2
