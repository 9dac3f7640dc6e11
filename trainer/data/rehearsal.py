"""The streaming rehearsal sampler: which (year, position) every rank/worker stream reads, resumably.

A plan step draws `total` samples from years with integer quotas over S = world x max(workers, 1)
streams (stream s = rank x max(workers, 1) + worker), n = total / S draws each.

Years. Each year's quota is split over the streams: a_y = quota // S draws of year y for every
stream, and the b_y = quota % S left over go one each to streams o_y .. o_y + b_y - 1 (mod S),
o_y being the sum of the earlier years' b (mod S); the b_y sum to a multiple of S, so every
stream gets the same count e of these extras. A stream draws its a_y's in a cyclic
earliest-deadline (Pfair) schedule Y of period sum(a), whose counts over any window are within
2 of weight x length, starting at its own rotation beta_s, then its extras in year order.

Rotation. The global batch of an optimizer step is a micro-batch of consecutive draws from every
rank's batches; rank batch t comes from worker t % W. The rotation of stream (rank r, worker w)
is beta = (w x world + r) x micro x accum // W, so that the streams' windows of one optimizer step
tile one window of Y of length global batch when W divides accum or accum divides W (with workers
0 or 1, always): every year's count in every global batch is then within 2 of its weight x the
global batch, on any number of ranks. Otherwise the windows overlap by part of a micro-batch
(benchmarks/batch_mix.py measures the spread).

Positions. Each year's draws of the step are indices 0 .. R_y - 1 of the year's index space: the
j-th draw of year y by stream s is index j x S + (s - o_y) mod S, so the streams' draws are
disjoint and together exactly R_y. An index space is the year's global order (order.py) from the
step's cursor on; after a re-split it starts with an explicit list of the positions a mid-step
state left unread. When the step ends every year has read exactly its quota from its cursor on.

A segment is the stretch of a step run with one stream layout. Resuming with the same layout
continues the segment exactly; otherwise a new segment starts over exactly the unread positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from trainer.data.order import YearOrder
from trainer.data.shards import DataError, YearShards

log = logging.getLogger(__name__)

_CHUNK = 1024  # slots scheduled and located per numpy call


def streams_per_rank(workers: int) -> int:
    """A rank reads one stream per DataLoader worker, or one in its own process when workers = 0."""
    return max(workers, 1)


def stream_count(world: int, workers: int) -> int:
    """S, the number of independent sample streams of a run: ranks x streams per rank."""
    return world * streams_per_rank(workers)


class Schedule:
    """Earliest-deadline interleave of years with integer weights (a uniprocessor Pfair schedule)."""

    # Draw j of year y may happen in slots [floor(j W / w), ceil((j+1) W / w)); earliest deadline
    # first meets every window when the weights sum to W (Baruah et al. 1996), which is exactly
    # |count - w N / W| < 1 after every N. The plain largest-deficit rule has no such guarantee.
    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self.total = sum(self.weights)
        self.active = [y for y, w in enumerate(self.weights) if w > 0]

    def run(self, counts: list[int], start: int, stop: int) -> list[int]:
        """Year indices for slots start..stop-1, given and advancing the counts at `start`."""
        big, w, active = self.total, self.weights, self.active
        release = [counts[y] * big // w[y] if w[y] else 0 for y in range(len(w))]
        deadline = [-(-(counts[y] + 1) * big // w[y]) if w[y] else 0 for y in range(len(w))]
        out = []
        for k in range(start, stop):
            best = -1
            for y in active:
                if release[y] <= k and (best < 0 or deadline[y] < deadline[best]):
                    best = y
            out.append(best)
            c = counts[best] = counts[best] + 1
            release[best] = c * big // w[best]
            deadline[best] = -(-(c + 1) * big // w[best])
        return out


class Ref(NamedTuple):
    """One draw of a stream: the year, its global position and where that sample lives."""

    year: str
    position: int
    pass_index: int
    lane: int
    shard: int
    member: int


@dataclass
class Space:
    """A year's draws in a segment as indices 0 .. size-1: the `explicit` positions, then the year's
    global order from position `tail` on."""

    explicit: list[int]
    tail: int
    size: int

    def positions(self, index: np.ndarray) -> np.ndarray:
        """The global positions of `index`."""
        index = np.asarray(index, dtype=np.int64)
        k = len(self.explicit)
        if not k:
            return self.tail + index
        listed = np.asarray(self.explicit, dtype=np.int64)
        return np.where(index < k, listed[np.minimum(index, k - 1)], self.tail + index - k)

    def rest(self, start: int, unread: np.ndarray) -> Space:
        """The space of what is left: indices `unread` (all below `start`), then every index from `start` on."""
        start = min(start, self.size)
        listed = self.positions(unread).tolist() + self.explicit[start:]
        return Space(listed, self.tail + max(0, start - len(self.explicit)), len(unread) + self.size - start)


@dataclass
class Segment:
    streams: int
    world: int  # ranks: stream s is rank s // W, worker s % W, W = streams / world
    micro: int  # samples per micro-batch
    accum: int  # micro-batches per rank per optimizer step
    spaces: list[Space]  # per year, its draws in this segment
    offset: int  # samples of the step drawn (over all streams) before the segment began
    done: int  # draws per stream made before this sampler started

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Segment:
        return cls(**{**state, "spaces": [Space(**sp) for sp in state["spaces"]]})


class _Layout:
    """What a segment's streams draw: per-year counts, extras, rotations and the cyclic schedule."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        streams = seg.streams
        sizes = [sp.size for sp in seg.spaces]
        self.base = [r // streams for r in sizes]
        self.extra = [r % streams for r in sizes]
        self.first = [sum(self.extra[:y]) % streams for y in range(len(sizes))]
        self.common = sum(self.base)
        self.length = self.common + sum(self.extra) // streams
        self.cycle = np.array(Schedule(self.base).run([0] * len(sizes), 0, self.common), dtype=np.int64)
        self._cum: np.ndarray | None = None

    def rotation(self, s: int) -> int:
        """Where stream s starts in the cycle; see the module docstring."""
        seg = self.seg
        per_rank = seg.streams // seg.world
        rank, worker = divmod(s, per_rank)
        order = worker * seg.world + rank
        return order * seg.micro * seg.accum // per_rank % self.common if self.common else 0

    def lane(self, s: int, y: int) -> int:
        """Stream s's residue among year y's indices."""
        return (s - self.first[y]) % self.seg.streams

    def extras(self, s: int) -> list[int]:
        """The years of stream s's extra draws, in order."""
        return [y for y in range(len(self.extra)) if self.lane(s, y) < self.extra[y]]

    def years(self, s: int, start: int, stop: int) -> np.ndarray:
        """The year of each of stream s's draws start .. stop-1."""
        k = np.arange(start, stop)
        out = np.empty(len(k), dtype=np.int64)
        common = k < self.common
        if common.any():
            out[common] = self.cycle[(k[common] + self.rotation(s)) % self.common]
        if not common.all():
            out[~common] = np.asarray(self.extras(s), dtype=np.int64)[k[~common] - self.common]
        return out

    def counts(self, s: int, done: int) -> np.ndarray:
        """Per-year draws of stream s among its first `done`."""
        out = np.zeros(len(self.base), dtype=np.int64)
        if self.common:
            if self._cum is None:
                hits = self.cycle[:, None] == np.arange(len(self.base))[None, :]
                self._cum = np.concatenate([np.zeros((1, len(self.base)), dtype=np.int64), np.cumsum(hits, 0)])
            cum, beta, d = self._cum, self.rotation(s), min(done, self.common)
            out += cum[min(beta + d, self.common)] - cum[beta]
            if beta + d > self.common:
                out += cum[beta + d - self.common]
        for y in self.extras(s)[: max(0, done - self.common)]:
            out[y] += 1
        return out


class RehearsalSampler:
    """Per-stream draws of one plan step over several years, with a small global state."""

    def __init__(
        self,
        years: Mapping[str, YearShards],
        quotas: Mapping[str, int],
        *,
        seed: int,
        world: int,
        workers: int,
        lanes: int = 0,
        step: int = 0,
        start: Mapping[str, int] | None = None,
        micro: int = 1,
        accum: int = 1,
        shuffle_shards: int = 1,
    ) -> None:
        unknown = sorted(set(quotas) - set(years))
        if unknown:
            raise DataError(f"year {unknown[0]}: has a quota but no shards")
        streams = stream_count(world, workers)
        total = sum(quotas.values())
        if total <= 0 or total % streams or any(q < 0 for q in quotas.values()):
            raise ValueError(f"quotas {dict(quotas)}: need a positive total divisible by {streams} streams")
        self.names = sorted(quotas)
        self.years = {y: years[y] for y in self.names}
        for y in self.names:
            if quotas[y] and not self.years[y].samples:
                raise DataError(f"year {y}: {self.years[y]!r} has no samples but a quota of {quotas[y]}")
        self.quotas = [quotas[y] for y in self.names]
        self.seed, self.step, self.lanes, self.shuffle_shards = seed, step, lanes or streams, shuffle_shards
        self.micro, self.accum = micro, accum
        self.begin = [int((start or {}).get(y, 0)) for y in self.names]
        spaces = [Space([], c, q) for c, q in zip(self.begin, self.quotas)]
        self._use(Segment(streams, world, micro, accum, spaces, 0, 0))
        self._orders = self._make_orders()
        self._log_passes()

    def _make_orders(self) -> dict[str, YearOrder]:
        return {y: YearOrder(y, self.years[y].sizes, self.lanes, self.seed, self.shuffle_shards) for y in self.names}

    def _use(self, segment: Segment) -> None:
        self.segment, self._layout = segment, _Layout(segment)

    @property
    def streams(self) -> int:
        """Streams S of the current segment."""
        return self.segment.streams

    @property
    def samples_per_stream(self) -> int:
        """Draws each stream makes from where this sampler starts to the end of the step."""
        return self._layout.length - self.segment.done

    @property
    def consumed(self) -> int:
        """Samples of the step (over all streams) drawn before this sampler starts."""
        return self.segment.offset + self.segment.streams * self.segment.done

    def stream(self, s: int) -> Iterator[Ref]:
        """Stream s's draws, in order, from where this sampler starts."""
        seg, lay = self.segment, self._layout
        if not 0 <= s < seg.streams:
            raise ValueError(f"stream {s} out of range for {seg.streams} streams")
        counts, slot = lay.counts(s, seg.done), seg.done
        while slot < lay.length:
            stop = min(lay.length, slot + _CHUNK)
            ys = lay.years(s, slot, stop)
            out: list[Ref | None] = [None] * len(ys)
            for y in np.unique(ys).tolist():
                idx = np.flatnonzero(ys == y)
                index = (counts[y] + np.arange(len(idx))) * seg.streams + lay.lane(s, y)
                counts[y] += len(idx)
                pos = seg.spaces[y].positions(index)
                name = self.names[y]
                at = self._orders[name].locate(pos)
                for i, p, q, g, t, m in zip(
                    idx.tolist(),
                    pos.tolist(),
                    at.passes.tolist(),
                    at.lanes.tolist(),
                    at.shards.tolist(),
                    at.members.tolist(),
                ):
                    out[i] = Ref(name, p, q, g, t, m)
            yield from out  # type: ignore[misc]
            slot = stop

    def url(self, ref: Ref) -> str:
        """The URL of the shard a draw reads."""
        return self.years[ref.year].url(ref.shard)

    def member(self, ref: Ref) -> int:
        """The member of its shard a draw reads, in file order (a buffer holds only some)."""
        return self.years[ref.year].member(ref.shard, ref.member)

    def _done(self, consumed: int) -> int:
        seg = self.segment
        done, rest = divmod(consumed - seg.offset, seg.streams)
        if rest or not 0 <= done <= self._layout.length:
            raise ValueError(
                f"{consumed} samples consumed: not a point where all {seg.streams} streams drew "
                f"equally in this segment (samples {seg.offset}..{seg.offset + seg.streams * self._layout.length})"
            )
        return done

    def _stream_counts(self, done: int) -> np.ndarray:
        """Per stream and year, the draws among the segment's first `done` of each stream."""
        return np.stack([self._layout.counts(s, done) for s in range(self.segment.streams)])

    def cursors(self, consumed: int) -> dict[str, int]:
        """Per year, its cursor plus the samples drawn once `consumed` of the step are: at the step's
        end, where the year's global order reads on (every position before it read exactly once)."""
        drawn = self._stream_counts(self._done(consumed)).sum(0)
        spaces = self.segment.spaces
        return {y: self.begin[i] + self.quotas[i] - spaces[i].size + int(drawn[i]) for i, y in enumerate(self.names)}

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """JSON-able state once `consumed` samples of the step (over all streams) have been used."""
        seg = asdict(self.segment)
        seg["done"] = self._done(consumed)
        return {
            "step": self.step,
            "seed": self.seed,
            "lanes": self.lanes,
            "shuffle_shards": self.shuffle_shards,
            "years": self.names,
            "quotas": self.quotas,
            "begin": self.begin,
            "shards": [[len(self.years[y]), self.years[y].samples] for y in self.names],
            "segment": seg,
        }

    def load_state_dict(self, state: Mapping[str, Any], world: int, workers: int) -> None:
        """Continue from `state` on world x max(workers, 1) streams, re-splitting if the layout changed."""
        if "begin" not in state or "spaces" not in state.get("segment", {}):
            raise DataError("sampler state: written by an older tic-trainer; resume from a year checkpoint")
        mine = self.state_dict(self.segment.offset)
        for key in ("step", "seed", "years"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state: {key} is {state[key]!r}, this step has {mine[key]!r}")
        saved, total = sum(state["quotas"]), sum(self.quotas)
        if saved != total:
            raise ValueError(f"sampler state: {saved} samples in the step, this step has {total}")
        # The split rounded for the streams the step started on is the step's; keep it.
        self.quotas, self.begin = list(state["quotas"]), list(state["begin"])
        for y, old, new in zip(self.names, state["shards"], mine["shards"]):
            if list(old) != new:
                raise DataError(f"year {y}: shards changed since the checkpoint ({old} -> {new} shards, samples)")
        if (state["lanes"], state["shuffle_shards"]) != (self.lanes, self.shuffle_shards):
            self.lanes, self.shuffle_shards = state["lanes"], state["shuffle_shards"]
            self._orders = self._make_orders()
        old = Segment.from_dict(state["segment"])
        streams = stream_count(world, workers)
        if (old.streams, old.world, old.micro, old.accum) == (streams, world, self.micro, self.accum):
            self._use(old)
            return
        self._use(old)
        remaining = old.streams * (self._layout.length - old.done)
        if remaining % streams:
            raise ValueError(f"sampler state: {remaining} samples left do not split over {streams} streams")
        self._use(Segment(streams, world, self.micro, self.accum, self._unread(), self.consumed, 0))
        log.info("sampler: re-split %d remaining samples from %d to %d streams", remaining, old.streams, streams)

    def _unread(self) -> list[Space]:
        """Per year, the space of the current segment's positions its streams have not drawn yet."""
        seg, lay = self.segment, self._layout
        counts = self._stream_counts(seg.done)
        out = []
        for y, space in enumerate(seg.spaces):
            read = counts[:, y]
            lanes = np.array([lay.lane(s, y) for s in range(seg.streams)], dtype=np.int64)
            top = int(read.max())
            # Every index below min(read) x S is read; in the rows up to max(read) only some are.
            rows = [j * seg.streams + lanes[read <= j] for j in range(int(read.min()), top)]
            unread = np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *rows]))
            out.append(space.rest(top * seg.streams, unread[unread < space.size]))
        return out

    def _log_passes(self) -> None:
        for i, y in enumerate(self.names):
            size, begin = self.years[y].samples, self.begin[i]
            end = begin + self.quotas[i]
            if self.quotas[i] and (end - 1) // size > begin // size:
                log.info(
                    "year %s: %d samples from %d per pass, so passes %d-%d (fresh shuffle each)",
                    y,
                    self.quotas[i],
                    size,
                    begin // size + 1,
                    (end - 1) // size + 1,
                )
