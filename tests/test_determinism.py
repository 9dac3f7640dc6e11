"""Two fresh CPU runs of the same settings compute the same bits: losses, yearly weights and the
evaluation matrix, on 2 ranks with a data worker, over two years of unequal size (cumulative-all,
so the second step mixes them 1:2). On another CPU torch's kernel choice (AVX-512 vs AVX2, MKL,
oneDNN) changes the last bits; see the README's "Determinism"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import write_year
from tests.dist_helpers import clean_env, deepspeed_train
from trainer.weights.consolidate import load_weights

REPO = Path(__file__).resolve().parents[1]


def _launch(root: Path, runs: Path, model: Path, name: str, log: Path) -> None:
    args = [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={root}",
        f"model.name={model}",
        f"logging.run_dir={runs}",
        f"logging.name={name}",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.samples=48",
        "data.workers=1",
        "plan.years=[2014,2015]",
        "plan.strategy=cumulative-all",
        "optim.warmup_steps=1",
        "logging.every_steps=1",
        "logging.progress=false",
    ]
    # A different hash seed in every process: nothing may depend on the order of a set of strings.
    deepspeed_train(args, log, env={"PYTHONHASHSEED": str(os.getpid() % 1000 + len(name))}, timeout=400)


def _train_lines(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in rows if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_fresh_runs_compute_the_same_bits(tmp_path: Path, tiny_model_json: Path) -> None:
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=64, per_shard=16)
    write_year(root, "2015", n=128, per_shard=32)
    for year in ("2014", "2015"):
        write_year(root, year, n=24, per_shard=24, split="eval", seed=1)
    for name in ("a", "b"):
        _launch(root, runs, tiny_model_json, name, tmp_path / f"{name}.log")
    a, b = _train_lines(runs / "a"), _train_lines(runs / "b")
    assert len(a) == 12 and a == b
    for tag in ("year-2014", "year-2015"):
        wa, wb = load_weights(runs / "a" / "checkpoints", tag), load_weights(runs / "b" / "checkpoints", tag)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), tag
    matrices = []
    for name in ("a", "b"):
        done = subprocess.run(
            [sys.executable, str(REPO / "tools" / "evaluate.py"), "--run", str(runs / name)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            env=clean_env(),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        matrices.append(json.loads((runs / name / "eval" / "matrix.json").read_text())["results"])
    assert matrices[0] == matrices[1] and set(matrices[0]) == {"2014", "2015"}
