"""Replay buffers: a fixed, exact-size, nested subset of an old year that the sampler stays inside."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.rehearsal import RehearsalSampler
from trainer.data.shards import YearShards


def _year(n_shards: int = 10, size: int = 100) -> YearShards:
    return YearShards("mem/", [f"{i:06d}.tar" for i in range(n_shards)], np.full(n_shards, size))


def _members(ys: YearShards) -> set[tuple[str, int]]:
    return {(ys.names[i], m) for i in range(len(ys)) for m in range(int(ys.sizes[i]))}


@pytest.mark.parametrize("samples", [1, 99, 100, 250, 1000])
def test_subset_is_exact_and_nested(samples: int) -> None:
    year = _year()
    big, small = year.subset(samples, 0, "2014"), year.subset(max(1, samples // 2), 0, "2014")
    assert big.samples == samples and small.samples == max(1, samples // 2)
    assert _members(small) <= _members(big) <= _members(year)
    assert _members(year.subset(samples, 1, "2014")) != _members(big) or samples == 1000


def test_sampler_draws_only_from_the_buffer() -> None:
    old, new = _year().subset(120, 0, "2014"), _year(4, 50)
    sampler = RehearsalSampler({"2014": old, "2015": new}, {"2014": 300, "2015": 300}, seed=0, world=2, workers=0)
    allowed = _members(old)
    seen = []
    for s in range(2):
        for ref in sampler.stream(s):
            if ref.year == "2014":
                seen.append((old.names[ref.shard], ref.member))
    assert len(seen) == 300 and set(seen) <= allowed
    assert set(seen) == allowed  # 300 draws from 120 cycle the whole buffer
