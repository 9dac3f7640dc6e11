"""SLURM preemption as SLURM sends it: SIGTERM to every process of the step, DataLoader workers too.
The run saves a checkpoint at the next step, exits 0, and resumes to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_year
from tests.dist_helpers import clean_env

REPO = Path(__file__).resolve().parents[1]


def _args(root: Path, runs: Path, model: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={root}",
        f"model.name={model}",
        f"logging.run_dir={runs}",
        "logging.name=pre",
        "train.global_batch=8",
        "train.micro_batch=8",
        "train.samples=240",
        "data.workers=1",
        "plan.years=[2014]",
        "logging.every_steps=1",
        "logging.progress=false",
    ]


def _logged_steps(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [r["global_step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.reliability)])
def test_a_stop_signal_to_the_whole_process_group_saves_and_exits_0(
    tmp_path: Path, tiny_model_json: Path, sig: signal.Signals
) -> None:
    """SIGTERM as SLURM sends it; SIGINT as Ctrl-C in a terminal sends it, to the foreground group."""
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=48, per_shard=16)
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        _args(root, runs, tiny_model_json),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=clean_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while max(_logged_steps(runs / "pre"), default=0) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # what SLURM's --signal=TERM does: every process, workers included
    assert proc.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert f"train: stopped by {sig.name} after saving step-" in (tmp_path / "run.log").read_text()
    saved = [p.name for p in (runs / "pre" / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(saved) == 1 and saved[0].startswith("step-"), saved
    resumed = subprocess.run(
        [*_args(root, runs, tiny_model_json), "--resume", "auto"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (runs / "pre" / "checkpoints" / "year-2014" / "COMPLETE").exists()
    assert max(_logged_steps(runs / "pre")) == 30


@pytest.mark.timeout(300)
def test_a_diverging_run_stops_with_one_line_and_saves_nothing_after_it(tmp_path: Path, tiny_model_json: Path) -> None:
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=48, per_shard=16)
    args = [a for a in _args(root, runs, tiny_model_json) if a != "data.workers=1"]
    done = subprocess.run(
        [*args, "data.workers=0", "optim.lr=1e25", "optim.warmup_steps=0", "optim.schedule=const"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=250,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "loss is nan at optimizer step" in lines[0] and "year 2014" in lines[0], done.stderr
    assert not (runs / "pre" / "checkpoints" / "year-2014").exists()

    def strict(constant: str) -> None:
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    for line in (runs / "pre" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
