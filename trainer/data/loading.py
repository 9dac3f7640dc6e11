"""The data of one plan step: the step's quotas -> rehearsal sampler -> the rank's DataLoader, resumably."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

from torch.utils.data import DataLoader

from trainer.config import Config, ConfigError, accumulation_steps
from trainer.data.pipeline import StreamDataset, Transform, build_loader
from trainer.data.rehearsal import RehearsalSampler, stream_count, streams_per_rank
from trainer.data.shards import YearShards
from trainer.distributed import DistInfo
from trainer.errors import UserError
from trainer.plan import YearStep, apportion


class RankLoader:
    """The rank's DataLoader, iterated so that an error in a worker ends the workers and reads as itself.

    torch re-raises a worker's exception in the rank as the same type, its message grown by the
    worker's traceback, and leaves the iterator in a reference cycle: its workers, which ignore
    SIGTERM (build_loader), would keep the rank from exiting. So the iterator is shut down here
    and a UserError keeps only its own one-line message.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.loader)
        try:
            yield from batches
        except UserError as e:
            message = worker_message(e)
            if message == str(e):
                raise
            raise type(e)(message) from None
        finally:
            # A private method, but the one torch's own __del__ calls; absent without workers.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def worker_message(error: BaseException) -> str:
    """The message `error` was raised with in a DataLoader worker, without torch's traceback around it."""
    text = str(error)
    kind = type(error)
    if text.startswith(f"Caught {kind.__name__} in DataLoader worker"):
        # torch's message ends with the worker's traceback, whose last entry is "module.Type: message".
        _, found, original = text.rpartition(f"\n{kind.__module__}.{kind.__qualname__}: ")
        if found:
            return original.strip()
    return text


class StepData:
    """A plan step's loader and where this rank stands in it; Stateful as the sampler's global state.

    `batches` is the count of micro-batches per rank the loop has consumed in the step; it says
    which sampler state `state_dict` returns.
    """

    def __init__(self, loader: DataLoader, dataset: StreamDataset, dist: DistInfo, workers: int) -> None:
        self.loader, self.dataset, self.dist, self.workers = RankLoader(loader), dataset, dist, workers
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(self.batches)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state (before the loader is iterated), re-split for this world and workers."""
        self.dataset.sampler.load_state_dict(state, self.dist.world_size, self.workers)
        self.dataset.check_sampler()

    def cursors(self) -> dict[str, int]:
        """Per year, its cursor plus the samples drawn in the consumed batches: where the next plan step reads on."""
        return self.dataset.sampler.cursors(self.batches * self.dataset.micro_batch * self.dist.world_size)

    def at_stream_boundary(self) -> bool:
        """Every worker stream has delivered the same count: the sampler's state is a point of its segment."""
        return self.batches % streams_per_rank(self.workers) == 0


def step_data(
    cfg: Config,
    dist: DistInfo,
    step: YearStep,
    shards: Mapping[str, YearShards],
    preprocess: Callable[..., Any],
    tokenizer: Callable[..., Any],
    start: Mapping[str, int] | None = None,
    views: Mapping[str, Transform] | None = None,
    buffers: Mapping[str, YearShards] | None = None,
) -> StepData:
    """The data of `step`, reading each year on from cursors `start` (load a saved state to resume instead).

    `buffers` gives the replay buffers of years whose buffer is not a hash sample (exemplar memories)."""
    workers = cfg.data.workers
    streams = stream_count(dist.world_size, workers)
    if step.samples % streams:
        raise ConfigError(
            f"data.workers: step {step.tag} has {step.samples} samples, not divisible over "
            f"{dist.world_size} ranks x {streams_per_rank(workers)} workers"
        )
    # Every stream draws whole samples, so a year's quota is exact when it is a multiple of S.
    quotas = apportion(step.samples, step.quotas, multiple=streams)
    given = buffers or {}
    pools = {
        y: given[y]
        if y in given
        else shards[y].subset(step.pool[y], cfg.train.seed, y, _by(cfg))
        if y in step.buffered
        else shards[y]
        for y in quotas
    }
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
        shuffle_shards=cfg.data.shuffle_shards,
        micro=cfg.train.micro_batch,
        accum=accumulation_steps(cfg, dist.world_size),
    )
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
        views=views,
    )
    return StepData(build_loader(dataset, cfg.data.prefetch_factor), dataset, dist, workers)


def _by(cfg: Config) -> Literal["samples", "shards"]:
    """How a hash buffer is cut (exemplar memories come through `buffers`)."""
    if cfg.plan.buffer_select not in ("samples", "shards"):
        raise ValueError(f"plan.buffer_select={cfg.plan.buffer_select}: the step's memories were not given")
    return cfg.plan.buffer_select
