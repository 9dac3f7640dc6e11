"""The shuffle within a year: blocks of shards interleaved at random, each shard read forward once a pass."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.conftest import one_rank_dataset, write_year
from trainer.data import pipeline
from trainer.data.order import YearOrder
from trainer.data.rehearsal import RehearsalSampler
from trainer.data.shards import find_years

SHARDS, PER_SHARD = 64, 1000  # shards written in source (time) order, like img2dataset's


def _source(order: YearOrder, positions: np.ndarray) -> np.ndarray:
    """Each position's index in the source order the shards were written in."""
    at = order.locate(positions)
    return at.shards * PER_SHARD + at.members


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", [1, 8])
def test_statistics_of_the_read_order(block: int) -> None:
    lanes = 4
    order = YearOrder("2014", np.full(SHARDS, PER_SHARD), lanes=lanes, seed=0, block=block)
    # Lane 0's first pass, as the stream that reads it draws it: positions 0, 4, 8, ...
    lane = np.arange(0, SHARDS * PER_SHARD, lanes)
    source = _source(order, lane)
    shards = np.unique(source // PER_SHARD)
    assert len(shards) == SHARDS // lanes  # the lane reads its 16 shards whole, nothing else
    assert sorted(source.tolist()) == [s * PER_SHARD + m for s in shards.tolist() for m in range(PER_SHARD)]
    rho = np.corrcoef(_ranks(source), np.arange(len(source)))[0, 1]
    neighbours = np.mean(np.abs(np.diff(source)) == 1)  # consecutive draws that were source neighbours
    spans = [len(set((source[i : i + 256] // PER_SHARD).tolist())) for i in range(0, len(source) - 256, 256)]
    if block == 1:  # the order before the shuffle: a micro-batch is a run of one shard
        assert neighbours > 0.99 and max(spans) <= 2
    else:
        assert abs(rho) < 0.2, rho
        assert neighbours < 0.2, neighbours
        assert min(spans) == block  # every micro-batch of 256 draws from all 8 shards of its block
        # Each shard is still read forward: its members come in increasing order.
        at = order.locate(lane)
        for shard in np.unique(at.shards):
            members = at.members[at.shards == shard]
            assert np.all(np.diff(members) == 1) and members[0] == 0


@pytest.mark.timeout(60)
def test_the_whole_pass_is_uncorrelated_with_the_source_order() -> None:
    order = YearOrder("2014", np.full(SHARDS, PER_SHARD), lanes=4, seed=0, block=8)
    source = _source(order, np.arange(SHARDS * PER_SHARD))
    rho = np.corrcoef(_ranks(source), np.arange(len(source)))[0, 1]
    assert abs(rho) < 0.1, rho
    assert sorted(source.tolist()) == list(range(SHARDS * PER_SHARD))


@pytest.mark.timeout(120)
def test_each_shard_is_opened_once_a_pass(tmp_path, monkeypatch) -> None:
    """Read amplification 1: 3 passes over 12 shards interleaved in blocks of 4 open 36 shards."""
    write_year(tmp_path, "2014", 12 * 20, 20)
    years = find_years(str(tmp_path), years=["2014"])
    opened: Counter = Counter()

    class Counting(pipeline._OpenShard):
        def __init__(self, url: str, shard: int) -> None:
            opened[url] += 1
            super().__init__(url, shard)

    monkeypatch.setattr(pipeline, "_OpenShard", Counting)
    sampler = RehearsalSampler(years, {"2014": 3 * 240}, seed=1, world=1, workers=0, lanes=3, shuffle_shards=4)
    dataset = one_rank_dataset(sampler, workers=0, micro_batch=8, seed=1)
    keys = Counter(k for batch in dataset for k in batch["key"])
    assert len(keys) == 240 and set(keys.values()) == {3}
    assert len(opened) == 12 and set(opened.values()) == {3}, opened
