"""The rehearsal sampler: exact mixing, disjoint streams, contiguous global state, resume and re-split."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from trainer.data.rehearsal import Ref, RehearsalSampler, Schedule
from trainer.data.shards import DataError, YearShards
from trainer.plan import apportion


def fake_years(sizes: dict[str, list[int]]) -> dict[str, YearShards]:
    """Shard metadata only: the sampler never opens a shard."""
    return {
        y: YearShards(f"memory://fake/{y}/", [f"{i:06d}.tar" for i in range(len(s))], np.array(s))
        for y, s in sizes.items()
    }


def draws(sampler: RehearsalSampler) -> list[list[tuple[str, int]]]:
    """Every stream's (year, position) draws, in order."""
    return [[(r.year, r.position) for r in sampler.stream(s)] for s in range(sampler.streams)]


def check_within_one(seq: list[str], quotas: dict[str, int]) -> None:
    total = sum(quotas.values())
    counts: Counter = Counter()
    for n, y in enumerate(seq, 1):
        counts[y] += 1
        for year, q in quotas.items():
            assert abs(counts[year] - q * n / total) < 1, (year, n, counts[year], q * n / total)


@pytest.mark.timeout(10)
def test_apportion_in_stream_units():
    assert apportion(100, {"a": 1, "b": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}
    assert apportion(96, {"a": 0.5, "b": 0.3, "c": 0.2}, multiple=8) == {"a": 48, "b": 32, "c": 16}
    q = apportion(1024, {"a": 3, "b": 7, "c": 11, "d": 0}, multiple=16)
    assert sum(q.values()) == 1024 and all(v % 16 == 0 for v in q.values()) and q["d"] == 0
    with pytest.raises(ValueError):
        apportion(100, {"a": 1}, multiple=8)


@pytest.mark.timeout(30)
def test_schedule_prefix_within_one_window_within_two():
    rng = np.random.default_rng(0)
    for _ in range(300):
        weights = rng.integers(0, 40, rng.integers(1, 8)).tolist()
        if not sum(weights):
            continue
        n = int(rng.integers(1, 250))
        seq = Schedule(weights).run([0] * len(weights), 0, n)
        check_within_one([str(y) for y in seq], {str(y): w for y, w in enumerate(weights)})
        total = sum(weights)
        for y, w in enumerate(weights):
            hits = np.cumsum(np.array(seq) == y)
            hits = np.concatenate(([0], hits))
            for a in range(0, n, 7):
                window = hits[a + 1 :] - hits[a]
                assert np.all(np.abs(window - w * np.arange(1, n - a + 1) / total) < 2)
        # Restarting mid-way from the counts reproduces the same continuation.
        cut = n // 2
        counts = [0] * len(weights)
        Schedule(weights).run(counts, 0, cut)
        assert Schedule(weights).run(counts, cut, n) == seq[cut:]


@pytest.mark.timeout(60)
def test_streams_exact_disjoint_and_contiguous():
    # Seeded cases rather than hypothesis: same coverage each run, and no example database on disk.
    for case in range(150):
        rng = np.random.default_rng(case)
        n_years, world, workers = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(0, 4))
        try:
            check_streams(rng, case, n_years, world, workers, per_stream=int(rng.integers(1, 25)))
        except AssertionError as e:
            raise AssertionError(f"case {case}: {n_years} years, world {world}, workers {workers}") from e


