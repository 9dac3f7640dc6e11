"""Budget planner: a continual strategy and a compute budget become a list of YearStep."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from trainer.config import Config, ConfigError
from trainer.years import select


@dataclass(frozen=True)
class YearStep:
    """One step of a plan: what it draws from, how much, and how it starts."""

    index: int
    tag: str
    """Checkpoint tag year: the newest year this step adds."""
    new_years: list[str]
    pool: dict[str, int]
    """Samples available per year: the whole year, or its replay-buffer subset size."""
    buffered: list[str]
    """Years drawn from a fixed replay buffer of pool[y] samples (YearShards.subset)."""
    quotas: dict[str, int]
    """Samples this step draws from each year (sum = samples)."""
    samples: int
    steps: int
    warmup: int
    lr: float
    init: str
    """'previous' (warm start) or 'scratch'."""

    def weights(self) -> dict[str, float]:
        return {y: q / self.samples for y, q in self.quotas.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    strategy: str
    steps: list[YearStep] = field(default_factory=list)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "steps": [s.to_dict() for s in self.steps]}


def apportion(total: int, weights: Mapping[str, float], multiple: int = 1) -> dict[str, int]:
    """Integers proportional to `weights`, each a multiple of `multiple`, summing exactly to `total`.

    Largest remainder in exact arithmetic, ties to the earlier key: the one quota rule of the
    planner (a step's per-year samples) and the sampler (the same split in whole stream units).
    """
    if total % multiple:
        raise ValueError(f"apportion: total {total} is not a multiple of {multiple}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"apportion: weights must be non-negative with a positive sum, got {dict(weights)}")
    keys, units = list(weights), total // multiple
    norm = sum(Fraction(w) for w in weights.values())
    exact = [Fraction(weights[k]) * units / norm for k in keys]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(keys)), key=lambda i: (out[i] - exact[i], i))
    for i in by_remainder[: units - sum(out)]:
        out[i] += 1
    return {k: q * multiple for k, q in zip(keys, out)}


def group_years(years: list[str], first_step_years: int) -> list[list[str]]:
    """TiC groups the first years into one step (2014-2016), then one year per step."""
    if first_step_years > len(years):
        raise ConfigError(f"plan.first_step_years: {first_step_years} exceeds the {len(years)} years of the plan")
    return [years[:first_step_years]] + [[y] for y in years[first_step_years:]]


def buffer_sizes(old: list[str], sizes: Mapping[str, int], capacity: int, split: str) -> dict[str, int]:
    """TiC replay buffer over old years (oldest first in `old`): exp = D/2, D/4 ... newest first;
    equal = D / (old years) each; size = D in proportion to the years' sizes (a uniform sample of
    everything seen, as reservoir sampling keeps: ER's shared memory)."""
    if not old:
        return {}
    if split == "equal":
        share = {y: capacity // len(old) for y in old}
    elif split == "size":
        share = apportion(capacity, {y: sizes[y] for y in old})
    else:
        share = {y: capacity >> (i + 1) for i, y in enumerate(reversed(old))}
    return {y: min(share[y], sizes[y]) for y in old}


def _pool(strategy: str, cfg: Config, new: list[str], old: list[str], sizes: Mapping[str, int]):
    """Samples available per year for a step, and which years are buffer subsets."""
    whole = {y: sizes[y] for y in new}
    if strategy == "sequential":
        return whole, []
    if strategy in ("cumulative-all", "restart"):
        return {**{y: sizes[y] for y in old}, **whole}, []
    capacity = cfg.plan.buffer_samples or sum(whole.values())
    split = {"cumulative-exp": "exp", "cumulative-equal": "equal"}.get(strategy, cfg.plan.buffer_split)
    buffers = {y: n for y, n in buffer_sizes(old, sizes, capacity, split).items() if n > 0}
    partial = [y for y, n in buffers.items() if n < sizes[y]]
    return {**buffers, **whole}, partial


def make_plan(cfg: Config, sizes: Mapping[str, int], years: list[str] | None = None) -> Plan:
    """The plan for `cfg.plan.strategy` over `years` (default: cfg.plan.years or all of `sizes`)."""
    years = list(years or cfg.plan.years or sorted(sizes))
    missing = [y for y in years if y not in sizes]
    if missing:
        raise ConfigError(f"plan.years: {', '.join(missing)} not in the data (found {', '.join(sorted(sizes))})")
    strategy = cfg.plan.strategy
    batch = cfg.train.global_batch
    plan = Plan(strategy)
    for k, new in enumerate(group_years(years, cfg.plan.first_step_years)):
        old = years[: years.index(new[0])]
        pool, buffered = _pool(strategy, cfg, new, old, sizes)
        budget = cfg.train.samples or sum(pool.values())
        if strategy == "restart" and cfg.plan.restart_budget == "grow":
            budget *= k + 1
        steps = budget // batch
        if steps < 1:
            raise ConfigError(
                f"train.samples: step {k} ({new[-1]}) has {budget} samples, fewer than one global batch of {batch}"
            )
        samples = steps * batch
        warmup = cfg.optim.warmup_steps
        scratch = k == 0 or strategy == "restart"
        if k == 0 and cfg.plan.warmup_first >= 0:
            warmup = cfg.plan.warmup_first
        plan.steps.append(
            YearStep(
                index=k,
                tag=new[-1],
                new_years=list(new),
                pool=pool,
                buffered=buffered,
                quotas=apportion(samples, pool),
                samples=samples,
                steps=steps,
                warmup=min(warmup, steps),
                # A warm start re-warms to a lower peak each year when optim.year_lr_decay < 1.
                lr=cfg.optim.lr * (1.0 if scratch else cfg.optim.year_lr_decay**k),
                init="scratch" if scratch else "previous",
            )
        )
    return plan


def select_steps(plan: Plan, years: str) -> list[YearStep]:
    """The steps `--years` asks for ('' = all), matched on step tags (trainer/years.py has the syntax)."""
    if not years:
        return list(plan.steps)
    chosen = set(select(years, [s.tag for s in plan.steps], "step of the plan"))
    return [s for s in plan.steps if s.tag in chosen]
