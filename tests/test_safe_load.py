"""A crafted pickle in a run folder never runs: not on resume, --start-from, export or universal conversion."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tools.export import main as export_main
from trainer import checkpoint as ckpt
from trainer.config import load_config, save_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine
from trainer.model import create_model
from trainer.rundir import CheckpointError
from trainer.weights.sources import weights_from


class Payload:
    """Unpickling this runs `touch <marker>`, as a malicious checkpoint would run anything."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def dist():
    return init_distributed("gloo")


def _config(tiny_model_json: Path):
    return load_config(
        None,
        [
            f"model.name={tiny_model_json}",
            "data.root=/unused",
            "train.global_batch=2",
            "train.micro_batch=2",
            "deepspeed.zero_stage=1",
            "logging.name=tiny",
        ],
    )


def _engine(cfg, dist):
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=4, warmup=0)
    out = engine(image=torch.randn(2, 3, 32, 32), text=torch.randint(1, 300, (2, 16)))
    engine.backward((out["image_features"] * out["text_features"]).sum())
    engine.step()
    return engine


@pytest.fixture(scope="module")
def run_folder(dist, tiny_model_json: Path, tmp_path_factory):
    """A ZeRO-1 run folder with a complete year-2014 checkpoint, and an engine to load it into."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    cfg = _config(tiny_model_json)
    save_config(cfg, run / "config.yaml")
    engine = _engine(cfg, dist)
    ckpt.save(engine, run / "checkpoints", "year-2014", {"global_step": 1, "plan_step": 0}, dist, 0, 2)
    return run, engine, cfg


def _crafted(run: Path, tmp_path: Path, member: str) -> tuple[Path, Path]:
    """A copy of `run` whose `member` file in year-2014 holds the payload; returns (copy, marker)."""
    bad = tmp_path / "tiny"
    shutil.copytree(run, bad)
    marker = tmp_path / "PAYLOAD_RAN"
    target = bad / "checkpoints" / "year-2014" / member
    real = torch.load(target, weights_only=False)
    real["payload"] = Payload(marker)
    torch.save(real, target)
    return bad, marker


MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_real_checkpoints_load_under_the_restriction(run_folder) -> None:
    run, engine, _ = run_folder
    assert ckpt.load(engine, run / "checkpoints", "year-2014")["global_step"] == 1


@pytest.mark.parametrize("member", [MODEL_STATES, OPTIM_STATES])
def test_export_refuses_a_crafted_checkpoint(run_folder, tmp_path: Path, capsys, member: str) -> None:
    bad, marker = _crafted(run_folder[0], tmp_path, member)
    out = tmp_path / "x.pt"
    assert export_main(["--run", str(bad), "--year", "2014", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not plain tensor data" in err and "posix.system" in err, err
    assert not marker.exists() and not out.exists()


def test_resume_refuses_a_crafted_checkpoint(run_folder, tmp_path: Path) -> None:
    run, engine, _ = run_folder
    bad, marker = _crafted(run, tmp_path, MODEL_STATES)
    with pytest.raises(CheckpointError, match="not plain tensor data"):
        ckpt.load(engine, bad / "checkpoints", "year-2014")
    assert not marker.exists()


def test_start_from_refuses_a_crafted_checkpoint(run_folder, tmp_path: Path) -> None:
    run, _, cfg = run_folder
    bad, marker = _crafted(run, tmp_path, OPTIM_STATES)
    model = create_model(cfg.model)[0]
    with pytest.raises(CheckpointError, match="not plain tensor data"):
        weights_from(f"{bad}:2014", model, cfg)
    assert not marker.exists()


@pytest.mark.timeout(240)
def test_universal_conversion_refuses_a_crafted_checkpoint(run_folder, dist, tmp_path: Path) -> None:
    run, _, _ = run_folder
    good = tmp_path / "good"
    shutil.copytree(run, good)
    assert ckpt.is_complete(ckpt.to_universal(good / "checkpoints", "year-2014", dist) / "year-2014")
    bad, marker = _crafted(run, tmp_path, OPTIM_STATES)
    with pytest.raises(CheckpointError, match="universal conversion failed.*not plain tensor data"):
        ckpt.to_universal(bad / "checkpoints", "year-2014", dist)
    assert not marker.exists()
