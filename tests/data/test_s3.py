"""Shards on S3, read through s3fs from moto's server behind the fault proxy of tests/s3_server.py.

botocore makes one attempt per request here (AWS_MAX_ATTEMPTS=1) and, in this process, s3fs too,
so every injected fault reaches the trainer's retry path (pipeline._OpenShard, shards.retrying).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import s3fs
import torch

from tests.conftest import write_year
from tests.data.test_pipeline import build, planned, run, write_root
from tests.dist_helpers import clean_env, deepspeed_train
from tests.run_helpers import demo_args, records
from tests.s3_server import BUCKET, Fault, LocalS3, local_s3
from trainer.data import shards
from trainer.data.pipeline import _OpenShard
from trainer.data.shards import RETRIES, DataError, find_years, iter_samples

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Any:
    with local_s3() as s3:
        yield s3


@pytest.fixture
def s3(server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The server with no faults yet, and this process's s3fs pointed at its proxy."""
    server.faults.clear()
    server.gets.clear()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", LocalS3.s3fs_options())  # FSSPEC_S3 is read at import only
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs retries SlowDown and cut bodies itself
    monkeypatch.setattr(shards, "RETRY_DELAY", 0.01)
    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
    yield server
    s3fs.S3FileSystem.clear_instance_cache()


def upload(s3: LocalS3, local: Path) -> str:
    """Copy the dataset at `local` to a fresh prefix (straight to moto, past the proxy); its s3:// URL."""
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.direct}, default_block_size=5 * 2**20)
    for split in (p.name for p in local.iterdir() if p.is_dir()):
        fs.put(str(local / split), f"{prefix}/{split}", recursive=True)
    return f"s3://{prefix}"


def plain(sample: dict[str, Any] | None) -> dict[str, Any]:
    """A sample's key and members, without where it was read from."""
    assert sample is not None
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def reopened(caplog: pytest.LogCaptureFixture) -> int:
    return sum("reopening in" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_faults_mid_shard_are_retried_from_the_member_reached(s3, tmp_path, caplog):
    """500, SlowDown and a body cut off mid-shard: the shard reads exactly as the local file does."""
    write_year(tmp_path, "2014", n=24, per_shard=24)  # one shard of ~150 kB: ~12 ranged GETs
    root = upload(s3, tmp_path)
    name = "2014/000000.tar"
    with open(tmp_path / "train" / name, "rb") as f:
        local = [plain(s) for s in iter_samples("local", f)]
    s3.faults[:] = [Fault("500", name, at=(1, 5)), Fault("drop", name, at=(8,)), Fault("503", name, at=(10, 11))]
    caplog.set_level(logging.WARNING, "trainer")
    shard = _OpenShard(f"{root}/train/{name}", 0)
    got = [plain(shard.get(i)) for i in range(24)]
    shard.close()
    assert got == local
    assert s3.injected() == 5 and reopened(caplog) == 5  # every fault went through our retry
    assert len(s3.gets) > 12 + 5  # and each retry re-read the shard's start


@pytest.mark.timeout(120)
def test_a_shard_that_keeps_failing_counts_as_missing_and_the_run_goes_on(s3, tmp_path, caplog):
    keys = write_root(tmp_path)
    root = upload(s3, tmp_path)
    s3.faults[:] = [Fault("500", "2014/000001.tar", first=10**6)]
    caplog.set_level(logging.WARNING, "trainer")
    ds = build(root, {"2014": 40, "2015": 24}, workers=0, micro=4, lanes=1, max_bad_frac=0.2)
    batches = run(ds)
    bad: dict[str, int] = {}
    for b in batches:
        for reason, n in b["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    assert bad == {"missing": 10, "substituted": 10}  # the shard's 10 draws, each counted once
    assert reopened(caplog) == RETRIES and s3.injected() == RETRIES + 1
    lost = set(keys["2014"][10:20])
    got = [k for b in batches for k in b["key"]]
    want = [k for b in planned(ds, keys) for k in b]
    assert len(got) == len(want) == 64
    for w, have in zip(want, got):  # every other draw as planned; a lost one replaced by a 2014 sample
        assert have == w if w not in lost else (have in keys["2014"] and have not in lost)


@pytest.mark.timeout(120)
def test_a_failing_shard_beyond_max_bad_frac_stops_the_run_in_one_line(s3, tmp_path):
    write_root(tmp_path)
    root = upload(s3, tmp_path)
    s3.faults[:] = [Fault("500", "2014/000001.tar", first=10**6)]
    ds = build(root, {"2014": 40, "2015": 24}, workers=0, micro=4, lanes=1, max_bad_frac=0.05)
    with pytest.raises(DataError) as failed:
        run(ds)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"{root}/train/2014/000001.tar: 6 of ") and "(last: missing" in message


@pytest.mark.timeout(120)
def test_listing_survives_a_transient_error_on_sizes_json(s3, tmp_path):
    write_root(tmp_path)
    root = upload(s3, tmp_path)
    s3.faults[:] = [Fault("500", "2014/sizes.json", first=2), Fault("503", "2015/sizes.json", first=1)]
    years = find_years(root)
    assert {y: v.samples for y, v in years.items()} == {"2014": 40, "2015": 24}
    assert s3.injected() == 3
    s3.faults[:] = [Fault("500", "2014/sizes.json", first=10**6)]
    with pytest.raises(DataError, match=rf"{root}/train/2014/sizes.json: still failing after {RETRIES} retries"):
        find_years(root)


def _make_shards(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        # Without the s3 fixture's FSSPEC_S3 unless `env` has it: its small blocks are for reading.
        env={**{k: v for k, v in clean_env().items() if k != "FSSPEC_S3"}, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    return {p[len(root) :]: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.timeout(300)
@pytest.mark.reliability  # a whole make_shards run to S3 and to a folder: 12-18 s
def test_make_shards_writes_the_same_bytes_to_s3_as_to_a_folder(s3, tmp_path):
    out = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    args = ["--synthetic", "--years", "2014-2015", "--samples-per-year", "40", "--eval-samples", "8"]
    _make_shards([*args, "--shard-size", "16", "--out", f"s3://{out}"], s3.env(small_reads=False))
    _make_shards([*args, "--shard-size", "16", "--out", str(tmp_path / "local")], {})
    direct = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.direct})
    remote, local = _files(direct, out), _files(fsspec.filesystem("file"), str(tmp_path / "local"))
    assert remote.keys() == local.keys() and "/manifest.json" in remote and "/train/2015/sizes.json" in remote
    assert remote == local
    assert {y: v.samples for y, v in find_years(f"s3://{out}").items()} == {"2014": 40, "2015": 40}


def _train_args(root: str, runs: Path, model: Path, name: str) -> list[str]:
    return demo_args(
        root,
        runs,
        model,
        name,
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.samples=48",
        "data.workers=2",
        "plan.years=[2014,2015]",
        "plan.strategy=cumulative-all",
        "optim.warmup_steps=1",
        "eval.enabled=false",
        "logging.every_steps=1",
    )


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["global_step"], r["loss"]) for r in records(run)]


