"""End to end on a 3-year cumulative plan with unequal year sizes, 2 ranks x 2 workers with
accumulation: every global batch holds each year at its weight (within 2), a SIGKILL mid-year
resumes bit for bit, and a 2-rank checkpoint resumed on 1 rank trains on exactly the unseen samples."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import write_year
from tests.dist_helpers import clean_env, free_port
from tests.run_helpers import demo_args, losses, wait_for_step, weights_equal
from trainer.data.shards import find_years

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZES = {"2014": 96, "2015": 48, "2016": 144}
STEPS = 10  # optimizer steps per plan step; plan steps: 2014-2015, then 2014-2016
GLOBAL = 8

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]


def _settings(root: Path, runs: Path, model: Path, name: str, micro: int) -> list[str]:
    return demo_args(
        root,
        runs,
        model,
        name,
        f"train.global_batch={GLOBAL}",
        f"train.micro_batch={micro}",
        f"train.samples={GLOBAL * STEPS}",
        "data.workers=2",
        "data.lanes=4",
        "plan.years=[2014,2015,2016]",
        "plan.strategy=cumulative-all",
        "plan.first_step_years=2",
        "optim.warmup_steps=2",
        "deepspeed.zero_stage=2",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=8",
        "logging.every_steps=1",
        "logging.record_keys=true",
    )


def _two_ranks(args: list[str]) -> list[str]:
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "launch" / "train.py"),
        *args,
    ]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _keys(run: Path) -> dict[int, list[set[str]]]:
    """Per optimizer step, the set of keys each rank trained on (the last record of a redone step)."""
    out: dict[int, dict[int, set[str]]] = {}
    for rank, f in enumerate(sorted((run / "keys").glob("rank-*.jsonl"))):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["global_step"], {})[rank] = set(r["keys"])
    return {step: [ranks[r] for r in sorted(ranks)] for step, ranks in out.items()}


def _year_counts(keys: set[str]) -> Counter:
    return Counter(k[:4] for k in keys)  # write_year's keys are <year><index>


@pytest.fixture(scope="module")
def years_run(tmp_path_factory, tiny_model_json: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("years")
    root, runs = base / "data", base / "runs"
    for year, n in SIZES.items():
        write_year(root, year, n=n, per_shard=12)
    _run(_two_ranks(_settings(root, runs, tiny_model_json, "two", 2)), base / "two.log")
    return {"two": runs / "two", "root": root, "runs": runs, "base": base, "model": tiny_model_json}


def test_every_global_batch_holds_each_year_at_its_weight(years_run: dict[str, Path]) -> None:
    keys = _keys(years_run["two"])
    assert sorted(keys) == list(range(1, 2 * STEPS + 1))
    for step, ranks in keys.items():
        rank0, rank1 = ranks
        assert len(rank0) == len(rank1) == GLOBAL // 2 and not rank0 & rank1
        years = [y for y in SIZES if y != "2016" or step > STEPS]
        total = sum(SIZES[y] for y in years)
        counts = _year_counts(rank0 | rank1)
        assert set(counts) <= set(years)
        for y in years:  # cumulative-all: each year weighted by its size
            assert abs(counts[y] - SIZES[y] * GLOBAL / total) < 2, (step, counts)


def test_sigkill_in_the_second_year_then_resume_matches_uninterrupted(years_run: dict[str, Path]) -> None:
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    kill_at = random.Random(seed).randint(STEPS + 2, 2 * STEPS - 1)
    args = [*_settings(years_run["root"], years_run["runs"], years_run["model"], "killed", 2), "--resume", "auto"]
    log = open(years_run["base"] / "killed.log", "w")
    proc = subprocess.Popen(
        _two_ranks(args), stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=REPO, start_new_session=True
    )
    wait_for_step(years_run["runs"] / "killed", kill_at, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(_two_ranks(args), years_run["base"] / "killed-resumed.log")
    killed = years_run["runs"] / "killed"
    assert losses(killed) == losses(years_run["two"]), f"KILL_SEED={seed}: SIGKILL after step {kill_at}"
    assert weights_equal(killed, years_run["two"], "year-2016"), f"KILL_SEED={seed}"
    assert _keys(killed) == _keys(years_run["two"]), f"KILL_SEED={seed}"


def test_two_rank_checkpoint_mid_year_resumes_on_one_rank_with_exactly_the_unseen_samples(
    years_run: dict[str, Path],
) -> None:
    """step-14 of the 2-rank run (4 steps into 2014-2016), resumed on 1 rank with the micro-batch
    doubled: the sampler re-splits, the last 6 steps train on exactly the samples the 2-rank run
    had left, each year at its weight."""
    shrunk = years_run["runs"] / "on-one"
    shutil.copytree(years_run["two"], shrunk)
    checkpoints = shrunk / "checkpoints"
    for tag in ("year-2016", "step-18"):
        shutil.rmtree(checkpoints / tag)
    assert (checkpoints / "step-14" / "COMPLETE").is_file()
    (shrunk / "metrics.jsonl").unlink()
    shutil.rmtree(shrunk / "keys")
    train = str(REPO / "launch" / "train.py")
    args = _settings(years_run["root"], years_run["runs"], years_run["model"], "on-one", 4)
    _run([sys.executable, train, *args, "--resume", "auto"], years_run["base"] / "on-one.log")
    before, after = _keys(years_run["two"]), _keys(shrunk)
    assert sorted(after) == list(range(15, 2 * STEPS + 1))
    unseen = [k for s in range(15, 2 * STEPS + 1) for k in before[s][0] | before[s][1]]
    trained = [k for s in after for k in after[s][0]]
    assert sorted(trained) == sorted(unseen) and len(set(trained)) == len(trained)
    total = sum(SIZES.values())
    for step, (keys,) in after.items():
        assert len(keys) == GLOBAL
        for y, n in _year_counts(keys).items():
            # The re-split's remainders go to the streams' last draws (trainer/data/rehearsal.py).
            assert abs(n - SIZES[y] * GLOBAL / total) < (2 if step < 2 * STEPS else 4), (step, keys)


def test_cumulative_exp_trains_on_exactly_the_hash_chosen_buffers(years_run: dict[str, Path]) -> None:
    """The second plan step draws 2014 from a replay buffer: the keys it trains on are
    those of the buffers' samples of smallest hash, chosen from the shard sizes alone."""
    train = str(REPO / "launch" / "train.py")
    args = _settings(years_run["root"], years_run["runs"], years_run["model"], "exp", 8)
    _run(
        [sys.executable, train, *args, "plan.strategy=cumulative-exp", "data.workers=1"], years_run["base"] / "exp.log"
    )
    run = years_run["runs"] / "exp"
    step = json.loads((run / "plan.json").read_text())["steps"][1]
    assert step["buffered"] == ["2014"]  # D = 144: 72 of 2014 (96), all of 2015 (48 < 72)
    years = find_years(str(years_run["root"]), years=["2014", "2015"])
    keys = _keys(run)
    trained = {k for s in range(STEPS + 1, 2 * STEPS + 1) for k in keys[s][0]}
    for y in step["buffered"]:
        buffer = years[y].subset(step["pool"][y], 0, y)
        want = {
            f"{y}{int(buffer.names[i][:6]) * 12 + buffer.member(i, k):07d}"
            for i in range(len(buffer))
            for k in range(int(buffer.sizes[i]))
        }
        got = {k for k in trained if k.startswith(y)}
        assert got <= want and len(got) == min(step["quotas"][y], len(want))
