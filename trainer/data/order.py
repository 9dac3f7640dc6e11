"""A year's global sample order: per pass a seeded shard shuffle, dealt to lanes, read round-robin.

Position i of year y (i = 0, 1, 2, ... without end) lies in pass p = i // N_y. Pass p shuffles the
year's shards with seed stable_hash(seed, year, p) and deals them to G = min(lanes, shards) lanes:
lane g gets shuffled shards g, g+G, g+2G, ... The pass is the round-robin interleave of the
lanes: round k takes element k of every lane longer than k. Lanes take their turn in each round
longest first (ties by lane number), so the lanes still active in round k are always a prefix;
that makes position -> (shard, member) two binary searches instead of an enumeration, which
matters when a year holds a billion positions.

Within a lane, its shards form blocks of `block` (data.shuffle_shards) consecutive ones, and a
block's samples come in a random interleave of its shards, seeded by (seed, year, pass, block):
each shard is still read forward, once per pass, but neighbouring draws come from `block`
different shards at random. With block 1 a lane reads its shards one after another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def stable_hash(*parts: object) -> int:
    """A 63-bit hash of the parts that is the same in every process, run and machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Located:
    """Where positions of a year live: arrays of pass, ranked lane, shard index and member index."""

    passes: np.ndarray
    lanes: np.ndarray
    shards: np.ndarray
    members: np.ndarray


@dataclass(frozen=True)
class _Pass:
    index: int
    shards: np.ndarray  # shard indices, lane by lane (ranked lanes), each lane in reading order
    starts: np.ndarray  # sample offset (in the concatenation above) where each shard begins
    lane_start: np.ndarray  # sample offset where each ranked lane begins
    bounds: np.ndarray  # in-pass position where the j-th stretch of equally many lanes begins
    rounds: np.ndarray  # first round of the j-th stretch
    lanes: int
    block_first: np.ndarray  # index into `shards` of each block's first shard
    block_start: np.ndarray  # sample offset (in the concatenation) where each block begins


class YearOrder:
    """The infinite global sample order O_y of one year; see the module docstring."""

    def __init__(self, year: str, sizes: np.ndarray, lanes: int, seed: int, block: int = 1) -> None:
        if lanes < 1 or block < 1:
            raise ValueError(f"lanes and block must be at least 1, got {lanes} and {block}")
        self.year = year
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.size = int(self.sizes.sum())
        self.lanes = min(lanes, len(self.sizes))
        self.seed = seed
        self.block = block
        self._cache: dict[int, _Pass] = {}
        self._blocks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def shuffle(self, p: int) -> np.ndarray:
        """Pass p's shard permutation."""
        rng = np.random.default_rng(stable_hash(self.seed, self.year, p))
        return rng.permutation(len(self.sizes))

    def _pass(self, p: int) -> _Pass:
        if p not in self._cache:
            # Readers only move forward, so the previous pass is the only other one worth keeping.
            self._cache = {q: v for q, v in self._cache.items() if q == p - 1}
            self._cache[p] = self._build(p)
        return self._cache[p]

    def _build(self, p: int) -> _Pass:
        g, perm = self.lanes, self.shuffle(p)
        lane_of = np.arange(len(perm)) % g
        lengths = np.bincount(lane_of, weights=self.sizes[perm], minlength=g).astype(np.int64)
        ranked = np.argsort(-lengths, kind="stable")
        rank_of = np.empty(g, dtype=np.int64)
        rank_of[ranked] = np.arange(g)
        shards = perm[np.lexsort((np.arange(len(perm)), rank_of[lane_of]))]
        ends = np.cumsum(self.sizes[shards])
        starts = ends - self.sizes[shards]
        by_rank = lengths[ranked]
        lane_start = np.concatenate(([0], np.cumsum(by_rank)[:-1]))
        ascending = by_rank[::-1]
        rounds = np.concatenate(([0], ascending[:-1]))
        stretch = (ascending - rounds) * (g - np.arange(g))
        bounds = np.concatenate(([0], np.cumsum(stretch)))
        per_lane = np.bincount(rank_of[lane_of], minlength=g)
        lane_first = np.concatenate(([0], np.cumsum(per_lane)[:-1]))
        block_first = np.concatenate(
            [np.arange(f, f + n, self.block) for f, n in zip(lane_first.tolist(), per_lane.tolist())]
        ).astype(np.int64)
        return _Pass(p, shards, starts, lane_start, bounds, rounds, g, block_first, starts[block_first])

    def _block(self, t: _Pass, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b of pass t: for each of its samples in order, the shard (index into t.shards) and member."""
        key = (t.index, b)
        if key not in self._blocks:
            if len(self._blocks) >= 16:  # a stream reads a few blocks at a time (lanes, passes)
                del self._blocks[next(iter(self._blocks))]
            first = int(t.block_first[b])
            last = int(t.block_first[b + 1]) if b + 1 < len(t.block_first) else len(t.shards)
            # A block never spans two lanes: lanes start on a multiple of `block` within themselves.
            last = min(last, first + self.block)
            sizes = self.sizes[t.shards[first:last]]
            labels = np.repeat(np.arange(first, last), sizes)
            if last - first > 1:
                labels = np.random.default_rng(stable_hash(self.seed, self.year, t.index, b)).permutation(labels)
            order = np.argsort(labels, kind="stable")
            member = np.empty(len(labels), dtype=np.int64)
            member[order] = np.arange(len(labels)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            self._blocks[key] = (labels, member)
        return self._blocks[key]

    def locate(self, positions: np.ndarray) -> Located:
        """Map global positions (any order, any passes) to pass, lane, shard and member."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.size == 0:
            raise ValueError(f"year {self.year} has no samples to order")
        passes, offsets = np.divmod(positions, self.size)
        lanes = np.empty_like(positions)
        shards = np.empty_like(positions)
        members = np.empty_like(positions)
        for p in np.unique(passes):
            sel = passes == p
            lanes[sel], shards[sel], members[sel] = self._locate_in_pass(self._pass(int(p)), offsets[sel])
        return Located(passes, lanes, shards, members)

    def _locate_in_pass(self, t: _Pass, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = np.searchsorted(t.bounds, i, side="right") - 1
        active = t.lanes - j
        rnd, lane = np.divmod(i - t.bounds[j], active)
        x = t.lane_start[lane] + t.rounds[j] + rnd
        if self.block == 1:
            k = np.searchsorted(t.starts, x, side="right") - 1
            return lane, t.shards[k], x - t.starts[k]
        b = np.searchsorted(t.block_start, x, side="right") - 1
        shard, member = np.empty_like(x), np.empty_like(x)
        for block in np.unique(b).tolist():
            sel = b == block
            labels, members = self._block(t, block)
            at = x[sel] - t.block_start[block]
            shard[sel], member[sel] = t.shards[labels[at]], members[at]
        return lane, shard, member
