"""The run folder is owned by one launch at a time; tags and paths have one spelling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_year
from tests.dist_helpers import clean_env
from tests.fs_helpers import read_only, small_disk
from trainer.rundir import CheckpointError, RunDir, RunLock, step_tag, task_of, year_tag

REPO = Path(__file__).resolve().parents[1]


def test_tags() -> None:
    assert year_tag("2016") == "year-2016" and task_of("year-2016") == "2016"
    assert step_tag(1200) == "step-1200" and task_of("step-1200") is None


def test_second_lock_is_refused_until_the_first_is_released(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs" / "x")
    first, second = RunLock(run), RunLock(run)
    first.acquire()
    with pytest.raises(CheckpointError, match=r"in use by another launch \(pid \d+ on "):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def _launch(root: Path, runs: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.root={root}",
            f"model.name={model}",
            f"logging.run_dir={runs}",
            "train.global_batch=8",
            "train.micro_batch=8",
            "data.workers=0",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        env=clean_env(),
    )


@pytest.mark.timeout(200)
def test_a_second_launch_on_a_run_in_use_exits_2_and_writes_nothing(tmp_path: Path, tiny_model_json: Path) -> None:
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=16, per_shard=8)
    lock = RunLock(RunDir(runs / "busy"))
    lock.acquire()
    proc = _launch(root, runs, tiny_model_json, "logging.name=busy")
    lock.release()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "in use by another launch" in lines[0], proc.stderr[-2000:]
    assert sorted(p.name for p in (runs / "busy").iterdir()) == [".lock"]


@pytest.mark.reliability  # the 2-rank version runs in tests/test_reliability.py too
@pytest.mark.timeout(300)
def test_relaunching_a_finished_run_without_resume_is_refused_and_touches_nothing(tmp_path: Path, tiny_model_json):
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=16, per_shard=8)
    settings = ["logging.name=done", "train.samples=16", "logging.progress=false"]
    first = _launch(root, runs, tiny_model_json, *settings)
    assert first.returncode == 0, first.stderr[-2000:]
    run = runs / "done"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    again = _launch(root, runs, tiny_model_json, *settings, "optim.lr=1e-3")
    assert again.returncode == 2, again.stderr[-2000:]
    lines = [line for line in again.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "already has year-2014" in lines[0] and "--resume auto" in lines[0], again.stderr
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


@pytest.mark.reliability  # the 2-rank version runs in tests/test_reliability.py too
@pytest.mark.timeout(200)
def test_a_run_dir_that_is_a_file_or_read_only_is_one_line_exit_2(tmp_path: Path, tiny_model_json: Path) -> None:
    root = tmp_path / "data"
    write_year(root, "2014", n=16, per_shard=8)
    a_file = tmp_path / "runs-file"
    a_file.write_text("not a folder\n")
    proc = _launch(root, a_file, tiny_model_json)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith(f"train: error: {a_file}/demo: cannot write the run folder (")
    assert a_file.read_text() == "not a folder\n"
    with small_disk(tmp_path / "ro", "1m") as disk:
        read_only(disk)
        proc = _launch(root, disk / "runs", tiny_model_json)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert errors == [f"train: error: {disk}/runs/demo: cannot write the run folder (Read-only file system)"]
        assert list(disk.iterdir()) == []
