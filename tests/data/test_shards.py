"""Shard discovery (layouts, URLs, errors), the per-year global order, and the 1.3M-shard scale bar."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from trainer.data.order import YearOrder
from trainer.data.shards import DataError, Shard, find_years, iter_samples, open_shard

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(20)
def test_layout_root_reads_sizes_json_only(shard_root):
    years = find_years(str(shard_root))
    assert list(years) == ["2014", "2015"]
    shards = years["2014"]
    assert len(shards) == 4 and shards.samples == 48
    assert shards[0] == Shard(f"{shard_root}/train/2014/000000.tar", 12)
    assert [s.url.rsplit("/", 1)[1] for s in shards] == [f"{i:06d}.tar" for i in range(4)]
    # sizes.json is trusted as the listing: a shard that is gone is not noticed until read.
    (shard_root / "train/2014/000003.tar").unlink()
    assert find_years(str(shard_root), years=["2014"])["2014"].samples == 48
    # TiC-CLIP's own runs point at a folder of year folders, without a split level.
    assert list(find_years(str(shard_root / "train"))) == ["2014", "2015"]


@pytest.mark.timeout(20)
def test_plain_folder_counts_or_uses_img2dataset_stats(shard_root, caplog):
    folder = shard_root / "train" / "2015"
    (folder / "sizes.json").unlink()
    with caplog.at_level(logging.WARNING):
        shards = find_years(str(folder))["all"]
    assert shards.samples == 48 and "counting samples" in caplog.text
    # img2dataset writes NNNNN_stats.json next to each tar; when present it is used, not the tar.
    for i in range(4):
        (folder / f"{i:06d}_stats.json").write_text(json.dumps({"successes": 10 + i}))
    assert find_years(str(folder))["all"].sizes.tolist() == [10, 11, 12, 13]


@pytest.mark.timeout(20)
def test_brace_pattern(shard_root):
    pattern = f"{shard_root}/train/2014/{{000001..000003}}.tar"
    shards = find_years(pattern)["all"]
    assert [s.url for s in shards] == [f"{shard_root}/train/2014/{i:06d}.tar" for i in (1, 2, 3)]
    assert shards.sizes.tolist() == [12, 12, 12]
    with pytest.raises(DataError, match="000008.tar: no such shard"):
        find_years(f"{shard_root}/train/2014/{{000008..000009}}.tar")


@pytest.mark.timeout(20)
def test_memory_and_file_urls(shard_root):
    base = f"/tic-{uuid.uuid4().hex[:8]}"
    mem = fsspec.filesystem("memory")
    try:
        for path in shard_root.rglob("*"):
            if path.is_file():
                mem.pipe(f"{base}/{path.relative_to(shard_root)}", path.read_bytes())
        years = find_years(f"memory://{base}")
        assert list(years) == ["2014", "2015"] and years["2015"].samples == 48
        url = years["2015"].url(2)
        assert url.startswith("memory://")
        with open_shard(url) as f:
            keys = [s["__key__"] for s in iter_samples(url, f)]
        assert keys == [f"2015{i:07d}" for i in range(24, 36)]
    finally:
        mem.rm(base, recursive=True)
    years = find_years(f"file://{shard_root}", years=["2014"])
    with open_shard(years["2014"].url(0)) as f:
        assert len(list(iter_samples(years["2014"].url(0), f))) == 12


@pytest.mark.timeout(20)
def test_bad_roots_name_the_culprit(tmp_path, shard_root):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        find_years(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/: no .tar shards"):
        find_years(str(tmp_path / "empty"))
    (tmp_path / "noyears" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train: no year folders"):
        find_years(str(tmp_path / "noyears"))
    with pytest.raises(DataError, match=r"no year 2013 \(found 2014, 2015\)"):
        find_years(str(shard_root), years=["2013", "2014"])
    sizes = shard_root / "train" / "2015" / "sizes.json"
    sizes.write_text("{not json")
    with pytest.raises(DataError, match="2015/sizes.json: broken sizes file"):
        find_years(str(shard_root))
    for broken in ([], {"000000.tar": "12"}, {"000000.tar": -1}, {"a.tar": [1], "b.tar": [[2]]}):
        sizes.write_text(json.dumps(broken))
        with pytest.raises(DataError, match="2015/sizes.json: broken sizes file"):
            find_years(str(shard_root))
    with pytest.raises(DataError, match="cannot open shard"):
        open_shard(str(tmp_path / "missing.tar"))
    with pytest.raises(DataError, match="nosuchprotocol://bucket/x: not a URL fsspec can open"):
        find_years("nosuchprotocol://bucket/x")
    # s3fs is not a dependency: an s3:// root names the package to install instead of crashing.
    # (The dev extras install it, for tests/data/test_s3.py; then there is nothing to name.)
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(DataError, match="s3://bucket/tic: this URL needs an fsspec backend.*s3fs"):
            find_years("s3://bucket/tic")


def brute_force(order: YearOrder, p: int) -> list[tuple[int, int, int]]:
    """Pass p by the definition: deal, read lanes in order, interleave rounds longest lane first."""
    perm, g = order.shuffle(p), order.lanes
    lanes = [[(int(t), m) for t in perm[i::g] for m in range(order.sizes[t])] for i in range(g)]
    ranked = sorted(range(g), key=lambda i: (-len(lanes[i]), i))
    out = []
    for k in range(max(len(x) for x in lanes)):
        out += [(r, *lanes[i][k]) for r, i in enumerate(ranked) if len(lanes[i]) > k]
    return out


@pytest.mark.timeout(30)
def test_order_matches_brute_force_and_is_a_bijection_per_pass():
    rng = np.random.default_rng(7)
    for _ in range(200):
        sizes = rng.integers(0, 8, rng.integers(1, 10))
        sizes[rng.integers(len(sizes))] += 1
        order = YearOrder("2016", sizes, int(rng.integers(1, 14)), seed=int(rng.integers(100)))
        for p in (0, 1, 5):
            at = order.locate(np.arange(p * order.size, (p + 1) * order.size)[::-1])
            got = list(zip(at.lanes.tolist(), at.shards.tolist(), at.members.tolist()))[::-1]
            assert got == brute_force(order, p)
            assert np.all(at.passes == p)
            pairs = sorted((s, m) for _, s, m in got)
            assert pairs == sorted((s, m) for s, n in enumerate(sizes) for m in range(n))


@pytest.mark.timeout(10)
def test_order_round_robin_over_lanes_in_file_order():
    order = YearOrder("2014", np.full(6, 5), lanes=3, seed=0)
    at = order.locate(np.arange(30))
    assert at.lanes.tolist() == [0, 1, 2] * 10
    perm = order.shuffle(0)
    for lane in range(3):
        sel = at.lanes == lane
        expect = [(int(t), m) for t in perm[lane::3] for m in range(5)]
        assert list(zip(at.shards[sel].tolist(), at.members[sel].tolist())) == expect
    far = order.locate(np.array([30 * 10**8 + 7]))
    assert far.passes.tolist() == [10**8]


SCALE_SCRIPT = """
import json, sys, time
from itertools import islice

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

