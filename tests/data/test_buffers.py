"""Replay buffers: a fixed, exact-size, nested subset of an old year that the sampler stays inside."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.conftest import one_rank_dataset, write_year
from trainer.data.buffers import choose, sample_hashes, shard_keys
from trainer.data.pipeline import build_loader
from trainer.data.rehearsal import RehearsalSampler
from trainer.data.shards import YearShards, find_years


def _year(n_shards: int = 10, size: int = 100) -> YearShards:
    return YearShards("mem/", [f"{i:06d}.tar" for i in range(n_shards)], np.full(n_shards, size))


def _members(ys: YearShards) -> set[tuple[str, int]]:
    return {(ys.names[i], m) for i in range(len(ys)) for m in range(int(ys.sizes[i]))}


def _brute_force(year: YearShards, samples: int, seed: int, name: str) -> set[tuple[str, int]]:
    """The `samples` smallest (hash, shard, member) of the year, from every hash at once."""
    keys = shard_keys(year.names, seed, name)
    rows = [
        (int(h), i, m)
        for i in range(len(year))
        for m, h in enumerate(sample_hashes(keys[i], np.arange(int(year.sizes[i]))).tolist())
    ]
    return {(year.names[i], m) for _, i, m in sorted(rows)[:samples]}


def _picked(buffer: YearShards) -> set[tuple[str, int]]:
    """The (shard name, file member) pairs a buffer holds, as the reader maps them."""
    return {(buffer.names[i], buffer.member(i, k)) for i in range(len(buffer)) for k in range(int(buffer.sizes[i]))}


@pytest.mark.parametrize("by", ["samples", "shards"])
@pytest.mark.parametrize("samples", [1, 99, 100, 250, 1000])
def test_subset_is_exact_and_nested(samples: int, by: str) -> None:
    year = _year()
    big, small = year.subset(samples, 0, "2014", by), year.subset(max(1, samples // 2), 0, "2014", by)
    assert big.samples == samples and small.samples == max(1, samples // 2)
    assert len(_picked(big)) == samples
    assert _picked(small) <= _picked(big) <= _members(year)
    assert _picked(year.subset(samples, 1, "2014", by)) != _picked(big) or samples == 1000


@pytest.mark.parametrize("bits", [1, 4, 20])
def test_two_pass_threshold_is_the_brute_force_smallest(bits: int) -> None:
    """Few histogram bits put thousands of hashes in the bucket that holds the cut."""
    year = YearShards("nowhere://never-read/", [f"{i:06d}.tar" for i in range(37)], np.arange(37) * 7 + 3)
    keys = shard_keys(year.names, 5, "2016")
    for samples in (1, 500, 2000, int(year.sizes.sum())):
        cut, counts = choose(keys, year.sizes, samples, bits=bits)
        assert counts.sum() == samples
        buffer = year.subset(samples, 5, "2016")
        assert _picked(buffer) == _brute_force(year, samples, 5, "2016")


def test_a_time_sorted_year_gives_a_buffer_spread_over_the_whole_year() -> None:
    """Shards cut from a time-sorted manifest: shard i holds times i*100 .. i*100+99. A hash buffer
    of 10% holds about 10% of every decile and touches every shard; a shard buffer is 10 windows."""
    year = _year(100, 100)
    for by, spread in (("samples", True), ("shards", False)):
        buffer = year.subset(1000, 0, "2014", by)
        times = sorted(int(name[:6]) * 100 + m for name, m in _picked(buffer))
        deciles = np.bincount(np.array(times) // 1000, minlength=10)
        shards = len({t // 100 for t in times})
        if spread:
            assert shards >= 95 and deciles.min() >= 70 and deciles.max() <= 130, deciles
        else:
            assert shards <= 11


def test_sampler_draws_only_from_the_buffer() -> None:
    old, new = _year().subset(120, 0, "2014"), _year(4, 50)
    sampler = RehearsalSampler({"2014": old, "2015": new}, {"2014": 300, "2015": 300}, seed=0, world=2, workers=0)
    allowed = _picked(old)
    seen = []
    for s in range(2):
        for ref in sampler.stream(s):
            if ref.year == "2014":
                seen.append((old.names[ref.shard], sampler.member(ref)))
    assert len(seen) == 300 and set(seen) <= allowed
    assert set(seen) == allowed  # 300 draws from 120 cycle the whole buffer


@pytest.mark.timeout(120)
def test_the_loader_reads_exactly_the_buffer_from_real_shards(tmp_path) -> None:
    keys = write_year(tmp_path, "2014", 60, 12)
    year = find_years(str(tmp_path), years=["2014"])["2014"]
    buffer = year.subset(20, 3, "2014")
    want = {keys[int(name[:6]) * 12 + m] for name, m in _brute_force(year, 20, 3, "2014")}
    sampler = RehearsalSampler({"2014": buffer}, {"2014": 40}, seed=3, world=1, workers=2)
    dataset = one_rank_dataset(sampler, workers=2, micro_batch=4, seed=3)
    got = [k for batch in build_loader(dataset) for k in batch["key"]]
    assert len(got) == 40 and Counter(got) == Counter({k: 2 for k in want})
