"""The yearly loop from the command line: warm starts across years, --years, --start-from (.pt and run:year)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, write_year
from tests.dist_helpers import clean_env
from trainer.config import ModelConfig, load_config
from trainer.continual import ContinualRun
from trainer.distributed import DistInfo
from trainer.errors import UserError
from trainer.model import create_model

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def _settings(root: Path, runs: Path, model: Path, name: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={root}",
        f"model.name={model}",
        f"logging.run_dir={runs}",
        f"logging.name={name}",
        "train.global_batch=8",
        "train.micro_batch=8",
        "train.samples=32",
        "data.workers=0",
        "plan.strategy=sequential",
        "plan.years=[2014,2015]",
        "optim.warmup_steps=1",
        "checkpoint.every_steps=0",
        "logging.every_steps=1",
        "logging.progress=false",
    ]


def _train(args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        return subprocess.run(
            [sys.executable, TRAIN, *args], stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=REPO, timeout=300
        )


def _losses(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["year"], r["step"]): r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_json: Path) -> dict[str, Path]:
    """A two-year sequential run (2014 from scratch, 2015 warm-started) on 1 process."""
    tmp = tmp_path_factory.mktemp("continual")
    root, runs = tmp / "data", tmp / "runs"
    for year in ("2014", "2015"):
        write_year(root, year, n=32, per_shard=16)
    done = _train(_settings(root, runs, tiny_model_json, "full"), tmp / "full.log")
    assert done.returncode == 0, (tmp / "full.log").read_text()[-3000:]
    return {"tmp": tmp, "root": root, "runs": runs, "model": tiny_model_json, "full": runs / "full"}


@pytest.mark.timeout(600)
def test_each_year_warm_starts_from_the_last_and_leaves_a_checkpoint(base: dict[str, Path]) -> None:
    full = base["full"]
    years = [json.loads(line) for line in (full / "years.jsonl").read_text().splitlines()]
    assert [(y["year"], y["steps"], y["samples"]) for y in years] == [("2014", 4, 32), ("2015", 4, 32)]
    plan = json.loads((full / "plan.json").read_text())
    assert [s["init"] for s in plan["steps"]] == ["scratch", "previous"]
    for tag in ("year-2014", "year-2015"):
        assert (full / "checkpoints" / tag / "COMPLETE").is_file()
    # Warm start: 2015 begins where 2014 ended (loss about ln 8 after 4 steps on batches of 8), not
    # at the fresh model's loss, which open_clip's initial logit scale puts well above ln 8.
    losses = _losses(full)
    assert losses[("2015", 1)] < losses[("2014", 1)] - 0.05
    assert losses[("2014", 1)] > 2.12


@pytest.mark.timeout(600)
def test_years_and_start_from_reproduce_the_warm_started_year(base: dict[str, Path]) -> None:
    """--years 2015 with the 2014 weights given as an open_clip .pt or as run:year = the full run's 2015."""
    from tools.export import main as export_main

    tmp, full = base["tmp"], base["full"]
    pt = tmp / "2014.pt"
    assert export_main(["--run", str(full), "--year", "2014", "--out", str(pt)]) == 0
    expected = {k: v for k, v in _losses(full).items() if k[0] == "2015"}
    for name, source in (("from-pt", str(pt)), ("from-run", f"{full}:2014")):
        log = tmp / f"{name}.log"
        done = _train(
            [*_settings(base["root"], base["runs"], base["model"], name), "--years", "2015", "--start-from", source],
            log,
        )
        assert done.returncode == 0, log.read_text()[-3000:]
        got = _losses(base["runs"] / name)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-6), (name, key)
        assert not (base["runs"] / name / "checkpoints" / "year-2014").exists()
        warned = "GELU and QuickGELU cannot be told apart" in log.read_text()
        assert warned == (name == "from-pt")


@pytest.mark.timeout(120)
def test_bad_start_points_fail_before_anything_is_written(base: dict[str, Path], tmp_path: Path) -> None:
    """The checks run in ContinualRun's constructor, which the CLI turns into one line and exit 2."""
    (tmp_path / "other.json").write_text(json.dumps(dict(TINY_MODEL, embed_dim=48)))
    model = create_model(ModelConfig(name=str(tmp_path / "other.json")))[0]
    torch.save({"state_dict": model.state_dict(), "epoch": 1, "name": "some-run"}, tmp_path / "other.pt")
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    cases = [
        ({"years": "2015"}, "warm-starts from year-2014"),
        ({"years": "2015", "start_from": str(tmp_path / "other.pt")}, "shape"),
        ({"start_from": str(tmp_path / "missing.pt")}, "is neither a .pt file nor <run folder>:<year>"),
        ({"start_from": f"{base['full']}:2031"}, "has no checkpoint year-2031"),
        ({"years": "2031"}, "--years: 2031 is not a step of the plan"),
    ]
    for i, (options, message) in enumerate(cases):
        args = _settings(base["root"], tmp_path / "runs", base["model"], f"bad-{i}")
        cfg = load_config(args[1], args[2:])
        with pytest.raises(UserError, match=re.escape(message)):
            ContinualRun(cfg, one, **options)
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(600)
def test_year_lr_decay_trains_the_warm_started_year_at_the_lower_peak(base: dict[str, Path]) -> None:
    """optim.year_lr_decay=0.5: 2015 re-warms to half of 2014's peak, the same warmup + cosine shape."""
    log = base["tmp"] / "decay.log"
    args = [*_settings(base["root"], base["runs"], base["model"], "decay"), "optim.year_lr_decay=0.5"]
    done = _train(args, log)
    assert done.returncode == 0, log.read_text()[-3000:]
    rows = [json.loads(line) for line in (base["runs"] / "decay" / "metrics.jsonl").read_text().splitlines()]
    lr = {(r["year"], r["step"]): r["lr"] for r in rows if r["kind"] == "train"}
    full = {
        (r["year"], r["step"]): r["lr"]
        for r in map(json.loads, (base["full"] / "metrics.jsonl").open())
        if r["kind"] == "train"
    }
    assert [lr[("2014", s)] for s in range(1, 5)] == [full[("2014", s)] for s in range(1, 5)]
    assert [lr[("2015", s)] for s in range(1, 5)] == pytest.approx([full[("2015", s)] / 2 for s in range(1, 5)])
    assert max(lr[("2015", s)] for s in range(1, 5)) == pytest.approx(max(lr[("2014", s)] for s in range(1, 5)) / 2)
