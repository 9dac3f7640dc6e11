"""The streaming rehearsal sampler: which (year, position) every rank/worker stream reads, resumably.

A plan step draws `total` samples from years with integer quotas. There are S = world x
max(workers, 1) streams (stream s = rank x max(workers, 1) + worker), each drawing n = total / S
samples. Every stream follows the same year schedule Y(k), an earliest-deadline (Pfair)
interleave whose counts after any N draws are within 1 of weight x N (so within 2 over any
window). The j-th draw of year y by stream s is position c_y + j x S + s of the year's global
order (order.py), c_y being the year's cursor when the segment began. So once every stream has
made the same number of draws, each year's consumed positions are a contiguous prefix and the
global state is a handful of integers per year.

A segment is the stretch of a step run with one S. Resuming with the same S continues the
segment exactly; with another S a new segment starts at the advanced cursors, drawing what each
year still owes. A stream can only realise whole samples, so a year's total over a segment is
S x (its stream count): exact when its quota is divisible by S (`plan.apportion(..., multiple=S)`
makes it so), otherwise within S of the quota, with the step's grand total always exact.
"""

from __future__ import annotations

import logging
import math
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
class Segment:
    streams: int
    start: list[int]  # per-year global cursor when the segment began
    weights: list[int]  # per-year schedule weights (proportional to what each year still owes)
    length: int  # draws per stream in the segment
    offset: int  # samples of the step drawn (over all streams) before the segment began
    done: int  # draws per stream made before this sampler started
    counts: list[int]  # per-year draws per stream among the first `done`


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
        self.seed, self.step, self.lanes = seed, step, lanes or streams
        cursor = [int((start or {}).get(y, 0)) for y in self.names]
        zeros = [0] * len(self.names)
        self.segment = Segment(streams, cursor, list(self.quotas), total // streams, 0, 0, zeros)
        self._orders = {y: YearOrder(y, self.years[y].sizes, self.lanes, seed) for y in self.names}
        self._snapshot: tuple[int, list[int]] | None = None
        self._log_passes()

    @property
    def streams(self) -> int:
        """Streams S of the current segment."""
        return self.segment.streams

    @property
    def samples_per_stream(self) -> int:
        """Draws each stream makes from where this sampler starts to the end of the step."""
        return self.segment.length - self.segment.done

    @property
    def consumed(self) -> int:
        """Samples of the step (over all streams) drawn before this sampler starts."""
        return self.segment.offset + self.segment.streams * self.segment.done

    def stream(self, s: int) -> Iterator[Ref]:
        """Stream s's draws, in order, from where this sampler starts."""
        seg = self.segment
        if not 0 <= s < seg.streams:
            raise ValueError(f"stream {s} out of range for {seg.streams} streams")
        schedule = Schedule(seg.weights)
        counts, slot = list(seg.counts), seg.done
        while slot < seg.length:
            stop = min(seg.length, slot + _CHUNK)
            before = list(counts)
            ys = np.array(schedule.run(counts, slot, stop))
            out: list[Ref | None] = [None] * len(ys)
            for y in np.unique(ys):
                idx = np.flatnonzero(ys == y)
                pos = seg.start[y] + (before[y] + np.arange(len(idx))) * seg.streams + s
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

    def _counts_at(self, done: int) -> list[int]:
        """Per-year draws per stream after the segment's first `done` draws."""
        seg = self.segment
        starts = [self._snapshot, (seg.done, seg.counts), (0, [0] * len(self.names))]
        slot, counts = max((s for s in starts if s is not None and s[0] <= done), key=lambda s: s[0])
        counts = list(counts)
        Schedule(seg.weights).run(counts, slot, done)
        # Checkpoints come in increasing order, so the next one continues from here.
        self._snapshot = (done, counts)
        return list(counts)

    def _done(self, consumed: int) -> int:
        seg = self.segment
        done, rest = divmod(consumed - seg.offset, seg.streams)
        if rest or not 0 <= done <= seg.length:
            raise ValueError(
                f"{consumed} samples consumed: not a point where all {seg.streams} streams drew "
                f"equally in this segment (samples {seg.offset}..{seg.offset + seg.streams * seg.length})"
            )
        return done

    def cursors(self, consumed: int) -> dict[str, int]:
        """Per-year global cursor once `consumed` samples of the step have been drawn in all."""
        seg = self.segment
        counts = self._counts_at(self._done(consumed))
        return {y: seg.start[i] + seg.streams * counts[i] for i, y in enumerate(self.names)}

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """JSON-able state once `consumed` samples of the step (over all streams) have been used."""
        done = self._done(consumed)
        seg = asdict(self.segment)
        seg.update(done=done, counts=self._counts_at(done))
        return {
            "step": self.step,
            "seed": self.seed,
            "lanes": self.lanes,
            "years": self.names,
            "quotas": self.quotas,
            "shards": [[len(self.years[y]), self.years[y].samples] for y in self.names],
            "segment": seg,
        }

    def load_state_dict(self, state: Mapping[str, Any], world: int, workers: int) -> None:
        """Continue from `state` on world x max(workers, 1) streams, re-splitting if that changed."""
        mine = self.state_dict(self.segment.offset)
        for key in ("step", "seed", "years"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state: {key} is {state[key]!r}, this step has {mine[key]!r}")
        saved, total = sum(state["quotas"]), sum(self.quotas)
        if saved != total:
            raise ValueError(f"sampler state: {saved} samples in the step, this step has {total}")
        # The split rounded for the streams the step started on is the step's; keep it.
        self.quotas = list(state["quotas"])
        for y, old, new in zip(self.names, state["shards"], mine["shards"]):
            if list(old) != new:
                raise DataError(f"year {y}: shards changed since the checkpoint ({old} -> {new} shards, samples)")
        if state["lanes"] != self.lanes:
            self.lanes = state["lanes"]
            self._orders = {y: YearOrder(y, self.years[y].sizes, self.lanes, self.seed) for y in self.names}
        old = Segment(**state["segment"])
        self._snapshot = None
        streams = stream_count(world, workers)
        if streams == old.streams:
            self.segment = old
            return
        remaining = old.streams * (old.length - old.done)
        if remaining % streams:
            raise ValueError(f"sampler state: {remaining} samples left do not split over {streams} streams")
        big = sum(old.weights)
        # What each year still owes, scaled by big / old.streams to stay an integer.
        owed = [max(old.length * w - big * c, 0) for w, c in zip(old.weights, old.counts)]
        g = math.gcd(*owed) or 1
        self.segment = Segment(
            streams,
            [st + old.streams * c for st, c in zip(old.start, old.counts)],
            [o // g for o in owed],
            remaining // streams,
            old.offset + old.streams * old.done,
            0,
            [0] * len(self.names),
        )
        log.info("sampler: re-split %d remaining samples from %d to %d streams", remaining, old.streams, streams)

    def _log_passes(self) -> None:
        for i, y in enumerate(self.names):
            size, begin = self.years[y].samples, self.segment.start[i]
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
