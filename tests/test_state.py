"""Checkpoints written before objectives and methods had state still resume: same config digest, same
client-state layout (the literal below is trainer_state.json of a step-15 checkpoint the previous
layout wrote: 2 ranks, demo config, two years)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from trainer.config import load_config
from trainer.rundir import CheckpointError
from trainer.state import CheckpointHeader, StepState, client_state, restore

OLD_CLIENT = {
    "plan_step": 1,
    "global_step": 15,
    "year_complete": False,
    "config_digest": "d6c5ba9c497957c4",
    "world_size": 2,
    "step_state": {"plan_step": 1, "opt_step": 5, "global_step": 15, "bad": {}},
    "sampler": {"step": 1, "seed": 0, "lanes": 2, "years": ["2014", "2015"], "quotas": [640, 640]},
    "cursors": {"2014": 1280, "2015": 640},
}


class Part:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


def test_config_digest_of_a_run_without_objective_or_methods_is_unchanged() -> None:
    cfg = load_config("configs/demo.yaml", ["data.root=/tmp/olddata", "train.samples=1280"])
    assert cfg.digest() == OLD_CLIENT["config_digest"]
    assert (
        load_config(
            "configs/demo.yaml", ["data.root=/tmp/olddata", "train.samples=1280", "objective.options={x: 1}"]
        ).digest()
        != OLD_CLIENT["config_digest"]
    )


def test_old_client_state_restores_with_empty_objective_and_method_state() -> None:
    step, sampler, objective, methods = StepState(plan_step=0), Part({}), Part({"queue": 3}), Part({"x": 1})
    parts = {"step_state": step, "sampler": sampler, "objective": objective, "methods": methods}
    restore(OLD_CLIENT, parts, optional=("objective", "methods"))
    assert step == StepState(plan_step=1, opt_step=5, global_step=15, bad={})
    assert sampler.state == OLD_CLIENT["sampler"]
    assert objective.state == {} and methods.state == {}
    with pytest.raises(CheckpointError, match="no 'objective' state"):
        restore(OLD_CLIENT, parts)


def test_client_state_keeps_the_old_keys_and_adds_the_parts() -> None:
    header = CheckpointHeader(
        plan_step=1,
        global_step=15,
        year_complete=False,
        config_digest="d6c5ba9c497957c4",
        world_size=2,
        cursors={"2014": 1280, "2015": 640},
    )
    step = StepState(plan_step=1, opt_step=5, global_step=15)
    parts = {"step_state": step, "sampler": Part(OLD_CLIENT["sampler"]), "objective": Part({}), "methods": Part({})}
    client = client_state(header, parts)
    assert {k: client[k] for k in OLD_CLIENT} == OLD_CLIENT
    assert client["objective"] == {} and client["methods"] == {}
