"""Planner: each strategy against hand-computed tables, and TiC-CLIP's compute numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import clean_env
from trainer.config import ConfigError, load_config
from trainer.distributed import DistInfo
from trainer.methods import build_methods
from trainer.plan import apportion, buffer_sizes, make_plan
from trainer.plan_report import method_candidates, method_flops, methods_table, plan_for, selection_flops, summary

REPO = Path(__file__).resolve().parents[1]
SIZES = {"2014": 100, "2015": 100, "2016": 100, "2017": 80}


def _cfg(*overrides: str):
    return load_config(None, ["data.root=/x", "train.global_batch=10", "train.micro_batch=10", *overrides])


def test_apportion_is_exact_and_proportional() -> None:
    assert apportion(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    q = apportion(1000, {"a": 0.5, "b": 0.25, "c": 0.25})
    assert q == {"a": 500, "b": 250, "c": 250}
    assert sum(apportion(997, {"a": 3, "b": 7, "c": 11}).values()) == 997


def test_buffer_sizes_exp_and_equal() -> None:
    old = ["2014", "2015", "2016"]
    assert buffer_sizes(old, SIZES, 80, "exp") == {"2016": 40, "2015": 20, "2014": 10}
    assert buffer_sizes(old, SIZES, 80, "equal") == {"2014": 26, "2015": 26, "2016": 26}
    assert buffer_sizes(old, {"2014": 5, "2015": 100, "2016": 100}, 80, "exp")["2014"] == 5


def test_sequential_draws_only_new_years() -> None:
    plan = make_plan(_cfg("plan.strategy=sequential"), SIZES)
    assert [s.quotas for s in plan.steps] == [{"2014": 100}, {"2015": 100}, {"2016": 100}, {"2017": 80}]
    assert [s.init for s in plan.steps] == ["scratch", "previous", "previous", "previous"]


def test_cumulative_all_weights_by_size() -> None:
    plan = make_plan(_cfg("plan.strategy=cumulative-all", "train.samples=100"), SIZES)
    last = plan.steps[-1]
    # 100 x (100,100,100,80)/380 = 26.32 x3, 21.05: floors sum to 99, the largest remainder
    # (a tie among the first three) goes to the earliest year.
    assert last.quotas == {"2014": 27, "2015": 26, "2016": 26, "2017": 21}
    assert sum(last.quotas.values()) == last.samples == 100 and last.steps == 10


def test_cumulative_exp_table() -> None:
    plan = make_plan(_cfg("plan.strategy=cumulative-exp"), SIZES)
    last = plan.steps[-1]
    # D = the new year's 80 samples: 2016 gets D/2, 2015 D/4, 2014 D/8; one pass over new + buffer.
    assert last.pool == {"2014": 10, "2015": 20, "2016": 40, "2017": 80}
    assert set(last.buffered) == {"2014", "2015", "2016"}
    assert last.samples == 150 and last.quotas == last.pool
    step1 = plan.steps[1]
    assert step1.pool == {"2014": 50, "2015": 100} and step1.buffered == ["2014"]


def test_cumulative_equal_and_replay_options() -> None:
    last = make_plan(_cfg("plan.strategy=cumulative-equal"), SIZES).steps[-1]
    assert last.pool == {"2014": 26, "2015": 26, "2016": 26, "2017": 80}
    replay = make_plan(_cfg("plan.strategy=replay", "plan.buffer_samples=60", "plan.buffer_split=equal"), SIZES)
    assert replay.steps[-1].pool == {"2014": 20, "2015": 20, "2016": 20, "2017": 80}


def test_er_memory_shares_its_cap_in_proportion_to_what_was_seen() -> None:
    """ER (plan.buffer_split=size): one memory of buffer_samples over every old year, each year's
    share its fraction of the samples seen, as a reservoir sample of the stream keeps."""
    sizes = {"2014": 100, "2015": 300, "2016": 50, "2017": 80}
    plan = make_plan(_cfg("plan.strategy=replay", "plan.buffer_samples=90", "plan.buffer_split=size"), sizes)
    assert plan.steps[1].pool == {"2014": 90, "2015": 300}  # 2014 had 100: 90 of them
    assert plan.steps[2].pool == {"2014": 23, "2015": 67, "2016": 50}  # 22.5 : 67.5, the tie to the earlier year
    assert plan.steps[3].pool == {"2014": 20, "2015": 60, "2016": 10, "2017": 80}
    assert plan.steps[3].buffered == ["2014", "2015", "2016"]


def test_restart_grows_budget_and_starts_from_scratch() -> None:
    plan = make_plan(_cfg("plan.strategy=restart", "train.samples=100"), SIZES)
    assert [s.samples for s in plan.steps] == [100, 200, 300, 400]
    assert all(s.init == "scratch" for s in plan.steps)
    same = make_plan(_cfg("plan.strategy=restart", "train.samples=100", "plan.restart_budget=same"), SIZES)
    assert [s.samples for s in same.steps] == [100] * 4


def test_first_step_groups_years_and_warmups() -> None:
    plan = make_plan(
        _cfg("plan.first_step_years=3", "train.samples=100", "optim.warmup_steps=2", "plan.warmup_first=5"), SIZES
    )
    assert [s.new_years for s in plan.steps] == [["2014", "2015", "2016"], ["2017"]]
    assert [s.warmup for s in plan.steps] == [5, 2]
    assert [s.tag for s in plan.steps] == ["2016", "2017"]


def test_bad_plans_name_the_key() -> None:
    with pytest.raises(ConfigError, match="plan.years: 2030 not in the data"):
        make_plan(_cfg("plan.years=[2014,2030]"), SIZES)
    with pytest.raises(ConfigError, match="plan.first_step_years: 9 exceeds"):
        make_plan(_cfg("plan.first_step_years=9"), SIZES)
    with pytest.raises(ConfigError, match="train.samples: .* fewer than one global batch"):
        make_plan(_cfg("train.samples=5"), SIZES)


@pytest.mark.parametrize("years,ratio", [(9, 4.0), (6, 2.5)])
def test_tic_medium_warm_start_saves_t_plus_1_over_2(years: int, ratio: float) -> None:
    """TiC-DataComp: 7 steps (2014-16, 2017 ... 2022) -> 4x; 4 steps -> 2.5x."""
    cfg = load_config(REPO / "configs" / "tic_medium.yaml")
    sizes = {str(y): 10**8 for y in range(2014, 2014 + years)}
    cfg.plan.years = list(sizes)
    restart = plan_for(cfg, sizes, "restart")
    for strategy in ("cumulative-all", "cumulative-exp", "sequential"):
        s = summary(plan_for(cfg, sizes, strategy), 1, restart)
        assert 1 / s["cost_vs_restart"] == pytest.approx(ratio)
    first = plan_for(cfg, sizes, "cumulative-all").steps
    assert first[0].samples == 18_432_000 and first[0].steps == 4500 and first[0].warmup == 500
    assert first[1].warmup == 0


@pytest.mark.timeout(120)
def test_plan_cli_compare_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "plan.py"),
            "--config",
            str(REPO / "configs" / "tic_debug.yaml"),
            "--compare",
            "--json",
            f"data.root={tmp_path / 'none'}",
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=clean_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ratios = {r["strategy"]: r["cost_vs_restart"] for r in out["summary"]}
    assert ratios["restart"] == 1.0 and ratios["cumulative-all"] == pytest.approx(1 / 4)


@pytest.mark.timeout(120)
def test_plan_cli_on_an_unreachable_preset_root_assumes_sizes_and_warns_of_a_small_contrastive_batch(
    tmp_path: Path,
) -> None:
    """The presets point at s3://your-bucket: without credentials the plan is still made, from
    assumed year sizes, and gradient accumulation's smaller contrastive batch is warned of."""
    env = clean_env()
    for var in [v for v in env if v.startswith("AWS_")]:
        env.pop(var)
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    cmd = [sys.executable, str(REPO / "tools" / "plan.py"), "--config", str(REPO / "configs" / "tic_medium.yaml")]
    runs = [
        subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=110, env=env)
        for extra in ([], ["train.accumulation=gradients"])
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
        assert "data not readable here: every year assumed to hold" in proc.stdout
    assert "warning" not in runs[0].stdout
    assert (
        "- warning: train.accumulation=gradients: on fewer than 16 GPUs the contrastive batch is micro-batch x GPUs"
        in runs[1].stdout
    )


