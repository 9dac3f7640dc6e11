"""Resumable state: the Stateful protocol, the train state, and the checkpoint client state built from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from trainer.rundir import CheckpointError


@runtime_checkable
class Stateful(Protocol):
    """Anything a checkpoint saves and a resume restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class StepState:
    """Where a plan step stands."""

    plan_step: int
    opt_step: int = 0
    """Optimizer steps done in this plan step."""
    global_step: int = 0
    """Optimizer steps done in the whole run (never reused, names mid-year tags)."""
    bad: dict[str, int] = field(default_factory=dict)
    """Corrupt samples this rank skipped so far in this plan step, by reason."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in StepState(**state).__dict__.items():
            setattr(self, k, v)


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint says about itself, read without loading it (resume order, export, warm starts)."""

    plan_step: int
    global_step: int
    year_complete: bool
    config_digest: str
    world_size: int
    cursors: dict[str, int]
    """Per-year read positions where the step stands, so the next step reads on from there."""


def client_state(header: CheckpointHeader, parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """DeepSpeed's client_state: the header's fields and each part's state_dict() under its name."""
    return {**asdict(header), **{name: part.state_dict() for name, part in parts.items()}}


def restore(client: Mapping[str, Any], parts: Mapping[str, Stateful], optional: tuple[str, ...] = ()) -> None:
    """Load each part from its entry; parts in `optional` may be absent (checkpoints older than them)."""
    for name, part in parts.items():
        state: Mapping[str, Any] | None = client.get(name)
        if state is None and name not in optional:
            raise CheckpointError(f"checkpoint has no {name!r} state")
        part.load_state_dict(state or {})
