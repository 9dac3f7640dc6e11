"""Weight merging: interpolation with the previous step's weights, an EMA kept in training, and the
settings every built-in method checks by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.methods import build_methods
from trainer.methods.base import YearContext
from trainer.methods.merge import Merge, MergeOptions
from trainer.model import create_model
from trainer.plan import YearStep
from trainer.rundir import RunDir
from trainer.typed_config import ConfigError

DIST = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")


def _step(index: int) -> YearStep:
    return YearStep(index, str(2014 + index), [str(2014 + index)], {}, [], {}, 8, 4, 0, 1e-3, "previous")


def _ctx(tmp_path: Path, model, index: int, previous) -> YearContext:
    cfg = load_config(None, ["data.root=/unused"])
    return YearContext(cfg, DIST, RunDir(tmp_path), _step(index), model, None, previous, None)  # type: ignore[arg-type]


def _models(tiny_model_json: Path):
    cfg = load_config(None, [f"model.name={tiny_model_json}", "data.root=/unused"])
    torch.manual_seed(0)
    a = create_model(cfg.model)[0]
    torch.manual_seed(1)
    b = create_model(cfg.model)[0]
    return a, {k: v.float() for k, v in b.state_dict().items()}


def test_interpolation_blends_the_trained_with_the_previous_weights(tmp_path: Path, tiny_model_json: Path) -> None:
    model, previous = _models(tiny_model_json)
    merge = Merge(None, DIST, MergeOptions(mode="interpolate", alpha=0.25))
    assert merge.handed_on(_ctx(tmp_path, model, 0, None)) is None  # the first step hands on what it trained
    out = merge.handed_on(_ctx(tmp_path, model, 1, lambda: previous))
    assert out is not None
    trained = model.state_dict()
    for k, v in out.items():
        torch.testing.assert_close(v, 0.25 * trained[k].float().reshape(v.shape) + 0.75 * previous[k].reshape(v.shape))
    assert out["logit_scale"].shape == ()  # open_clip's shape, as export writes it


def test_ema_follows_training_steps_and_resumes(tmp_path: Path, tiny_model_json: Path) -> None:
    model, _ = _models(tiny_model_json)
    merge = Merge(None, DIST, MergeOptions(mode="ema", ema_decay=0.5, ema_every=2))
    ctx = _ctx(tmp_path, model, 0, None)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge.year_start(ctx)
    moves = []
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        moves.append({n: p.detach().clone() for n, p in model.named_parameters()})
        merge.after_step(ctx)
        if step == 1:
            saved = merge.state_dict()
    assert merge.updates == 2  # every second step
    # EMA after updates at steps 2 and 4: 0.5 x (0.5 x start + 0.5 x w2) + 0.5 x w4
    name = "visual.conv1.weight"
    expected = 0.25 * start[name] + 0.25 * moves[1][name] + 0.5 * moves[3][name]
    out = merge.handed_on(ctx)
    assert out is not None
    torch.testing.assert_close(out[name], expected)
    # A merge restored from the step-2 state and stepped the same way hands on the same weights.
    again = Merge(None, DIST, MergeOptions(mode="ema", ema_decay=0.5, ema_every=2))
    again.load_state_dict(saved)
    again.year_start(ctx)  # a resumed step keeps its EMA
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(moves[1][n])
    for step in (2, 3):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(moves[step][n])
        again.after_step(ctx)
    resumed = again.handed_on(ctx)
    assert resumed is not None
    assert all(torch.equal(resumed[k], out[k]) for k in out)
    # A new plan step starts a fresh EMA from its own initial weights.
    merge.year_start(_ctx(tmp_path, model, 1, None))
    assert merge.updates == 0 and torch.equal(merge.ema[name], dict(model.named_parameters())[name].detach())


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("[{name: distill, options: {temperature: 0}}]", r"methods\[0\]\.options\.temperature: must be in \(0"),
        ("[{name: distill, options: {rows: some}}]", r"methods\[0\]\.options\.rows"),
        ("[{name: ewc, options: {decay: 1.5}}]", r"methods\[0\]\.options\.decay: must be in \[0, 1\]"),
        ("[{name: ewc, options: {samples: 0}}]", r"methods\[0\]\.options\.samples: must be in \[1"),
        ("[{name: merge, options: {alpha: -0.1}}]", r"methods\[0\]\.options\.alpha: must be in \[0, 1\]"),
        ("[{name: merge, options: {mode: soup}}]", r"methods\[0\]\.options\.mode"),
        ("[{name: ewc}, {name: distill}, {name: ewc}]", r"methods\[2\]\.name: ewc is methods\[0\] already"),
        ("[{name: lwf}]", r"methods\[0\]\.name: 'lwf' is neither a built-in \(ctp, distill, ewc, lucir, merge\)"),
    ],
)
def test_method_settings_are_checked_by_key(methods: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_methods(load_config(None, ["data.root=x", f"methods={methods}"]), DIST)


def test_merging_a_plan_that_restarts_from_scratch_is_refused() -> None:
    cfg = load_config(None, ["data.root=x", "plan.strategy=restart", "methods=[{name: distill}, {name: merge}]"])
    with pytest.raises(ConfigError, match=r"methods\[1\]\.name: merge: plan.strategy=restart trains every step from"):
        build_methods(cfg, DIST)


def test_methods_compose() -> None:
    built = build_methods(
        load_config(None, ["data.root=x", "methods=[{name: distill}, {name: ewc}, {name: ctp}, {name: merge}]"]), DIST
    )
    assert [type(m).__name__ for m in built] == ["Distillation", "Ewc", "Ctp", "Merge"]
