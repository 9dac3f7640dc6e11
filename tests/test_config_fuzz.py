"""Config fuzz (part of `make reliability`): malformed values, keys and types through launch/train.py,
each one line naming the key, exit 2, and no run folder created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_year
from tests.dist_helpers import clean_env
from tests.run_helpers import REPO, demo_args

pytestmark = pytest.mark.reliability

FUZZ = [
    # (override, what the one line must name)
    ("train.global_batch=0", "train.global_batch"),
    ("train.global_batch=-8", "train.global_batch"),
    ("train.global_batch=eight", "train.global_batch"),
    ("train.global_batch=8.5", "train.global_batch"),
    ("train.micro_batch=0", "train.micro_batch"),
    ("train.samples=-1", "train.samples"),
    ("train.samples=[1,2]", "train.samples"),
    ("train.max_logit_scale=nan", "train.max_logit_scale"),
    ("train.max_logit_scale=0.5", "train.max_logit_scale"),
    ("train.accumulation=sideways", "train.accumulation"),
    ("train.no_such_key=1", "train.no_such_key"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.min_lr=1.0", "optim.min_lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.zero_stage=two", "deepspeed.zero_stage"),
    ("deepspeed.offload_param=cpu", "deepspeed.offload_param"),
    ("data.workers=-1", "data.workers"),
    ("data.max_bad_frac=1.5", "data.max_bad_frac"),
    ("data.max_bad_frac=nan", "data.max_bad_frac"),
    ("data.root=", "data.root"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("checkpoint.min_free_gb=-1", "checkpoint.min_free_gb"),
    ("checkpoint.every_steps=-3", "checkpoint.every_steps"),
    ("logging.name=../../x", "logging.name"),
    ("logging.name=a/b", "logging.name"),
    ("logging.every_steps=0", "logging.every_steps"),
    ("plan.strategy=everything", "plan.strategy"),
    ("plan.first_step_years=0", "plan.first_step_years"),
    ("nosection.key=1", "nosection"),
    ("train=5", "train"),
    ("optim", "optim"),
]


@pytest.mark.timeout(600)
def test_config_fuzz_every_bad_setting_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, tiny_model_json: Path
) -> None:
    assert len(FUZZ) >= 30
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_year(root, "2014", n=16, per_shard=8)
    base = demo_args(root, runs, tiny_model_json, "fuzz", "train.global_batch=8", "train.micro_batch=8")
    failures = []
    for override, key in FUZZ:
        done = subprocess.run(
            [sys.executable, str(REPO / "launch" / "train.py"), *base, override],
            capture_output=True,
            text=True,
            env=clean_env(),
            cwd=REPO,
            timeout=120,
        )
        lines = done.stderr.strip().splitlines()
        if done.returncode != 2 or len(lines) != 1 or not lines[0].startswith("train: error: ") or key not in lines[0]:
            failures.append((override, done.returncode, done.stderr[-500:]))
    assert not failures, failures
    assert not runs.exists()
