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


def _read(shards: YearShards, wanted: np.ndarray, preprocess: Preprocess) -> Iterator[tuple[int, Item | str]]:
    """(position, sample) for the canonical positions `wanted` (sorted), in that order; a sample is an
    Item or why it is unusable."""
    want = set(wanted.tolist())
    by_shard: dict[int, dict[int, int]] = {}
    for pos, (index, member) in enumerate(_positions(shards)):
        if pos in want:
            by_shard.setdefault(index, {})[member] = pos
    for index, need in sorted(by_shard.items()):
        url = shards.url(index)
        done = 0
        try:
            with open_shard(url) as f:
                for member, sample in enumerate(iter_samples(url, f)):
                    if member in need:
                        done += 1
                        yield need[member], decode(sample, preprocess, seed=0)
                        if done == len(need):
                            break
        except (DataError, OSError, ValueError) as e:  # a damaged shard: its rest counts as missing
            log.warning("%s: %s", url, e)
        for pos in sorted(need.values())[done:]:
            yield pos, "missing"


def sample_shards(spec: PassSpec) -> list[YearShards]:
    """The spec's sample: each year's share (equal shares over its years) of smallest key hash."""
    per_year = apportion(spec.samples, {y: 1.0 for y in spec.years})
    return [year_sample(spec.root, y, per_year[y], spec.seed) for y in spec.years if per_year[y]]


def positions(shards: YearShards) -> list[tuple[str, int]]:
    """(shard name, member) of every sample of `shards` in canonical order."""
    return [(shards.names[index], member) for index, member in _positions(shards)]


def rank_batches(
    spec: PassSpec,
    dist: DistInfo,
    preprocess: Preprocess,
    tokenizer: Callable[[list[str]], torch.Tensor],
    whole: bool = False,
) -> Iterator[dict[str, Any]]:
    """This rank's part of the spec's sample in batches of `spec.batch`: image, text, key, index.

    By default every global batch split by rows over the ranks (a loss over the batch). With
    `whole`, batch b whole on rank b mod world (embeddings: each sample is then encoded in the
    same batch on any number of ranks, so its features are the same bits); the last batch may
    then be short, and `index` says which batch it is.
    """
    if not whole and spec.batch % dist.world_size:
        raise DataError(f"a year-end pass batch of {spec.batch} does not split over {dist.world_size} ranks")
    shards = sample_shards(spec)
    total = sum(s.samples for s in shards)
    if whole:
        batches = -(-total // spec.batch)
        mine = [b for b in range(batches) if b % dist.world_size == dist.rank]
        own = np.array(
            [p for b in mine for p in range(b * spec.batch, min((b + 1) * spec.batch, total))], dtype=np.int64
        )
        sizes = [min((b + 1) * spec.batch, total) - b * spec.batch for b in mine]
        yield from _batches(spec, shards, own, sizes, mine, preprocess, tokenizer, dist.rank)
        return
    batches = total // spec.batch
    if batches == 0:
        raise DataError(f"years {spec.years}: {total} samples, fewer than one year-end pass batch of {spec.batch}")
    share = spec.batch // dist.world_size
    own = (np.arange(batches)[:, None] * spec.batch + dist.rank * share + np.arange(share)[None, :]).ravel()
    yield from _batches(spec, shards, own, [share] * batches, list(range(batches)), preprocess, tokenizer, dist.rank)


def _batches(
    spec: PassSpec,
    shards: list[YearShards],
    own: np.ndarray,
    sizes: list[int],
    indices: list[int],
    preprocess: Preprocess,
    tokenizer: Callable[[list[str]], torch.Tensor],
    rank: int,
) -> Iterator[dict[str, Any]]:
    """The samples at positions `own` (sorted) of the concatenated `shards`, cut into batches of `sizes`."""
    rows: list[tuple[int, Item | None]] = []
    offset = 0
    for s in shards:
        mine = own[(own >= offset) & (own < offset + s.samples)] - offset
        rows += [(pos + offset, got if not isinstance(got, str) else None) for pos, got in _read(s, mine, preprocess)]
        offset += s.samples
    good = [item for _, item in rows if item is not None]
    if len(good) < len(rows):
        if not good:
            raise DataError(f"years {spec.years}: no readable sample for the year-end pass on rank {rank}")
        log.warning(
            "year-end pass: %d unreadable samples on rank %d, each replaced by a readable one (and not selectable)",
            len(rows) - len(good),
            rank,
        )
    at = 0
    for index, size in zip(indices, sizes):
        part = rows[at : at + size]
        at += size
        items = [item if item is not None else good[i % len(good)] for i, (_, item) in enumerate(part)]
        yield {
            "image": torch.stack([r.image for r in items]),
            "text": tokenizer([r.caption for r in items]),
            "key": [r.key for r in items],
            "position": [pos for pos, _ in part],
            "valid": [item is not None for _, item in part],
            "index": index,
        }
