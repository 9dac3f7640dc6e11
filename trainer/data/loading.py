"""The DataLoader of one plan step: the step's quotas -> rehearsal sampler -> rank's batches."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from torch.utils.data import DataLoader

from trainer.config import Config, ConfigError
from trainer.data.pipeline import StreamDataset, build_loader
from trainer.data.rehearsal import RehearsalSampler, split_quotas
from trainer.data.shards import YearShards
from trainer.distributed import DistInfo
from trainer.plan import YearStep


def step_loader(
    cfg: Config,
    dist: DistInfo,
    step: YearStep,
    shards: Mapping[str, YearShards],
    preprocess: Callable[..., Any],
    tokenizer: Callable[..., Any],
    start: Optional[Mapping[str, int]] = None,
    state: Optional[Mapping[str, Any]] = None,
) -> tuple[DataLoader, StreamDataset]:
    """Loader for `step`, fresh from per-year cursors `start` or resumed from a sampler `state`."""
    workers = cfg.data.workers
    streams = dist.world_size * max(workers, 1)
    if step.samples % streams:
        raise ConfigError(
            f"data.workers: step {step.tag} has {step.samples} samples, not divisible over "
            f"{dist.world_size} ranks x {max(workers, 1)} workers"
        )
    # Every stream draws whole samples, so a year's quota is exact when it is a multiple of S.
    quotas = split_quotas(step.quotas, step.samples, multiple=streams)
    pools = {y: shards[y].subset(step.pool[y], cfg.train.seed, y) if y in step.buffered else shards[y] for y in quotas}
    if start is not None:
        # A buffer is its own small order, read from its start; whole years read on.
        start = {y: c for y, c in start.items() if y not in step.buffered}
    sampler = RehearsalSampler(
        pools,
        quotas,
        seed=cfg.train.seed,
        world=dist.world_size,
        workers=workers,
        lanes=cfg.data.lanes,
        step=step.index,
        start=start,
    )
    if state is not None:
        sampler.load_state_dict(state, dist.world_size, workers)
    dataset = StreamDataset(
        sampler,
        rank=dist.rank,
        world=dist.world_size,
        workers=workers,
        micro_batch=cfg.train.micro_batch,
        preprocess=preprocess,
        tokenizer=tokenizer,
        seed=cfg.train.seed,
        max_bad_frac=cfg.data.max_bad_frac,
    )
    return build_loader(dataset, cfg.data.prefetch_factor), dataset
