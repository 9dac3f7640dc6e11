"""What will each continual strategy cost, and what fits in GPU memory?

  python tools/plan.py --config configs/tic_medium.yaml --compare
  python tools/plan.py --config configs/tic_large.yaml --memory --gpus-per-node 8 --nodes 4 --gpu-mem 80
  python tools/plan.py --all-presets --memory --nodes 4

--memory prints, per ZeRO stage and offload setting, the per-GPU memory of model states
(DeepSpeed's own estimators), the activations of the micro-batch with and without gradient
checkpointing, and the largest micro-batch that fits in --gpu-mem GiB, for the config's model
and precision (auto = bf16: the report is for GPUs). --all-presets reports every TiC preset
(configs/tic_debug, tic_medium, tic_large, tic_xlarge) instead of one --config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from trainer.config import load_config
from trainer.data.shards import DataError, find_years
from trainer.distributed import DistInfo
from trainer.errors import UserError
from trainer.flops import train_flops
from trainer.memory import memory_report
from trainer.methods import build_methods
from trainer.model import create_model
from trainer.objectives import build_objective
from trainer.plan_report import (
    STRATEGIES,
    assumptions,
    compare_table,
    memory_notes,
    memory_table,
    method_candidates,
    methods_table,
    plan_for,
    step_table,
    summary,
)

PRESETS = [
    Path(__file__).resolve().parents[1] / "configs" / f"tic_{s}.yaml" for s in ("debug", "medium", "large", "xlarge")
]
MEMORY_DEFAULTS = {"gpus_per_node": 8, "nodes": 1, "gpu_mem": 80.0}


class Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line `plan: error: ...` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"plan: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` greater than 0."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} > 0, got {text!r}"
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def parser() -> Parser:
    p = Parser(prog="tools/plan.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="the run's YAML config")
    which.add_argument(
        "--all-presets",
        action="store_true",
        help="with --memory: report every TiC preset (tic_debug, tic_medium, tic_large, tic_xlarge)",
    )
    p.add_argument("--strategy", choices=STRATEGIES, help="plan this strategy (default: the config's)")
    p.add_argument("--compare", action="store_true", help="compare every strategy's cost")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--year-size",
        type=int,
        default=0,
        help="samples per year to assume when data.root cannot be read (default: the step budget)",
    )
    mem = p.add_argument_group("memory planning")
    mem.add_argument(
        "--memory",
        action="store_true",
        help="per-GPU memory per ZeRO stage/offload and the largest micro-batch that fits",
    )
    mem.add_argument("--gpus-per-node", type=positive(int), help="GPUs per node (default 8)")
    mem.add_argument("--nodes", type=positive(int), help="nodes (default 1)")
    mem.add_argument("--gpu-mem", type=positive(float), help="memory of one GPU in GiB (default 80)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (applied to every preset with --all-presets)")
    return p


def memory(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {k: getattr(args, k) or v for k, v in MEMORY_DEFAULTS.items()}
    paths = PRESETS if args.all_presets else [Path(args.config)]
    try:
        reports = []
        for path in paths:
            report = memory_report(
                load_config(path, args.overrides), opts["gpus_per_node"], opts["nodes"], opts["gpu_mem"]
            )
            reports.append({"config": path.stem, **report})
    except UserError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports, indent=1))
        return 0
    print("\n\n".join(memory_table(r) for r in reports))
    print()
    print(memory_notes("fp32" if any(r["precision"] == "fp32" for r in reports) else reports[0]["precision"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.memory:
        if args.compare or args.strategy or args.year_size:
            p.error("--memory reports memory only; drop --compare, --strategy and --year-size")
        return memory(args)
    given = [f"--{k.replace('_', '-')}" for k in ("all_presets", *MEMORY_DEFAULTS) if getattr(args, k)]
    if given:
        p.error(f"{', '.join(given)}: only valid with --memory")
    try:
        cfg = load_config(args.config, args.overrides)
        years = cfg.plan.years
        try:
            sizes = {
                y: sum(s.size for s in shards)
                for y, shards in find_years(cfg.data.root, "train", years or None).items()
            }
            assumed = False
        except DataError:
            if not years:
                raise
            sizes = {y: args.year_size or cfg.train.samples or cfg.train.global_batch for y in years}
            assumed = True
        flops = train_flops(create_model(cfg.model)[0])
        one = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
        per_sample = build_objective(cfg, one).flops_per_sample(flops)
        methods = build_methods(cfg, one)
        candidates = method_candidates(cfg, one) if args.compare else {}
        restart = plan_for(cfg, sizes, "restart")
        chosen = [args.strategy or cfg.plan.strategy] if not args.compare else STRATEGIES
        plans = {s: plan_for(cfg, sizes, s) for s in chosen}
    except UserError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    rows = [summary(pl, per_sample, restart, methods, flops, cfg) for pl in plans.values()]
    if args.json:
        print(json.dumps({"summary": rows, "plans": {s: pl.to_dict() for s, pl in plans.items()}}, indent=1))
        return 0
    if not args.compare:
        print(step_table(next(iter(plans.values()))))
        print()
    print(compare_table(rows))
    print()
    if candidates:
        print(methods_table(plans[args.strategy or cfg.plan.strategy], per_sample, candidates, flops))
        print()
    print(assumptions(cfg, sizes, flops, assumed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
