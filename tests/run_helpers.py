"""Reading and steering whole training runs in tests: their metrics, weights and progress."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from trainer.weights.consolidate import load_weights

REPO = Path(__file__).resolve().parents[1]


def demo_args(root: Path | str, runs: Path, model: Path, name: str, *extra: str) -> list[str]:
    """launch/train.py arguments for a test run: configs/demo.yaml on the test's data, model and run folder."""
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={root}",
        f"model.name={model}",
        f"logging.run_dir={runs}",
        f"logging.name={name}",
        "logging.progress=false",
        *extra,
    ]


def records(run: Path, kind: str = "train") -> list[dict]:
    """The run's metrics.jsonl lines of `kind`, in order (a resumed run has redone steps twice)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run: Path) -> dict[int, float]:
    """Loss per global step; for a step logged more than once, its last value."""
    return {r["global_step"]: r["loss"] for r in records(run)}


def weights_equal(a: Path, b: Path, tag: str = "year-2014") -> bool:
    """The two runs' fp32 weights at `tag` are bit for bit the same."""
    wa, wb = load_weights(a / "checkpoints", tag), load_weights(b / "checkpoints", tag)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Block until the run has logged global step `step`; fail if it ends or takes longer."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (status {proc.returncode}) before step {step}")
        metrics = run / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line)["global_step"] >= step for line in metrics.read_text().splitlines()
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")
