"""A year's global sample order: per pass a seeded shard shuffle, dealt to lanes, read round-robin.

Position i of year y (i = 0, 1, 2, ... without end) lies in pass p = i // N_y. Pass p shuffles the
year's shards with seed stable_hash(seed, year, p) and deals them to G = min(lanes, shards) lanes:
lane g gets shuffled shards g, g+G, g+2G, ... and reads them one after another in file order. The
pass is the round-robin interleave of the lanes: round k takes element k of every lane longer
than k. Lanes take their turn in each round longest first (ties by lane number), so the lanes
still active in round k are always a prefix; that makes position -> (shard, member) two binary
searches instead of an enumeration, which matters when a year holds a billion positions.
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
    shards: np.ndarray  # shard indices, lane by lane (ranked lanes), each lane in reading order
    starts: np.ndarray  # sample offset (in the concatenation above) where each shard begins
    lane_start: np.ndarray  # sample offset where each ranked lane begins
    bounds: np.ndarray  # in-pass position where the j-th stretch of equally many lanes begins
    rounds: np.ndarray  # first round of the j-th stretch
    lanes: int


class YearOrder:
    """The infinite global sample order O_y of one year; see the module docstring."""

    def __init__(self, year: str, sizes: np.ndarray, lanes: int, seed: int) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.year = year
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.size = int(self.sizes.sum())
        self.lanes = min(lanes, len(self.sizes))
        self.seed = seed
        self._cache: dict[int, _Pass] = {}

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
        by_rank = lengths[ranked]
        lane_start = np.concatenate(([0], np.cumsum(by_rank)[:-1]))
        ascending = by_rank[::-1]
        rounds = np.concatenate(([0], ascending[:-1]))
        stretch = (ascending - rounds) * (g - np.arange(g))
        bounds = np.concatenate(([0], np.cumsum(stretch)))
        return _Pass(shards, ends - self.sizes[shards], lane_start, bounds, rounds, g)

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

    @staticmethod
    def _locate_in_pass(t: _Pass, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = np.searchsorted(t.bounds, i, side="right") - 1
        active = t.lanes - j
        rnd, lane = np.divmod(i - t.bounds[j], active)
        x = t.lane_start[lane] + t.rounds[j] + rnd
        k = np.searchsorted(t.starts, x, side="right") - 1
        return lane, t.shards[k], x - t.starts[k]
