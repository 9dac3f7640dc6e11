"""Training objectives (the objective seam, see docs/DESIGN.md): built-in ones by name, or module:Class."""

from __future__ import annotations

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.objectives.base import Objective
from trainer.plugins import options, resolve

BUILTIN = {"clip": "trainer.objectives.clip:ClipObjective"}


def objective_class(cfg: Config) -> type[Objective]:
    return resolve(cfg.objective.name, BUILTIN, Objective, "objective.name")


def build_objective(cfg: Config, dist: DistInfo) -> Objective:
    """The run's objective with its options checked (errors name objective.options.<key>)."""
    cls = objective_class(cfg)
    return cls(cfg, dist, options(cls, cfg.objective.options, "objective.options"))
