"""Config: every shipped YAML loads; overrides; each bad config exits 2 with one line, writing nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helpers import clean_env
from trainer.cli import train_main
from trainer.config import (
    Config,
    ConfigError,
    accumulation_steps,
    config_from_dict,
    contrastive_batch,
    contrastive_warning,
    load_config,
    validate,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.logging.name == path.stem
    assert config_from_dict(cfg.to_dict()) == cfg


def test_configs_exist() -> None:
    assert {"demo"} <= {p.stem for p in CONFIGS}


@pytest.mark.timeout(30)
def test_dotted_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.root=/x",
            "optim.lr=1e-3",
            "deepspeed.zero_stage=3",
            "plan.years=[2014,2015]",
            "model.grad_checkpointing=true",
            "deepspeed.extra={zero_optimization: {overlap_comm: true}}",
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.plan.years == ["2014", "2015"]
    assert cfg.model.grad_checkpointing is True
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}


@pytest.mark.timeout(30)
def test_batch_arithmetic() -> None:
    cfg = load_config(None, ["data.root=/x", "train.global_batch=64", "train.micro_batch=8"])
    assert accumulation_steps(cfg, 2) == 4
    with pytest.raises(ConfigError, match=r"^train.global_batch: 64 is not divisible by .* 8 x 3"):
        validate(cfg, 3)


BAD = [
    (["optim.lrr=1"], r"^optim.lrr: unknown setting \(valid here: .*lr"),
    (["nosuch.x=1"], r"^nosuch: unknown setting"),
    (["optim.lr=fast"], r"^optim.lr: expected a number, got 'fast'"),
    (["deepspeed.zero_stage=4"], r"^deepspeed.zero_stage: must be 0, 1, 2 or 3, got 4"),
    (["deepspeed.zero_stage=two"], r"^deepspeed.zero_stage: expected an integer"),
    (["model.attention=flash"], r"^model.attention: 'flash' is not one of auto, xformers, sdpa, torch"),
    (["train.micro_batch=0"], r"^train.micro_batch: must be at least 1, got 0"),
    (["deepspeed.offload_param=cpu"], r"^deepspeed.offload_param: parameter offload needs"),
    (["data.root="], r"^data.root: no training data given"),
    (["model.grad_checkpointing=maybe"], r"^model.grad_checkpointing: expected true or false"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overrides,message", BAD, ids=[b[0][0] for b in BAD])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys, overrides: list[str], message: str) -> None:
    base = ["data.root=/nonexistent", f"logging.run_dir={tmp_path / 'runs'}"]
    status = train_main(["--config", str(REPO / "configs" / "demo.yaml"), *base, *overrides])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("train: error: ")
    import re

    assert re.search(message, err.removeprefix("train: error: ")), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(30)
def test_missing_config_file_and_bad_yaml(tmp_path: Path, capsys) -> None:
    assert train_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert train_main(["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert train_main(["--config", str(listy)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_missing_data_root_through_launch_script(tmp_path: Path) -> None:
    """The real entry point: a data root that does not exist is a one-line error, exit 2."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"data.root={tmp_path / 'nope'}",
            f"logging.run_dir={runs}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=110,
        env=clean_env(),
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0], proc.stderr
    assert not runs.exists()


def test_digest_ignores_logging_but_not_training() -> None:
    a = Config()
    b = Config()
    b.logging.name = "other"
    assert a.digest() == b.digest()
    b.optim.lr = 1.0
    assert a.digest() != b.digest()


def test_readme_config_reference_lists_every_setting() -> None:
    """The README's table is `python -m trainer.config_reference`; a new or renamed setting must reach it."""
    from trainer.config_reference import reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key, _, _ in reference() if f"| `{key}` |" not in readme]
    assert not missing, f"README config reference lacks {missing}: paste `python -m trainer.config_reference`"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
        ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
        ("train.max_logit_scale=nan", "train.max_logit_scale: must be a finite number"),
        ("optim.betas=[nan,0.98]", r"optim.betas\[0\]: must be a finite number"),
        ("optim.grad_clip=inf", "optim.grad_clip: must be a finite number"),
        ("data.max_bad_frac=nan", "data.max_bad_frac: must be a finite number"),
        ("optim.min_lr=-1e-5", r"optim.min_lr: must be in \[0, optim.lr\]"),
        ("optim.min_lr=1.0", r"optim.min_lr: must be in \[0, optim.lr\]"),
        ("optim.weight_decay=-0.1", "optim.weight_decay: must be 0 or more"),
        ("optim.eps=0", "optim.eps: must be positive"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last: must be at least 1"),
        ("checkpoint.min_free_gb=-1", "checkpoint.min_free_gb: must be 0 or more"),
        ("logging.name=../../x", "logging.name: must be one folder name inside logging.run_dir, got '../../x'"),
        ("logging.name=..", "logging.name: must be one folder name inside"),
        ("logging.name=a/b", "logging.name: must be one folder name inside"),
    ],
)
def test_numbers_must_be_finite_and_in_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.root=/x", override])


def test_contrastive_batch_is_the_global_batch_only_under_feature_accumulation() -> None:
    cfg = load_config(REPO / "configs" / "tic_xlarge.yaml", ["train.accumulation=gradients"])
    assert contrastive_batch(cfg, 8) == 2048 and contrastive_batch(cfg, 352) == 90112
    warning = contrastive_warning(cfg, 8)
    assert warning is not None and "contrastive batch 2048 (micro-batch 256 x 8 ranks)" in warning
    assert contrastive_warning(cfg, 352) is None
    cfg = load_config(REPO / "configs" / "tic_xlarge.yaml")
    assert contrastive_batch(cfg, 8) == 90112 and contrastive_warning(cfg, 8) is None
