"""Replay buffers by sample hash: the samples of a year with the smallest hashes, found from shard sizes.

Sample `member` of shard `name` of `year` hashes to splitmix64(key + member x golden), key =
stable_hash(seed, year, name): a function of the sample's place in the year, never of its
bytes, so choosing a buffer reads no shard. A buffer of P samples is the P smallest by (hash,
shard, member): exactly P, spread evenly over every shard of the year whatever order the shards
were written in, and nested (a smaller buffer of a later step lies inside a larger one), as
TiC-CLIP's shrinking buffers are. The P-th smallest is found in two passes over the hashes, a
few million at a time: a histogram of their top bits, then the one bucket that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.order import stable_hash

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 22  # samples hashed per numpy call


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (numpy wraps arrays modulo 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shard_keys(names: Sequence[str], seed: int, year: str) -> np.ndarray:
    """Each shard's hash key (uint64)."""
    return np.array([stable_hash(seed, year, n) for n in names], dtype=np.uint64)


def sample_hashes(key: np.uint64, members: np.ndarray) -> np.ndarray:
    """The hashes of `members` of the shard with hash key `key`."""
    return _mix(np.uint64(key) + members.astype(np.uint64) * _GOLDEN)


@dataclass(frozen=True)
class Cut:
    """The largest (hash, shard, member) a buffer keeps; shard is an index into the whole year."""

    hash: int
    shard: int
    member: int

    def keeps(self, shard: np.ndarray, member: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Which samples (parallel arrays) the buffer holds."""
        h = np.uint64(self.hash)
        tie_first = (shard < self.shard) | ((shard == self.shard) & (member <= self.member))
        return (hashes < h) | ((hashes == h) & tie_first)


def _chunks(keys: np.ndarray, sizes: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(shard, member, hash) arrays over every sample of the year, a few million at a time."""
    ends = np.cumsum(sizes)
    first = 0
    while first < len(sizes):
        base = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + _CHUNK, side="right")))
        shards = np.arange(first, last)
        counts = sizes[first:last]
        shard = np.repeat(shards, counts)
        starts = np.repeat(ends[first:last] - counts - base, counts)
        member = np.arange(len(shard), dtype=np.int64) - starts
        yield shard, member, _mix(keys[shard] + member.astype(np.uint64) * _GOLDEN)
        first = last


def choose(keys: np.ndarray, sizes: np.ndarray, samples: int, bits: int = 20) -> tuple[Cut, np.ndarray]:
    """The cut of the `samples` smallest and how many each shard keeps; `bits` sizes the histogram."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 < samples <= total:
        raise ValueError(f"a buffer of {samples} from {total} samples")
    shift = np.uint64(64 - bits)
    hist = np.zeros(1 << bits, dtype=np.int64)
    for _, _, h in _chunks(keys, sizes):
        hist += np.bincount((h >> shift).astype(np.int64), minlength=1 << bits)
    cumulative = np.cumsum(hist)
    bucket = int(np.searchsorted(cumulative, samples))
    below = int(cumulative[bucket - 1]) if bucket else 0
    counts = np.zeros(len(sizes), dtype=np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for shard, member, h in _chunks(keys, sizes):
        top = (h >> shift).astype(np.int64)
        counts += np.bincount(shard[top < bucket], minlength=len(sizes))
        at = top == bucket
        found.append((h[at], shard[at], member[at]))
    h, shard, member = (np.concatenate(parts) for parts in zip(*found))
    order = np.lexsort((member, shard, h))[: samples - below]
    counts += np.bincount(shard[order], minlength=len(sizes))
    last = order[-1]
    return Cut(int(h[last]), int(shard[last]), int(member[last])), counts


@dataclass(frozen=True)
class Pick:
    """Which members of each kept shard a buffer holds: kept[i] is the year's shard behind buffer
    shard i, of `sizes[i]` members."""

    cut: Cut
    kept: np.ndarray
    keys: np.ndarray
    sizes: np.ndarray

    def members(self, index: int) -> np.ndarray:
        """The member indices (in file order) buffer shard `index` holds."""
        member = np.arange(int(self.sizes[index]), dtype=np.int64)
        shard = np.full(len(member), int(self.kept[index]))
        return np.flatnonzero(self.cut.keeps(shard, member, sample_hashes(self.keys[index], member)))


@dataclass(frozen=True)
class Listed:
    """Members of each shard listed one by one (an exemplar memory, trainer/exemplars.py)."""

    lists: list[np.ndarray]

    def members(self, index: int) -> np.ndarray:
        """The member indices (in file order) shard `index` contributes."""
        return self.lists[index]