def test_year_lr_decay_lowers_each_warm_started_peak() -> None:
    decayed = make_plan(_cfg("plan.strategy=cumulative-all", "optim.lr=1e-3", "optim.year_lr_decay=0.5"), SIZES)
    assert [s.lr for s in decayed.steps] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    same = make_plan(_cfg("plan.strategy=cumulative-all", "optim.lr=1e-3"), SIZES)
    assert [s.lr for s in same.steps] == [1e-3] * 4
    # restart trains every step from scratch: no warm start, no decay.
    restart = make_plan(_cfg("plan.strategy=restart", "optim.lr=1e-3", "optim.year_lr_decay=0.5"), SIZES)
    assert [s.lr for s in restart.steps] == [1e-3] * 4
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(ConfigError, match="optim.year_lr_decay"):
            _cfg(f"optim.year_lr_decay={bad}")


def test_methods_add_their_flops_step_by_step() -> None:
    """A teacher forward from the second step, a momentum forward in every step, a Fisher pass at
    every step's end: counted on top of the objective so plans compare at equal compute."""
    dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    cfg = _cfg(
        "plan.strategy=cumulative-all",
        "train.samples=100",
        "methods=[{name: distill}, {name: ewc, options: {samples: 30}}, {name: ctp}]",
    )
    plan = plan_for(cfg, SIZES, "cumulative-all")
    distill, ewc, ctp = build_methods(cfg, dist)
    f = 300.0  # training FLOPs per pair: a forward is 100
    assert method_flops(plan, [distill], f) == 3 * 100 * 100  # steps 2-4
    assert method_flops(plan, [ewc], f) == 4 * 30 * 300  # forward + backward of 30 pairs per step
    assert method_flops(plan, [ctp], f) == 4 * 100 * 100 + 3 * 100 * 100  # momentum always, old model after
    row = summary(plan, f, plan_for(cfg, SIZES, "restart"), [distill, ewc, ctp], f)
    assert row["total_flops"] == row["train_flops"] + method_flops(plan, [distill, ewc, ctp], f)
    table = methods_table(plan, f, method_candidates(cfg, dist), f)
    lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(lines) == {
        "none",
        "ctp",
        "distill",
        "ewc",
        "lucir",
        "merge",
        "herding",
        "kmeans",
        "icarl:",
        "lucir:",
        "this",
    }
    assert lines["distill"][3] == f"{(120000 + 30000) / 120000:.2f}x" and lines["merge"][3] == "1.00x"


def test_exemplar_selection_is_counted_once_per_remembered_year() -> None:
    """herding/kmeans embed min(memory_pool, year) candidates of each year a later step replays from
    a memory: one forward (a third of training) each."""
    dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    cfg = _cfg("plan.strategy=cumulative-exp", "plan.buffer_select=herding", "plan.memory_pool=60")
    plan = plan_for(cfg, SIZES, "cumulative-exp")
    # 2014, 2015 and 2016 are each replayed from a partial buffer later; 2014 and 2015 have 100,
    # so 60 candidates; 2016 too. 2017 is the last year: nothing to remember.
    assert selection_flops(plan, cfg, 300.0) == 3 * 60 * 100
    plain = load_config(None, ["data.root=/x", "train.global_batch=10", "train.micro_batch=10"])
    assert selection_flops(plan, plain, 300.0) == 0
    table = methods_table(plan, 300.0, method_candidates(cfg, dist), 300.0)
    assert "herding memory" in table and "this run: herding" in table