import numpy, torch, fsspec
from trainer.data.rehearsal import RehearsalSampler
from trainer.plan import apportion
from trainer.data.shards import find_years
from trainer.data.pipeline import StreamDataset
base = rss("VmRSS")
t = time.perf_counter()
years = find_years(sys.argv[1])
world, workers, total = 512, 8, 90112 * 20500
quotas = apportion(total, {y: s.samples for y, s in years.items()}, multiple=world * workers)
sampler = RehearsalSampler(years, quotas, seed=0, world=world, workers=workers)
first = list(islice(sampler.stream(4095), 2048))
start = time.perf_counter() - t
t = time.perf_counter()
state = json.dumps(sampler.state_dict(total // 2))
half = time.perf_counter() - t
print(json.dumps({"shards": sum(len(s) for s in years.values()), "start_s": start, "rss_mb": rss("VmRSS") - base,
                  "peak_mb": rss("VmHWM") - base, "state_bytes": len(state), "state_at_half_s": half}))
"""


@pytest.mark.timeout(120)
def test_tic_scale_shard_list_starts_fast_and_small(tmp_path):
    per_year = 1_300_000 // 9 + 1
    for i, year in enumerate(range(2014, 2023)):
        folder = tmp_path / "train" / str(year)
        folder.mkdir(parents=True)
        sizes = {f"{j:08d}.tar": 10_000 for j in range(per_year)}
        sizes[f"{per_year - 1:08d}.tar"] = 1234 + i
        (folder / "sizes.json").write_text(json.dumps(sizes))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCALE_SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["shards"] == 9 * per_year >= 1_300_000
    assert got["start_s"] < 5, got
    assert got["peak_mb"] < 500, got
    assert got["state_bytes"] < 1_000_000, got
