"""A fixed sample of a year's training data in global batches, for passes at a year's end (a Fisher).

The sample is the year's `n` samples of smallest key hash (the replay buffers' rule,
data/buffers.py: spread over every shard, nested, chosen without reading a shard), in canonical
order: picked shards sorted by name, members in file order. Batch b is positions [bB, (b+1)B) of
that order, and rank r of W reads rows [rB/W, (r+1)B/W) of every batch, so each global batch holds
the same samples on any number of ranks. Images get the eval transform (no augmentation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.data.pipeline import Item, decode
from trainer.data.shards import DataError, YearShards, find_years, iter_samples, open_shard
from trainer.distributed import DistInfo
from trainer.layout import TRAIN
from trainer.plan import apportion

log = logging.getLogger("tic")

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class PassSpec:
    """Which samples a year-end pass reads: `samples` in all from `years`, in global batches of `batch`."""

    root: str
    years: list[str]
    samples: int
    batch: int
    seed: int


def year_sample(root: str, year: str, samples: int, seed: int) -> YearShards:
    """The year's `samples` of smallest key hash (all of it when it holds no more)."""
    shards = find_years(root, TRAIN, [year])[year]
    return shards if samples >= shards.samples else shards.subset(samples, seed, year)


def _positions(shards: YearShards) -> Iterator[tuple[int, int]]:
    """(shard index, member) of every sample in canonical order."""
    for index in range(len(shards)):
        for k in range(int(shards.sizes[index])):
            yield index, shards.member(index, k)


def _read(shards: YearShards, wanted: np.ndarray, preprocess: Preprocess) -> Iterator[Item | str]:
    """The samples at canonical positions `wanted` (sorted), each an Item or why it is unusable."""
    want = set(wanted.tolist())
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for pos, (index, member) in enumerate(_positions(shards)):
        if pos in want:
            by_shard.setdefault(index, []).append((member, pos))
    for index, members in sorted(by_shard.items()):
        url = shards.url(index)
        need = dict(members)
        got = 0
        try:
            with open_shard(url) as f:
                for member, sample in enumerate(iter_samples(url, f)):
                    if member in need:
                        got += 1
                        yield decode(sample, preprocess, seed=0)
                        if got == len(need):
                            break
        except (DataError, OSError, ValueError) as e:  # a damaged shard: its rest counts as missing
            log.warning("%s: %s", url, e)
        yield from ["missing"] * (len(need) - got)


def rank_batches(
    spec: PassSpec, dist: DistInfo, preprocess: Preprocess, tokenizer: Callable[[list[str]], torch.Tensor]
) -> Iterator[dict[str, Any]]:
    """This rank's rows of every whole global batch of the spec's sample: image, text, key."""
    if spec.batch % dist.world_size:
        raise DataError(f"a year-end pass batch of {spec.batch} does not split over {dist.world_size} ranks")
    per_year = apportion(spec.samples, {y: 1.0 for y in spec.years})
    shards = [year_sample(spec.root, y, per_year[y], spec.seed) for y in spec.years if per_year[y]]
    total = sum(s.samples for s in shards)
    batches = total // spec.batch
    if batches == 0:
        raise DataError(f"years {spec.years}: {total} samples, fewer than one year-end pass batch of {spec.batch}")
    share = spec.batch // dist.world_size
    own = (np.arange(batches)[:, None] * spec.batch + dist.rank * share + np.arange(share)[None, :]).ravel()
    items: list[Item] = []
    bad = 0
    offset = 0
    for s in shards:
        mine = own[(own >= offset) & (own < offset + s.samples)] - offset
        for got in _read(s, mine, preprocess):
            if isinstance(got, str):
                bad += 1
            else:
                items.append(got)
        offset += s.samples
    if bad:
        if not items:
            raise DataError(f"years {spec.years}: no readable sample for the year-end pass on rank {dist.rank}")
        log.warning("year-end pass: %d unreadable samples on rank %d, each replaced by a readable one", bad, dist.rank)
        items += [items[i % len(items)] for i in range(bad)]
    for b in range(batches):
        rows = items[b * share : (b + 1) * share]
        yield {
            "image": torch.stack([r.image for r in rows]),
            "text": tokenizer([r.caption for r in rows]),
            "key": [r.key for r in rows],
        }
