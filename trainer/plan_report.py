"""What a plan costs: the per-step table, totals, and the strategy comparison of tools/plan.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from trainer.config import Config
from trainer.plan import Plan, make_plan

STRATEGIES = ["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "replay", "restart"]


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:.4g}"


def plan_for(cfg: Config, sizes: Mapping[str, int], strategy: str) -> Plan:
    return make_plan(replace(cfg, plan=replace(cfg.plan, strategy=strategy)), sizes)


def summary(plan: Plan, flops_per_sample: int, restart: Plan) -> dict[str, Any]:
    """Totals of a plan and its cost relative to retraining from scratch at every step."""
    return {
        "strategy": plan.strategy,
        "samples": plan.total_samples,
        "optimizer_steps": sum(s.steps for s in plan.steps),
        "train_flops": plan.total_samples * flops_per_sample,
        "cost_vs_restart": plan.total_samples / restart.total_samples,
    }


def step_table(plan: Plan) -> str:
    """One line per step: years with weights (buffers marked), samples, steps, warmup, init."""
    lines = [f"{'step':>4}  {'tag':<6} {'samples':>9} {'steps':>8} {'warmup':>6} {'init':<8}  years: weight (pool)"]
    for s in plan.steps:
        years = ", ".join(
            f"{y}: {s.quotas[y] / s.samples:.3f} ({_human(s.pool[y])}{' buf' if y in s.buffered else ''})"
            for y in s.quotas
        )
        lines.append(
            f"{s.index:>4}  {s.tag:<6} {_human(s.samples):>9} {s.steps:>8} {s.warmup:>6} {s.init:<8}  {years}"
        )
    return "\n".join(lines)


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'strategy':<17} {'samples':>9} {'steps':>9} {'train FLOPs':>12} {'vs restart':>10}"]
    for r in rows:
        lines.append(
            f"{r['strategy']:<17} {_human(r['samples']):>9} {r['optimizer_steps']:>9} "
            f"{r['train_flops']:>12.3e} {r['cost_vs_restart']:>9.2f}x"
        )
    return "\n".join(lines)


def assumptions(cfg: Config, sizes: Mapping[str, int], flops: int, assumed_sizes: bool) -> str:
    budget = cfg.train.samples
    notes = [
        f"- model {cfg.model.name}: {flops / 3:.3e} forward FLOPs per image-text pair, training = 3x forward",
        f"- per-step budget: {_human(budget) + ' samples' if budget else 'one pass over the step data'}, "
        f"global batch {cfg.train.global_batch}",
        f"- restart retrains from scratch each step with {'the step budget x steps so far' if cfg.plan.restart_budget == 'grow' else 'the step budget'}"
        " (TiC-CLIP's oracle)",
        "- warm-start cumulative over T steps with a fixed budget costs T budgets; restart costs "
        "T(T+1)/2, so the saving is (T+1)/2x",
    ]
    if assumed_sizes:
        notes.append(f"- data not readable here: every year assumed to hold {_human(next(iter(sizes.values())))} samples (--year-size)")
    return "assumptions:\n" + "\n".join(notes)
