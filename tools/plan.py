"""What will each continual strategy cost? `python tools/plan.py --config configs/tic_medium.yaml --compare`."""

from __future__ import annotations

import argparse
import json
import sys

from trainer.config import ConfigError, load_config
from trainer.data.shards import DataError, find_years
from trainer.flops import train_flops
from trainer.model import ModelError, create_model
from trainer.plan_report import STRATEGIES, assumptions, compare_table, plan_for, step_table, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--strategy", choices=STRATEGIES, help="plan this strategy (default: the config's)")
    p.add_argument("--compare", action="store_true", help="compare every strategy's cost")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--year-size", type=int, default=0,
                   help="samples per year to assume when data.root cannot be read (default: the step budget)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        years = cfg.plan.years
        try:
            sizes = {y: sum(s.size for s in shards) for y, shards in find_years(cfg.data.root, "train", years or None).items()}
            assumed = False
        except DataError:
            if not years:
                raise
            sizes = {y: args.year_size or cfg.train.samples or cfg.train.global_batch for y in years}
            assumed = True
        flops = train_flops(create_model(cfg.model)[0])
        restart = plan_for(cfg, sizes, "restart")
        chosen = [args.strategy or cfg.plan.strategy] if not args.compare else STRATEGIES
        plans = {s: plan_for(cfg, sizes, s) for s in chosen}
    except (ConfigError, DataError, ModelError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    rows = [summary(pl, flops, restart) for pl in plans.values()]
    if args.json:
        print(json.dumps({"summary": rows, "plans": {s: pl.to_dict() for s, pl in plans.items()}}, indent=1))
        return 0
    if not args.compare:
        print(step_table(next(iter(plans.values()))))
        print()
    print(compare_table(rows))
    print()
    print(assumptions(cfg, sizes, flops, assumed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