def check_streams(rng, seed, n_years, world, workers, per_stream):
    sizes = {str(2014 + i): rng.integers(0, 9, rng.integers(1, 6)).tolist() + [1] for i in range(n_years)}
    streams = world * max(workers, 1)
    total = streams * per_stream
    weights = {y: float(rng.integers(1, 10)) for y in sizes}
    divisible = bool(rng.integers(0, 2))
    quotas = apportion(total, weights, multiple=streams if divisible else 1)
    sampler = RehearsalSampler(
        fake_years(sizes), quotas, seed=seed, world=world, workers=workers, lanes=int(rng.integers(0, 6))
    )
    got = draws(sampler)
    assert [len(d) for d in got] == [per_stream] * streams
    if divisible:  # no extras: each stream is a rotation of one cyclic schedule
        for d in got:
            check_window_within_two([y for y, _ in d], quotas)
    everything = [x for d in got for x in d]
    assert len(set(everything)) == len(everything), "streams overlap"
    per_year = Counter(y for y, _ in everything)
    assert per_year == Counter({y: q for y, q in quotas.items() if q})
    for y, q in quotas.items():
        assert sorted(p for yy, p in everything if yy == y) == list(range(q))
    assert sampler.cursors(total) == quotas
    for sync in sorted({0, per_stream // 2}):
        drawn = Counter(y for d in got for y, _ in d[:sync])
        assert sampler.cursors(sync * streams) == {y: drawn[y] for y in quotas}


def check_window_within_two(seq: list[str], quotas: dict[str, int]) -> None:
    """Every window of `seq` holds each year within 2 of its share."""
    total, n = sum(quotas.values()), len(seq)
    for year, q in quotas.items():
        hits = np.concatenate(([0], np.cumsum(np.array(seq) == year)))
        for a in range(n):
            window = hits[a + 1 :] - hits[a]
            assert np.all(np.abs(window - q * np.arange(1, n - a + 1) / total) < 2), year


@pytest.mark.timeout(30)
def test_resume_same_streams_is_bit_exact():
    years = fake_years({"2014": [7, 5, 9, 3], "2015": [10, 10], "2016": [4]})
    quotas = apportion(240, {"2014": 0.5, "2015": 0.3, "2016": 0.2})
    whole = RehearsalSampler(years, quotas, seed=5, world=2, workers=3, step=1)
    expected = [list(whole.stream(s)) for s in range(6)]
    for cut in (0, 6, 20, 40):
        state = json.loads(json.dumps(whole.state_dict(cut * 6)))
        resumed = RehearsalSampler(years, quotas, seed=5, world=2, workers=3, step=1)
        resumed.load_state_dict(state, world=2, workers=3)
        assert resumed.consumed == cut * 6
        assert [list(resumed.stream(s)) for s in range(6)] == [e[cut:] for e in expected]
    with pytest.raises(ValueError, match="streams drew equally"):
        whole.state_dict(7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chain", [[(2, 2), (1, 2), (2, 0)], [(3, 2), (1, 3), (1, 0)], [(4, 1), (2, 1)]])
def test_resplit_continues_with_exactly_the_unseen_samples(chain):
    """Shrinking S keeps each year's remaining quota divisible, so the run sees the same multiset."""
    years = fake_years({"2014": [6, 6, 6], "2015": [5, 9], "2016": [30]})
    quotas = {"2014": 240, "2015": 96, "2016": 48}
    total = sum(quotas.values())

    def build(world, workers):
        return RehearsalSampler(years, quotas, seed=3, world=world, workers=workers, lanes=4)

    whole = build(*chain[0])
    expected = Counter(x for d in draws(whole) for x in d)
    seen: Counter = Counter()
    state = None
    consumed = 0
    for i, (world, workers) in enumerate(chain):
        sampler = build(world, workers)
        if state is not None:
            sampler.load_state_dict(state, world, workers)
        assert sampler.consumed == consumed
        last = i == len(chain) - 1
        take = sampler.samples_per_stream if last else sampler.samples_per_stream // 3
        for d in draws(sampler):
            seen.update(d[:take])
        consumed += take * sampler.streams
        state = sampler.state_dict(consumed)
    assert consumed == total
    assert seen == expected, "a re-split lost or repeated samples"


@pytest.mark.timeout(30)
def test_resplit_without_divisibility_keeps_totals_and_disjointness():
    """Growing S: every year's quota exact (the remainders are extra draws), nothing seen twice."""
    years = fake_years({"2014": [7, 7], "2015": [3, 8, 2], "2016": [11]})
    quotas = apportion(360, {"2014": 0.37, "2015": 0.41, "2016": 0.22})
    first = RehearsalSampler(years, quotas, seed=9, world=3, workers=1)
    seen = Counter(x for d in draws(first) for x in d[:20])
    second = RehearsalSampler(years, quotas, seed=9, world=3, workers=1)
    second.load_state_dict(first.state_dict(60), world=2, workers=2)
    rest = draws(second)
    for d in rest:
        seen.update(d)
    assert sum(seen.values()) == 360 and max(seen.values()) == 1
    for y, q in quotas.items():
        assert sorted(p for yy, p in seen if yy == y) == list(range(q))


@pytest.mark.timeout(30)
def test_cycles_into_fresh_passes(caplog):
    years = fake_years({"2014": [4, 3, 5]})
    with caplog.at_level(logging.INFO):
        sampler = RehearsalSampler(years, {"2014": 48}, seed=1, world=2, workers=0, lanes=2)
    assert "year 2014: 48 samples from 12 per pass, so passes 1-4" in caplog.text
    refs = [r for s in range(2) for r in sampler.stream(s)]
    by_pass: dict[int, list[tuple[int, int]]] = {}
    for r in refs:
        by_pass.setdefault(r.pass_index, []).append((r.shard, r.member))
    assert sorted(by_pass) == [0, 1, 2, 3]
    everything = sorted((s, m) for s, n in enumerate([4, 3, 5]) for m in range(n))
    for pairs in by_pass.values():
        assert sorted(pairs) == everything
    shuffles = {tuple(sampler._orders["2014"].shuffle(p)) for p in range(4)}
    assert len(shuffles) > 1
    # A step can continue a year's order where an earlier step left it.
    later = RehearsalSampler(years, {"2014": 8}, seed=1, world=2, workers=0, lanes=2, start={"2014": 48})
    assert sorted(r.position for s in range(2) for r in later.stream(s)) == list(range(48, 56))


def rank_batch(sampler: RehearsalSampler, rank: int, workers: int, micro: int, t: int) -> list[int]:
    """Positions of rank `rank`'s t-th batch: worker t % W's (t // W)-th batch."""
    w = max(workers, 1)
    refs = list(sampler.stream(rank * w + t % w))
    return [r.position for r in refs[(t // w) * micro : (t // w + 1) * micro]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("workers", [0, 2])
def test_global_batches_do_not_depend_on_world_size(workers):
    years = fake_years({"2014": [10, 7, 12, 9, 11, 8]})
    micro, steps = 8, 6
    w = max(workers, 1)
    one = RehearsalSampler(years, {"2014": micro * steps * w}, seed=2, world=1, workers=workers, lanes=4)
    two = RehearsalSampler(years, {"2014": micro * steps * w}, seed=2, world=2, workers=workers, lanes=4)
    for t in range(steps * w):
        single = rank_batch(one, 0, workers, micro, t)
        split = rank_batch(two, 0, workers, micro // 2, t) + rank_batch(two, 1, workers, micro // 2, t)
        assert sorted(single) == sorted(split)


@pytest.mark.timeout(30)
def test_state_is_small_and_checked_on_load():
    years = fake_years({"2014": [5, 5], "2015": [6]})
    quotas = {"2014": 40, "2015": 24}
    sampler = RehearsalSampler(years, quotas, seed=0, world=2, workers=2)
    state = sampler.state_dict(16)
    assert len(json.dumps(state)) < 1000
    changed = fake_years({"2014": [5, 5, 1], "2015": [6]})
    with pytest.raises(DataError, match="2014: shards changed"):
        RehearsalSampler(changed, quotas, seed=0, world=2, workers=2).load_state_dict(state, 2, 2)
    with pytest.raises(ValueError, match="samples in the step"):
        RehearsalSampler(years, {"2014": 48, "2015": 32}, seed=0, world=2, workers=2).load_state_dict(state, 2, 2)
    # Quotas rounded for another stream count: the state's (the step's own) split wins.
    other = RehearsalSampler(years, {"2014": 42, "2015": 22}, seed=0, world=2, workers=1)
    other.load_state_dict(state, 2, 1)
    assert other.quotas == [40, 24] and other.state_dict(other.consumed)["quotas"] == [40, 24]
    with pytest.raises(ValueError, match="do not split"):
        RehearsalSampler(years, quotas, seed=0, world=2, workers=2).load_state_dict(state, 5, 1)
    with pytest.raises(DataError, match="2016"):
        RehearsalSampler(years, {"2016": 64}, seed=0, world=1, workers=0)
    with pytest.raises(ValueError, match="divisible by 3"):
        RehearsalSampler(years, quotas, seed=0, world=3, workers=0)


YEARS3 = fake_years({"2014": [6, 6, 6], "2015": [5, 9], "2016": [30, 4]})
QUOTAS3 = {"2014": 104, "2015": 56, "2016": 288}  # weights 13 : 7 : 36, 28 steps of 16


def global_batches(sampler: RehearsalSampler, world: int, workers: int, micro: int, accum: int) -> list[list[Ref]]:
    """Each optimizer step's global batch as the ranks' loaders build it: rank r's t-th batch is its
    worker t % W's (t // W)-th micro-batch, and a step takes `accum` batches of every rank."""
    per_rank = max(workers, 1)
    streams = [list(sampler.stream(s)) for s in range(sampler.streams)]
    batches = len(streams[0]) // micro * per_rank
    return [
        [
            ref
            for rank in range(world)
            for b in range(t * accum, (t + 1) * accum)
            for ref in streams[rank * per_rank + b % per_rank][b // per_rank * micro : (b // per_rank + 1) * micro]
        ]
        for t in range(batches // accum)
    ]


def worst_deviation(steps: list[list[Ref]], quotas: dict[str, int]) -> float:
    """The largest |year count - weight x global batch| over the steps."""
    total = sum(quotas.values())
    return max(abs(sum(r.year == y for r in step) - q * len(step) / total) for step in steps for y, q in quotas.items())


# (world, workers, micro, accum): global batch 16; workers divide accum or accum divides workers.
LAYOUTS = [(1, 0, 4, 4), (1, 1, 4, 4), (1, 2, 4, 4), (2, 0, 4, 2), (2, 1, 4, 2), (2, 2, 4, 2), (2, 2, 8, 1)]
LAYOUTS += [(4, 0, 2, 2), (4, 1, 2, 2), (4, 2, 2, 2), (1, 2, 16, 1)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("world", "workers", "micro", "accum"), LAYOUTS)
def test_every_global_batch_holds_each_year_within_two_of_its_weight(world, workers, micro, accum):
    sampler = RehearsalSampler(YEARS3, QUOTAS3, seed=4, world=world, workers=workers, lanes=4, micro=micro, accum=accum)
    steps = global_batches(sampler, world, workers, micro, accum)
    assert len(steps) == 28 and all(len(s) == 16 for s in steps)
    assert worst_deviation(steps, QUOTAS3) < 2
    seen = [(r.year, r.position) for s in steps for r in s]
    assert sorted(seen) == sorted((y, p) for y, q in QUOTAS3.items() for p in range(q))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((2, 0, 4, 2), (1, 0, 4, 4)),
        ((2, 2, 4, 2), (1, 2, 4, 4)),
        ((1, 2, 4, 4), (2, 2, 4, 2)),
        ((4, 2, 2, 2), (2, 1, 4, 2)),
        ((2, 2, 2, 4), (4, 0, 2, 2)),
        ((1, 0, 16, 1), (4, 2, 2, 2)),
    ],
)
def test_resume_mid_step_on_another_world_continues_with_exactly_the_unseen_samples(before, after):
    first = RehearsalSampler(
        YEARS3, QUOTAS3, seed=4, world=before[0], workers=before[1], lanes=4, micro=before[2], accum=before[3]
    )
    whole = global_batches(first, *before)
    cut = 11
    state = json.loads(json.dumps(first.state_dict(cut * 16)))
    second = RehearsalSampler(
        YEARS3, QUOTAS3, seed=4, world=after[0], workers=after[1], lanes=4, micro=after[2], accum=after[3]
    )
    second.load_state_dict(state, after[0], after[1])
    rest = global_batches(second, *after)
    assert len(rest) == 28 - cut
    unseen = sorted((r.year, r.position) for s in whole[cut:] for r in s)
    assert sorted((r.year, r.position) for s in rest for r in s) == unseen
    # A re-split leaves each year's remainder over the new streams to extra draws at the end of
    # the streams: the steps holding the streams' last micro-batches take them, every other step
    # is within 2 as before.
    last = max(1, max(after[1], 1) // after[3])
    assert worst_deviation(rest[:-last], QUOTAS3) < 2
    extras = sum(second._layout.extra)
    assert worst_deviation(rest[-last:], QUOTAS3) < 2 + extras
    assert second.cursors(448) == QUOTAS3