@pytest.mark.reliability
@pytest.mark.timeout(600)
def test_two_rank_run_on_faulty_s3_equals_the_run_on_a_local_copy(s3, tmp_path, tiny_model_json):
    """make_shards --out s3://, then 2 ranks x 2 workers train through the faulty proxy: same bits."""
    source = tmp_path / "source"
    write_year(source, "2014", n=64, per_shard=16)
    write_year(source, "2015", n=128, per_shard=32)  # unequal years: step 2 mixes them 1:2
    out = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    _make_shards(
        [
            "--shards",
            str(source / "train" / "*" / "*.tar"),
            "--eval-frac",
            "0",
            "--shard-size",
            "16",
            "--out",
            f"s3://{out}",
        ],
        s3.env(small_reads=False),
    )
    local = tmp_path / "local"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.direct}).get(out, str(local), recursive=True)
    assert json.loads((local / "manifest.json").read_text())["splits"]["train"] == {"2014": 64, "2015": 128}

    runs = tmp_path / "runs"
    # s3fs in the ranks keeps its own retries: it absorbs the cut bodies and SlowDowns; the 500s
    # (which s3fs never retries, nor botocore with one attempt) reach the trainer's retry path.
    s3.faults[:] = [
        Fault("500", "sizes.json", at=(1,)),
        Fault("500", ".tar", at=(3, 12)),
        Fault("drop", ".tar", at=(7, 18)),
        Fault("503", ".tar", at=(22,)),
    ]
    deepspeed_train(_train_args(f"s3://{out}", runs, tiny_model_json, "s3"), tmp_path / "s3.log", env=s3.env())
    assert [f.injected for f in s3.faults] == [1, 2, 2, 1], s3.faults
    log = (tmp_path / "s3.log").read_text()
    assert log.count("reopening in") >= 2 and "sizes.json" in log and "retry 1 of" in log

    s3.faults.clear()
    deepspeed_train(_train_args(str(local), runs, tiny_model_json, "local"), tmp_path / "local.log")
    remote_losses, local_losses = _losses(runs / "s3"), _losses(runs / "local")
    assert len(remote_losses) == 12 and remote_losses == local_losses
    from trainer.weights.consolidate import load_weights

    for tag in ("year-2014", "year-2015"):
        wa, wb = load_weights(runs / "s3" / "checkpoints", tag), load_weights(runs / "local" / "checkpoints", tag)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), tag
