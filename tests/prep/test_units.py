"""make_shards' parts by themselves: balanced shard packing, timestamp parsing."""

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.prep.manifests import parse_when
from trainer.prep.prepare import pack_tasks


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=3), min_size=1, max_size=6),
    shard_size=st.integers(1, 50),
)
@pytest.mark.timeout(60)
def test_pack_tasks_cover_every_staged_sample_once_in_balanced_shards(counts, shard_size):
    results = {i: {"pieces": {f"train/{2014 + y}": n for y, n in enumerate(row) if n}} for i, row in enumerate(counts)}
    tasks = pack_tasks(results, shard_size, seed=0)
    for y in range(3):
        total = sum(row[y] for row in counts if len(row) > y)
        mine = [t for t in tasks if t.year == 2014 + y]
        sizes = [sum(take for _, _, take in t.pieces) for t in mine]
        assert sum(sizes) == total and all(0 < s <= shard_size for s in sizes)
        assert not sizes or max(sizes) - min(sizes) <= 1
        covered = [(path, skip + k) for t in mine for path, skip, take in t.pieces for k in range(take)]
        expected = [
            (f".make_shards/units/{i:06d}/train-{2014 + y}.bin", k)
            for i, row in enumerate(counts)
            if len(row) > y
            for k in range(row[y])
        ]
        assert covered == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "value, year",
    [
        (2014, 2014),
        ("2016", 2016),
        (1420070400, 2015),
        (1420070400000, 2015),
        ("1420070400", 2015),
        ("2013-12-31T23:30:00-02:00", 2014),
        ("2019-07", 2019),
        (datetime(2012, 5, 1), 2012),
        (2017.0, 2017),
    ],
)
def test_parse_when_accepts_years_epochs_and_dates(value, year):
    assert parse_when(value)[0] == year


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", [None, "", "yesterday", float("nan"), True, "2019-13"])
def test_parse_when_rejects_what_is_not_a_time(value):
    with pytest.raises(ValueError):
        parse_when(value)
