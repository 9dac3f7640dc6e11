"""The reliability suite (`make reliability`): faults injected into whole 2-rank runs, each checked
against an uninterrupted run of the same settings: nothing is lost (the same losses, bit for bit the
same weights), or the fault is one line on stderr, exit 2, and nothing touched.

Every run here trains 2 years of unequal size (96 and 48 samples, cumulative-all) on 2 CPU ranks
with 2 DataLoader workers each, through the deepspeed launcher, with `PauseInSave` as objective
(CLIP itself; it only adds the pause that lets a test kill a rank mid-save). Random steps come
from a seed named in every failure message (RELIABILITY_SEED=... reruns it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import write_year
from tests.dist_helpers import clean_env, free_port
from tests.fs_helpers import read_only, resize, small_disk
from tests.run_helpers import demo_args, losses, records, wait_for_step, weights_equal
from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.objectives.clip import ClipObjective

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")
STEPS = 24  # 12 optimizer steps per year
SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 10_000))

pytestmark = pytest.mark.reliability

PAUSE_TAG, PAUSE_FLAG, STEP_SLEEP = "PAUSE_SAVE_TAG", "PAUSE_SAVE_FLAG", "STEP_SLEEP_S"


class PauseInSave(ClipObjective):
    """CLIP, whose rank 1 stops inside DeepSpeed's save of checkpoint $PAUSE_SAVE_TAG, before writing
    its own optimizer shard, and says so (its pid) in the file $PAUSE_SAVE_FLAG; with $STEP_SLEEP_S,
    every optimizer step lasts that much longer (so a signal surely lands mid-run)."""

    def __init__(self, cfg: Config, dist: DistInfo, options: Any) -> None:
        super().__init__(cfg, dist, options)
        self.sleep = float(os.environ.get(STEP_SLEEP, "0"))
        tag, flag = os.environ.get(PAUSE_TAG), os.environ.get(PAUSE_FLAG)
        if tag and flag and dist.rank == 1:
            save = torch.save

            def paused(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
                if f"/{tag}/" in str(f) and "optim_states" in str(f):
                    Path(flag).write_text(str(os.getpid()))
                    time.sleep(600)
                return save(obj, f, *args, **kwargs)

            torch.save = paused

    def after_step(self, outputs: Any) -> None:
        time.sleep(self.sleep)


def _settings(root: Path, runs: Path, model: Path, name: str, *extra: str) -> list[str]:
    return demo_args(
        root,
        runs,
        model,
        name,
        "objective.name=tests.test_reliability:PauseInSave",
        "plan.years=[2014,2015]",
        "plan.strategy=cumulative-all",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.samples=96",
        "data.workers=2",
        "optim.warmup_steps=2",
        "checkpoint.every_steps=2",  # mid-year saves wait for all 2 workers: even steps
        "logging.every_steps=1",
        *extra,
    )


def _deepspeed(args: list[str]) -> list[str]:
    bin_dir = Path(sys.executable).parent
    return [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *args]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The launch environment; the ranks import PauseInSave from this file."""
    return {**clean_env(), "PYTHONPATH": str(REPO), **(extra or {})}


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(env), cwd=REPO, timeout=500)


