"""The loader end to end: real shards, real DataLoader workers, open_clip transforms, gloo ranks."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from pathlib import Path

import fsspec
import open_clip
import pytest
import torch
import torch.distributed as dist

from tests.conftest import write_year
from tests.dist_helpers import run_ranks
from trainer.data.pipeline import StreamDataset, build_loader
from trainer.data.rehearsal import RehearsalSampler
from trainer.data.shards import DataError, find_years

PREPROCESS = open_clip.image_transform(32, is_train=True)
TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=16)
PER_SHARD = {"2014": 10, "2015": 6}


def write_root(root: Path, corrupt: tuple[int, ...] = ()) -> dict[str, list[str]]:
    """2014: 40 samples in shards of 10; 2015: 24 in shards of 6. Returns the keys per year."""
    return {
        "2014": write_year(root, "2014", 40, PER_SHARD["2014"], corrupt=corrupt),
        "2015": write_year(root, "2015", 24, PER_SHARD["2015"]),
    }


def build(
    root: str,
    quotas: dict[str, int],
    *,
    world=1,
    rank=0,
    workers=2,
    micro=4,
    lanes=0,
    seed=0,
    max_bad_frac=0.01,
    state=None,
) -> StreamDataset:
    years = find_years(root, years=sorted(quotas))
    sampler = RehearsalSampler(years, quotas, seed=seed, world=world, workers=workers, lanes=lanes)
    if state is not None:
        sampler.load_state_dict(state, world, workers)
    return StreamDataset(
        sampler,
        rank=rank,
        world=world,
        workers=workers,
        micro_batch=micro,
        preprocess=PREPROCESS,
        tokenizer=TOKENIZER,
        seed=seed,
        max_bad_frac=max_bad_frac,
    )


def planned(ds: StreamDataset, keys: dict[str, list[str]]) -> list[list[str]]:
    """The rank's batches from the sampler alone: batch t is worker t % W's batch t // W."""
    w, mb = max(ds.workers, 1), ds.micro_batch
    refs = [list(ds.sampler.stream(ds.rank * w + i)) for i in range(w)]
    return [
        [keys[r.year][r.shard * PER_SHARD[r.year] + r.member] for r in refs[t % w][t // w * mb : (t // w + 1) * mb]]
        for t in range(len(ds))
    ]


def run(ds: StreamDataset) -> list[dict]:
    batches = iter(build_loader(ds, prefetch_factor=2))
    try:
        return list(batches)
    finally:
        # After a worker's exception torch's reraise leaves a reference cycle, and an iterator the
        # garbage collector shuts down waits 5 s per worker; shutting down here takes milliseconds.
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()


@pytest.mark.timeout(60)
def test_workers_yield_the_planned_keys_in_order(tmp_path):
    keys = write_root(tmp_path)
    ds = build(str(tmp_path), {"2014": 32, "2015": 16}, workers=2, micro=4)
    batches = run(ds)
    assert [b["key"] for b in batches] == planned(ds, keys)
    assert len(batches) == len(ds) == 12
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, 16) and b["text"].dtype == torch.long
    assert b["cls"].tolist() == [int(k[-7:]) % 8 for k in b["key"]]
    assert [m["uid"] for m in b["meta"]] == b["key"]
    assert sum(b["year_counts"].values()) == 4 and b["bad"] == {}
    years = [y for b in batches for y in b["year"]]
    assert years.count("2014") == 32 and years.count("2015") == 16


@pytest.mark.timeout(60)
def test_corrupt_samples_are_counted_and_replaced_in_place(tmp_path):
    keys = write_root(tmp_path, corrupt=(0, 3, 17))
    # A shard shorter than sizes.json claims: its last listed member is missing.
    sizes = tmp_path / "train" / "2014" / "sizes.json"
    sizes.write_text(json.dumps({**json.loads(sizes.read_text()), "000003.tar": 11}))
    keys["2014"].insert(40, "absent")
    ds = build(str(tmp_path), {"2014": 41, "2015": 23}, workers=0, micro=4, lanes=1, max_bad_frac=0.2)
    batches = run(ds)
    plan = [k for b in planned(ds, keys) for k in b]
    got = [k for b in batches for k in b["key"]]
    years = [y for b in batches for y in b["year"]]
    assert len(got) == len(plan) == 64
    bad = {}
    for b in batches:
        for reason, n in b["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    assert bad == {"bad_image": 3, "missing": 1, "substituted": 4}
    broken = {keys["2014"][i] for i in (0, 3, 17)} | {"absent"}
    for i, (want, have) in enumerate(zip(plan, got)):
        if want not in broken:
            assert have == want
            continue
        year_keys = [k for k, y in zip(plan, years) if y == years[i] and k not in broken]
        before = [k for k in plan[:i] if k in year_keys]
        # The latest good sample of the same year, or the next one when there is none yet.
        assert have == (before[-1] if before else next(k for k in plan[i:] if k in year_keys))


@pytest.mark.timeout(60)
def test_too_many_corrupt_samples_fail_naming_the_shard(tmp_path):
    write_root(tmp_path, corrupt=tuple(range(0, 40, 2)))
    # Judged over at least 100 samples: 5% allows 5 bad ones in these 20-sample streams.
    ds = build(str(tmp_path), {"2014": 40}, workers=2, micro=4, max_bad_frac=0.05)
    with pytest.raises(DataError, match=r"train/2014/00000\d\.tar: 6 of \d+ samples of stream \d are corrupt"):
        run(ds)


@pytest.mark.timeout(60)
def test_augmentation_depends_on_key_not_worker_or_caller_rng(tmp_path):
    write_root(tmp_path)
    quotas = {"2014": 16, "2015": 8}
    images = {}
    for workers in (0, 2):
        for b in run(build(str(tmp_path), quotas, workers=workers, micro=4, lanes=2)):
            for key, image in zip(b["key"], b["image"]):
                images.setdefault(workers, {})[key] = image
    assert images[0].keys() == images[2].keys() and len(images[0]) == 24
    for key in images[0]:
        assert torch.equal(images[0][key], images[2][key])
    # Iterated in this process (DataLoader itself draws a seed), the caller's RNG is untouched.
    rng = torch.random.get_rng_state()
    other = list(build(str(tmp_path), quotas, workers=0, micro=4, lanes=2, seed=1))
    assert torch.equal(rng, torch.random.get_rng_state())
    reseeded = {k: im for b in other for k, im in zip(b["key"], b["image"])}
    common = sorted(reseeded.keys() & images[0].keys())
    assert common and not any(torch.equal(reseeded[k], images[0][k]) for k in common)


@pytest.mark.timeout(60)
def test_memory_url_shards_end_to_end(tmp_path):
    keys = write_root(tmp_path)
    base, mem = f"/pipe-{uuid.uuid4().hex[:8]}", fsspec.filesystem("memory")
    try:
        for path in tmp_path.rglob("*"):
            if path.is_file():
                mem.pipe(f"{base}/{path.relative_to(tmp_path)}", path.read_bytes())
        ds = build(f"memory://{base}", {"2014": 20, "2015": 12}, workers=2, micro=4)
        assert [b["key"] for b in run(ds)] == planned(ds, keys)
    finally:
        mem.rm(base, recursive=True)


@pytest.mark.timeout(60)
def test_resume_mid_step_continues_the_same_batches(tmp_path):
    keys = write_root(tmp_path)
    quotas = {"2014": 24, "2015": 24}
    whole = build(str(tmp_path), quotas, workers=2, micro=4)
    expected = [b["key"] for b in run(whole)]
    with pytest.raises(ValueError, match="same count"):
        whole.state_dict(3)
    state = json.loads(json.dumps(whole.state_dict(4)))
    again = build(str(tmp_path), quotas, workers=2, micro=4, state=state)
    assert [b["key"] for b in run(again)] == expected[4:] == [k for k in planned(again, keys)]
    # On one worker fewer the remaining samples are re-split: still exactly the unseen ones.
    fewer = build(str(tmp_path), quotas, workers=0, micro=4, state=state)
    rest = [k for b in run(fewer) for k in b["key"]]
    assert sorted(rest + [k for b in expected[:4] for k in b]) == sorted(k for b in expected for k in b)


def _rank_main(rank: int, world: int, root: str, out: str, keys: dict[str, list[str]]) -> None:
    # Ranks made by mp.spawn inherit "spawn" for their own children; ranks started by torchrun or
    # deepspeed are fresh processes whose DataLoader workers fork, as here.
    multiprocessing.set_start_method("fork", force=True)
    ds = build(root, {"2014": 32, "2015": 16}, world=world, rank=rank, workers=2, micro=2, lanes=4)
    seen = []
    for batch in build_loader(ds):
        # A collective per batch, as training does: unequal batch counts would hang here.
        dist.all_reduce(torch.ones(1))
        seen.append(batch["key"])
    Path(out, f"rank{rank}.json").write_text(json.dumps({"batches": seen, "planned": planned(ds, keys)}))


@pytest.mark.timeout(120)
def test_two_gloo_ranks_with_two_workers_each(tmp_path):
    root = tmp_path / "data"
    keys = write_root(root)
    run_ranks(_rank_main, 2, str(root), str(tmp_path), keys)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 12
    for r in ranks:
        assert r["batches"] == r["planned"]
    got = [k for r in ranks for b in r["batches"] for k in b]
    assert len(got) == len(set(got)) == 48, "ranks overlap"
    sampler = build(str(root), {"2014": 32, "2015": 16}, world=2, workers=2, micro=2, lanes=4).sampler
    plan = {keys[r.year][r.shard * PER_SHARD[r.year] + r.member] for s in range(4) for r in sampler.stream(s)}
    assert set(got) == plan
