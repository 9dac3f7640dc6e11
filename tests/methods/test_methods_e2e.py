"""Distillation + EWC + CTP + an EMA merge trained from the command line: 3 unequal years on 2 ranks with
a cumulative plan, every term logged where it applies, Fishers accumulated, merged weights handed
on; a run resumed mid-year reproduces the losses (CTP's momentum queue included) and the merged
weights bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_year
from tests.dist_helpers import deepspeed_train
from tests.run_helpers import demo_args
from trainer.weights.consolidate import HANDED_ON, load_weights

METHODS = (
    "methods=[{name: distill, options: {temperature: 2.0}}, {name: ewc, options: {samples: 32, batch: 8, weight: 100}},"
    " {name: ctp, options: {queue: 16}}, {name: merge, options: {mode: ema, ema_decay: 0.8}}]"
)


def _settings(root: Path, runs: Path, model: Path) -> list[str]:
    return demo_args(
        root,
        runs,
        model,
        "methods",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.samples=40",
        "data.workers=1",
        "plan.years=[2014,2015,2016]",
        "plan.strategy=cumulative-all",
        "optim.warmup_steps=1",
        "deepspeed.zero_stage=2",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=10",
        "logging.every_steps=1",
        METHODS,
    )


def _train_lines(run: Path) -> dict[int, dict[str, Any]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r for r in lines if r["kind"] == "train"}


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory, tiny_model_json: Path) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("methods")
    root = base / "data"
    write_year(root, "2014", n=48, per_shard=16)
    write_year(root, "2015", n=80, per_shard=20)
    write_year(root, "2016", n=40, per_shard=8)
    deepspeed_train(_settings(root, base / "runs", tiny_model_json), base / "train.log")
    return base, root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_methods_train_from_the_command_line(methods_run) -> None:
    base, _ = methods_run
    run = base / "runs" / "methods"
    lines = _train_lines(run)
    assert sorted(lines) == list(range(1, 16))  # 3 steps of 40 samples in batches of 8
    for g, r in lines.items():
        has_teacher = g > 5  # the first step has no previous model, no Fisher
        assert ("loss/0:Distillation/kl" in r) == has_teacher
        assert ("loss/1:Ewc/penalty" in r) == has_teacher
        assert ("loss/2:Ctp/topology" in r) == has_teacher
        assert r["loss/2:Ctp/moco"] > 0
    # After the step's first optimizer step the student has moved away from its teacher and anchor.
    assert lines[7]["loss/0:Distillation/kl"] > 0 and lines[7]["loss/1:Ewc/penalty"] > 0
    # Online EWC with decay 1: each Fisher file holds the sum so far.
    fishers = [load_file(str(run / "methods" / f"ewc-fisher-{y}.safetensors")) for y in (2014, 2015, 2016)]
    for earlier, later in zip(fishers, fishers[1:]):
        assert all(torch.all(later[k] >= earlier[k]) for k in earlier)
        assert any(torch.any(later[k] > earlier[k]) for k in earlier)
    ckpts = run / "checkpoints"
    for year in (2014, 2015, 2016):
        handed = load_weights(ckpts, f"year-{year}")
        trained = load_weights(ckpts, f"year-{year}", trained=True)
        assert (ckpts / f"year-{year}" / HANDED_ON).is_file()
        assert handed.keys() == trained.keys()
        assert any(not torch.equal(handed[k], trained[k]) for k in handed)


@pytest.mark.reliability  # a second whole run: make reliability, not make test
@pytest.mark.timeout(600)
def test_methods_resume_mid_year_exactly(methods_run, tmp_path: Path, tiny_model_json: Path) -> None:
    base, root = methods_run
    run = base / "runs" / "methods"
    copy = tmp_path / "runs" / "methods"
    # Kill after step-9 (2015's fourth step): later checkpoints, the Fishers of 2015 on, and the log are gone.
    later = ("year-2015", "year-2016", "step-1?", "ewc-fisher-2015*", "ewc-fisher-2016*")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(*later))
    (copy / "checkpoints" / "latest").write_text("step-9\n")
    (copy / "metrics.jsonl").write_text("")
    state = json.loads((copy / "checkpoints" / "step-9" / "trainer_state.json").read_text())
    assert state["methods"]["3:Merge"]["ema_step"] == 1 and state["methods"]["3:Merge"]["steps"] == 4
    assert state["methods"]["2:Ctp"]["queues"]["image"] == "tensor[16, 32] torch.float32"
    deepspeed_train([*_settings(root, tmp_path / "runs", tiny_model_json), "--resume", "auto"], tmp_path / "r.log")
    original, resumed = _train_lines(run), _train_lines(copy)
    assert sorted(resumed) == list(range(10, 16))
    for g in resumed:
        assert resumed[g]["loss"] == original[g]["loss"], g
        assert resumed[g]["loss/0:Distillation/kl"] == original[g]["loss/0:Distillation/kl"]
        assert resumed[g]["loss/2:Ctp/moco"] == original[g]["loss/2:Ctp/moco"]  # momentum queue resumed
    for year in (2015, 2016):
        a = load_file(str(run / "checkpoints" / f"year-{year}" / HANDED_ON))
        b = load_file(str(copy / "checkpoints" / f"year-{year}" / HANDED_ON))
        assert all(torch.equal(a[k], b[k]) for k in a), year
        fa = load_file(str(run / "methods" / f"ewc-fisher-{year}.safetensors"))
        fb = load_file(str(copy / "methods" / f"ewc-fisher-{year}.safetensors"))
        assert all(torch.equal(fa[k], fb[k]) for k in fa), year
