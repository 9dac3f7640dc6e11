"""Continual methods (the method seam, see docs/DESIGN.md): built-in ones by name, or module:Class."""

from __future__ import annotations

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.methods.base import Method
from trainer.plugins import options, resolve
from trainer.typed_config import ConfigError

BUILTIN: dict[str, str] = {
    "ctp": "trainer.methods.ctp:Ctp",
    "distill": "trainer.methods.distill:Distillation",
    "ewc": "trainer.methods.ewc:Ewc",
    "lucir": "trainer.methods.lucir:Lucir",
    "merge": "trainer.methods.merge:Merge",
}


def build_methods(cfg: Config, dist: DistInfo) -> list[Method]:
    """The run's methods in config order, options checked (errors name methods[i].<key>)."""
    out: list[Method] = []
    for i, m in enumerate(cfg.methods):
        cls: type[Method] = resolve(m.name, BUILTIN, Method, f"methods[{i}].name")
        twin = next((j for j, o in enumerate(out) if type(o) is cls), None)
        if twin is not None:
            raise ConfigError(f"methods[{i}].name: {m.name} is methods[{twin}] already; a method runs once")
        merging = [j for j, o in enumerate(out) if _merges(type(o))]
        if merging and _merges(cls):
            raise ConfigError(
                f"methods[{i}].name: {m.name} merges the weights a step hands on, as methods[{merging[0]}] does; "
                "one merging method per run"
            )
        problem = cls.conflict(cfg)
        if problem:
            raise ConfigError(f"methods[{i}].name: {problem}")
        out.append(cls(cfg, dist, options(cls, m.options, f"methods[{i}].options")))
    return out


def _merges(cls: type[Method]) -> bool:
    """Whether the method replaces the weights a step hands on."""
    return cls.handed_on is not Method.handed_on