def _ok(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    assert _run(cmd, log, env).returncode == 0, log.read_text()[-3000:]


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A launch in its own process group, as a SLURM step is."""
    return subprocess.Popen(
        cmd,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=_env(env),
        cwd=REPO,
        start_new_session=True,
    )


def _wait_group_gone(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until every process of the launch's group has ended: the launcher may die first (deepspeed's
    runner does on SIGTERM) while its ranks are still saving."""
    proc.wait(timeout=timeout)
    deadline = time.time() + timeout
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        assert time.time() < deadline, "the launch's processes did not end"
        time.sleep(0.2)


def _errors(stderr: str) -> list[str]:
    """What a user reads as errors: our one-line messages and anything that looks like a traceback."""
    return [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def _tree(run: Path) -> dict[str, str]:
    """Every file of a run folder (but its lock) and a hash of its bytes."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _same_as_reference(run: Path, reference: Path) -> None:
    assert losses(run) == losses(reference), f"RELIABILITY_SEED={SEED}"
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    for tag in ("year-2014", "year-2015"):
        assert weights_equal(run, reference, tag), f"{tag}, RELIABILITY_SEED={SEED}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_json: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reliability")
    root, runs = base / "data", base / "runs"
    write_year(root, "2014", n=96, per_shard=16)
    write_year(root, "2015", n=48, per_shard=24)
    _ok(_deepspeed(_settings(root, runs, tiny_model_json, "reference")), base / "reference.log")
    return {"base": base, "root": root, "runs": runs, "model": tiny_model_json, "reference": runs / "reference"}


@pytest.mark.timeout(900)
def test_sigterm_to_the_process_group_then_a_relaunch(setup: dict[str, Path]) -> None:
    """SLURM's preemption signal to every process at a random step: the run saves, exits 0 and resumes
    to the reference. Once it has finished, a relaunch without --resume is refused, touching nothing."""
    base, runs = setup["base"], setup["runs"]
    args = _settings(setup["root"], runs, setup["model"], "preempted")
    stop_at = random.Random(SEED).randint(2, STEPS - 4)
    proc = _start(_deepspeed(args), base / "preempted.log", env={STEP_SLEEP: "0.3"})
    wait_for_step(runs / "preempted", stop_at, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _wait_group_gone(proc)  # the launcher's own status is its reaction to the signal it got
    log = (base / "preempted.log").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("train: stopped by SIGTERM after saving step-")]
    assert len(stopped) == 2 and stopped[0] == stopped[1], log[-3000:]  # both ranks, the same checkpoint, exit 0
    assert "Traceback" not in log, log[-3000:]
    tag = stopped[0].rsplit(" ", 1)[1]
    assert (runs / "preempted" / "checkpoints" / "latest").read_text().strip() == tag
    _ok(_deepspeed([*args, "--resume", "auto"]), base / "preempted-resumed.log")
    _same_as_reference(runs / "preempted", setup["reference"])

    before = _tree(runs / "preempted")
    again = subprocess.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=200
    )
    assert again.returncode == 2, again.stderr[-3000:]
    assert _errors(again.stderr) == [again.stderr.strip().splitlines()[-1]]
    assert "already has" in again.stderr and "--resume auto" in again.stderr
    assert _tree(runs / "preempted") == before


@pytest.mark.timeout(900)
def test_sigkill_of_one_rank_inside_save_checkpoint(setup: dict[str, Path]) -> None:
    """Rank 1 killed while DeepSpeed writes step-6 (rank 0's files already there): step-4 stays the
    latest, step-6 is never COMPLETE, and the resumed run ends equal to the reference."""
    base, runs = setup["base"], setup["runs"]
    args = _settings(setup["root"], runs, setup["model"], "killed-in-save")
    flag = base / "paused-pid"
    proc = _start(_deepspeed(args), base / "killed.log", env={PAUSE_TAG: "step-6", PAUSE_FLAG: str(flag)})
    deadline = time.time() + 300
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, (base / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    ckpts = runs / "killed-in-save" / "checkpoints"
    deadline = time.time() + 60
    while not any((ckpts / "step-6").glob("*model_states.pt")):  # rank 0's share of step-6
        assert time.time() < deadline, "rank 0 wrote nothing of step-6"
        time.sleep(0.1)
    # While it is live, a second launch on the run is refused, naming the holder.
    second = subprocess.run(
        [sys.executable, TRAIN, *args, "--resume", "auto"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=200,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    assert _errors(second.stderr) == [second.stderr.strip().splitlines()[-1]]
    assert "in use by another launch (pid " in second.stderr, second.stderr
    os.kill(int(flag.read_text()), signal.SIGKILL)
    try:
        proc.wait(timeout=120)  # the launcher ends the surviving rank
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and a scheduler anything left
    _wait_group_gone(proc)
    assert proc.returncode != 0
    assert (ckpts / "latest").read_text().strip() == "step-4"
    assert (ckpts / "step-4" / "COMPLETE").is_file() and not (ckpts / "step-6" / "COMPLETE").exists()
    _ok(_deepspeed([*args, "--resume", "auto"]), base / "killed-resumed.log")
    redone = [r["global_step"] for r in records(runs / "killed-in-save")]
    assert redone.count(5) == 2 and redone.count(4) == 1  # resumed from step-4, not from the start
    _same_as_reference(runs / "killed-in-save", setup["reference"])


def _truncate_after(tar_path: Path, samples: int) -> None:
    """Cut a shard at the first byte of sample `samples`: the earlier ones read whole, the rest are gone."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first = next(m for m in members if m.name.startswith(keys[samples] + "."))
    with open(tar_path, "r+b") as f:
        f.truncate(first.offset)


@pytest.mark.timeout(900)
def test_corrupt_images_and_a_truncated_tar_are_skipped_and_counted_exactly(setup: dict[str, Path]) -> None:
    """1% corrupt images in each year and one shard cut short, trained sequentially, each year in
    whole passes: every pass meets each planted fault once, and years.jsonl counts exactly that."""
    base = setup["base"]
    root, runs = base / "damaged", base / "damaged-runs"
    write_year(root, "2014", n=200, per_shard=25, corrupt=(17, 140))
    write_year(root, "2015", n=100, per_shard=25, corrupt=(5,))
    _truncate_after(root / "train" / "2015" / "000003.tar", 10)  # members 85..99 of 2015 are lost
    args = _settings(
        root,
        runs,
        setup["model"],
        "damaged",
        "plan.strategy=sequential",
        "train.samples=400",  # 2 passes over 2014, 4 over 2015
        "data.max_bad_frac=0.5",
        "checkpoint.every_steps=0",
    )
    _ok(_deepspeed(args), base / "damaged.log")
    years = [json.loads(line) for line in (runs / "damaged" / "years.jsonl").read_text().splitlines()]
    assert [y["year"] for y in years] == ["2014", "2015"]
    assert years[0]["skipped"] == {"bad_image": 2 * 2, "substituted": 2 * 2}
    assert years[1]["skipped"] == {"bad_image": 4 * 1, "missing": 4 * 15, "substituted": 4 * 16}
    assert all(r["loss"] == r["loss"] for r in records(runs / "damaged"))  # finite: JSON has no NaN anyway


@pytest.mark.timeout(900)
def test_a_full_disk_refuses_the_save_and_the_run_resumes_once_there_is_room(setup: dict[str, Path]) -> None:
    """The run folder on a real tmpfs with room for the first checkpoint only: the second save is
    refused (one line, exit 2, the first intact as latest); grown, the run resumes to the reference."""
    base = setup["base"]
    probe = setup["reference"] / "checkpoints" / "year-2014"  # a step checkpoint is as large
    size = sum(p.stat().st_size for p in probe.rglob("*") if p.is_file())
    with small_disk(base / "disk", f"{int(size * 1.6) // 1024 + 64}k") as disk:
        args = _settings(setup["root"], disk, setup["model"], "full", "checkpoint.min_free_gb=0")
        done = _run(_deepspeed(args), base / "full.log")
        log = (base / "full.log").read_text()
        assert done.returncode != 0, log[-3000:]
        refused = [line for line in log.splitlines() if line.startswith("train: error:")]
        assert len(refused) == 1 and "step-4: not saved (rank " in refused[0] and "free" in refused[0], log[-3000:]
        assert "Traceback" not in log
        ckpts = disk / "full" / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step-2" and not (ckpts / "step-4").exists()
        resize(disk, f"{size * 40 // 1024 + 1024}k")
        _ok(_deepspeed([*args, "--resume", "auto"]), base / "full-resumed.log")
        _same_as_reference(disk / "full", setup["reference"])


@pytest.mark.timeout(600)
def test_an_unwritable_run_dir_is_one_line_on_two_ranks(setup: dict[str, Path]) -> None:
    base = setup["base"]
    with small_disk(base / "ro", "1m") as disk:
        read_only(disk)
        done = _run(_deepspeed(_settings(setup["root"], disk, setup["model"], "ro")), base / "ro.log")
        log = (base / "ro.log").read_text()
        assert done.returncode != 0
        assert [line for line in log.splitlines() if line.startswith("train: error:")] == [
            f"train: error: {disk}/ro: cannot write the run folder (Read-only file system)"
        ], log[-3000:]
        assert "Traceback" not in log and list(disk.iterdir()) == []


class Payload:
    """What a crafted checkpoint carries: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.timeout(600)
def test_a_crafted_pickle_in_a_run_folder_never_runs(setup: dict[str, Path]) -> None:
    """A copy of the reference whose year-2014 model states carry a payload, given to --start-from and
    to --resume: refused with one line, the payload's marker never written."""
    import shutil

    base, runs = setup["base"], setup["runs"]
    crafted = runs / "crafted"
    shutil.copytree(setup["reference"], crafted)
    marker = base / "payload-ran"
    for states in (crafted / "checkpoints" / "year-2014").glob("*model_states.pt"):
        blob = torch.load(states, weights_only=False)
        blob["payload"] = Payload(marker)
        torch.save(blob, states)
    start = _settings(setup["root"], runs, setup["model"], "started", "plan.years=[2015]")
    done = _run(_deepspeed([*start, "--start-from", f"{crafted}:2014"]), base / "crafted-start.log")
    log = (base / "crafted-start.log").read_text()
    assert done.returncode != 0 and not marker.exists(), log[-3000:]
    refused = [line for line in log.splitlines() if line.startswith("train: error:")]
    assert len(refused) == 1 and "not plain tensor data (it asks for posix.system)" in refused[0], log[-3000:]
    assert "Traceback" not in log
    shutil.rmtree(crafted / "checkpoints" / "year-2015")
    (crafted / "checkpoints" / "latest").write_text("year-2014\n")
    (crafted / "years.jsonl").write_text((crafted / "years.jsonl").read_text().splitlines()[0] + "\n")
    resume = _settings(setup["root"], runs, setup["model"], "crafted")
    done = _run(_deepspeed([*resume, "--resume", "auto"]), base / "crafted-resume.log")
    log = (base / "crafted-resume.log").read_text()
    assert done.returncode != 0 and not marker.exists(), log[-3000:]
    assert "not plain tensor data" in log and "Traceback" not in log
