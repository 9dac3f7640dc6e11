"""Budget planner: a continual strategy and a compute budget become a list of YearStep."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from trainer.config import Config, ConfigError


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
    """Years drawn from a fixed subset (the first pool[y] samples of its canonical order)."""
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


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Integers proportional to `weights` that sum exactly to `total` (largest remainder)."""
    keys = list(weights)
    norm = sum(weights.values())
    if norm <= 0:
        raise ValueError("apportion: weights must have a positive sum")
    exact = [total * weights[k] / norm for k in keys]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(keys)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return dict(zip(keys, out))


def group_years(years: list[str], first_step_years: int) -> list[list[str]]:
    """TiC groups the first years into one step (2014-2016), then one year per step."""
    if first_step_years > len(years):
        raise ConfigError(
            f"plan.first_step_years: {first_step_years} exceeds the {len(years)} years of the plan"
        )
    return [years[:first_step_years]] + [[y] for y in years[first_step_years:]]


def buffer_sizes(old: list[str], sizes: Mapping[str, int], capacity: int, split: str) -> dict[str, int]:
    """TiC replay buffer over old years (oldest first in `old`): exp = D/2, D/4 ... newest first."""
    if not old:
        return {}
    if split == "equal":
        share = {y: capacity // len(old) for y in old}
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
                f"train.samples: step {k} ({new[-1]}) has {budget} samples, fewer than one "
                f"global batch of {batch}"
            )
        samples = steps * batch
        warmup = cfg.optim.warmup_steps
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
                lr=cfg.optim.lr,
                init="scratch" if k == 0 or strategy == "restart" else "previous",
            )
        )
    return plan


def select_steps(plan: Plan, years: str) -> list[YearStep]:
    """The steps `--years` asks for: '2019..2022', '2019,2021' or '' (all), matched on step tags."""
    if not years:
        return list(plan.steps)
    tags = [s.tag for s in plan.steps]
    if ".." in years:
        lo, _, hi = years.partition("..")
        chosen = [s for s in plan.steps if (not lo or s.tag >= lo) and (not hi or s.tag <= hi)]
    else:
        wanted = {y.strip() for y in years.split(",")}
        unknown = sorted(wanted - set(tags))
        if unknown:
            raise ConfigError(f"--years: {', '.join(unknown)} is not a step of the plan (steps: {', '.join(tags)})")
        chosen = [s for s in plan.steps if s.tag in wanted]
    if not chosen:
        raise ConfigError(f"--years: {years} selects no step of the plan (steps: {', '.join(tags)})")
    return chosen
