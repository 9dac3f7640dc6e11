"""The objective and method seams are real: an objective and a method defined in this file (not in the
package) train end to end through launch/train.py on 2 ranks, log their terms, keep and resume state."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.conftest import write_year
from tests.dist_helpers import deepspeed_train
from trainer.config import ConfigError, load_config
from trainer.distributed import DistInfo
from trainer.methods import build_methods
from trainer.methods.base import Method, YearContext
from trainer.objectives import build_objective
from trainer.objectives.base import ImageView, LossOutput, Objective, Outputs
from trainer.objectives.clip import ContrastiveLoss

REPO = Path(__file__).resolve().parents[1]
FLIPPED_WEIGHT = 0.5


class FlipClip(Objective):
    """CLIP on the image and on a mirrored view of it (an extra view), counting its steps (state)."""

    def __init__(self, cfg: Any, dist: DistInfo, options: Any) -> None:
        super().__init__(cfg, dist, options)
        self.clip = ContrastiveLoss(dist.rank, dist.world_size)
        self.steps = 0

    def views(self, preprocess: ImageView) -> dict[str, ImageView]:
        return {"image_flip": lambda image: preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))}

    def forward(self, model: Any, batch: Mapping[str, Any]) -> Outputs:
        out = dict(model(image=batch["image"], text=batch["text"]))
        out["flip_features"] = model(image=batch["image_flip"], text=batch["text"])["image_features"]
        return out

    def loss(self, outputs: Outputs, batch: Mapping[str, Any]) -> LossOutput:
        plain = self.clip(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])
        flipped = self.clip(outputs["flip_features"], outputs["text_features"], outputs["logit_scale"])
        return LossOutput(plain + FLIPPED_WEIGHT * flipped, {"plain": plain, "flipped": flipped})

    def after_step(self, outputs: Outputs) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = state.get("steps", 0)


@dataclass(kw_only=True)
class HookOptions:
    weight: float = 0.0


class HookLog(Method):
    """Adds a feature-norm term and writes what each year hook saw to <run>/hooks.jsonl."""

    Options = HookOptions

    def __init__(self, cfg: Any, dist: DistInfo, options: HookOptions) -> None:
        super().__init__(cfg, dist, options)
        self.steps = 0

    def _note(self, ctx: YearContext, event: str) -> None:
        if ctx.dist.is_main:
            objective_steps = getattr(ctx.objective, "steps", None)
            with open(ctx.run.path / "hooks.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {
                            "event": event,
                            "year": ctx.step.tag,
                            "steps": self.steps,
                            "objective_steps": objective_steps,
                            "previous": ctx.previous is not None,
                        }
                    )
                    + "\n"
                )

    def year_start(self, ctx: YearContext) -> None:
        self._note(ctx, "start")

    def loss_terms(self, outputs: Outputs, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"feature_norm": self.options.weight * outputs["image_features"].pow(2).sum(1).mean()}

    def after_step(self, ctx: YearContext) -> None:
        self.steps += 1

    def year_end(self, ctx: YearContext) -> None:
        self._note(ctx, "end")

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = state.get("steps", 0)


def _settings(root: Path, runs: Path, model: Path, name: str) -> list[str]:
    return [
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
        "deepspeed.zero_stage=2",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=4",
        "logging.every_steps=1",
        "logging.progress=false",
        "objective.name=tests.test_seams:FlipClip",
        "methods=[{name: 'tests.test_seams:HookLog', options: {weight: 0.01}}]",
    ]


def _launch(args: list[str], log: Path) -> None:
    # The test module is importable as tests.test_seams in every rank.
    deepspeed_train(args, log, env={"PYTHONPATH": str(REPO)})


def _train_lines(run: Path) -> dict[int, dict[str, Any]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r for r in lines if r["kind"] == "train"}


def _hooks(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "hooks.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def seam_run(tmp_path_factory, tiny_model_json: Path) -> tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("seams")
    root, runs = base / "data", base / "runs"
    write_year(root, "2014", n=64, per_shard=16)
    write_year(root, "2015", n=128, per_shard=32)
    _launch(_settings(root, runs, tiny_model_json, "seams"), base / "seams.log")
    return base, root, runs / "seams"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_objective_and_method_from_a_test_file_train_end_to_end(seam_run) -> None:
    _, _, run = seam_run
    lines = _train_lines(run)
    assert sorted(lines) == list(range(1, 13))
    for r in lines.values():
        total = r["loss/plain"] + FLIPPED_WEIGHT * r["loss/flipped"] + r["loss/0:HookLog/feature_norm"]
        assert r["loss"] == pytest.approx(total, rel=1e-5)
        assert r["loss/plain"] != r["loss/flipped"]  # the mirrored view reached the objective
        assert r["loss/0:HookLog/feature_norm"] > 0
    # The second step mixes two years of unequal size (cumulative-all, 64:128): rank 0's stream
    # draws a third of its 24 samples from 2014.
    counts: dict[str, int] = {}
    for g in range(7, 13):
        for year, n in lines[g]["year_counts"].items():
            counts[year] = counts.get(year, 0) + n
    assert counts == {"2014": 8, "2015": 16}
    assert _hooks(run) == [
        {"event": "start", "year": "2014", "steps": 0, "objective_steps": 0, "previous": False},
        {"event": "end", "year": "2014", "steps": 6, "objective_steps": 6, "previous": False},
        {"event": "start", "year": "2015", "steps": 6, "objective_steps": 6, "previous": True},
        {"event": "end", "year": "2015", "steps": 12, "objective_steps": 12, "previous": True},
    ]
    state = json.loads((run / "checkpoints" / "year-2015" / "trainer_state.json").read_text())
    assert state["objective"] == {"steps": 12} and state["methods"] == {"0:HookLog": {"steps": 12}}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_objective_and_method_state_resume_mid_year(seam_run, tmp_path: Path, tiny_model_json: Path) -> None:
    base, root, run = seam_run
    copy = tmp_path / "runs" / "seams"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("year-2015", "hooks.jsonl"))
    saved = json.loads((copy / "checkpoints" / "step-9" / "trainer_state.json").read_text())
    assert saved["objective"] == {"steps": 9} and saved["methods"] == {"0:HookLog": {"steps": 9}}
    (copy / "metrics.jsonl").write_text("")
    _launch([*_settings(root, tmp_path / "runs", tiny_model_json, "seams"), "--resume", "step-9"], tmp_path / "r.log")
    original, resumed = _train_lines(run), _train_lines(copy)
    assert sorted(resumed) == [10, 11, 12]
    for g in resumed:
        assert resumed[g]["loss"] == pytest.approx(original[g]["loss"], abs=1e-5)
    assert _hooks(copy) == [
        {"event": "start", "year": "2015", "steps": 9, "objective_steps": 9, "previous": True},
        {"event": "end", "year": "2015", "steps": 12, "objective_steps": 12, "previous": True},
    ]


def test_objective_and_method_settings_are_checked_by_key() -> None:
    dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    cases = [
        (["objective.name=siglipp"], "objective.name: 'siglipp' is neither a built-in (clip)"),
        (
            ["objective.name=tests.test_seams:HookLog"],
            "objective.name: tests.test_seams:HookLog is not a subclass of Objective",
        ),
        (["objective.name=no_such_module:X"], "objective.name: cannot import no_such_module"),
        (["objective.options={temperature: 1}"], "objective.options.temperature: unknown setting"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_objective(load_config(None, ["data.root=x", *overrides]), dist)
    bad = ["methods=[{name: 'tests.test_seams:HookLog', options: {weight: fast}}]"]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.options\.weight: expected a number"):
        build_methods(load_config(None, ["data.root=x", *bad]), dist)
    with pytest.raises(ConfigError, match=r"methods\[0\]\.name: ''"):
        build_methods(load_config(None, ["data.root=x", "methods=[{}]"]), dist)
    built = build_methods(load_config(None, ["data.root=x", "methods=[{name: 'tests.test_seams:HookLog'}]"]), dist)
    assert isinstance(built[0], HookLog) and built[0].options == HookOptions()
