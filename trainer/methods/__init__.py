"""Continual methods (the method seam, see docs/DESIGN.md): built-in ones by name, or module:Class."""

from __future__ import annotations

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.methods.base import Method
from trainer.plugins import options, resolve

BUILTIN: dict[str, str] = {}


def build_methods(cfg: Config, dist: DistInfo) -> list[Method]:
    """The run's methods in config order, options checked (errors name methods[i].<key>)."""
    out = []
    for i, m in enumerate(cfg.methods):
        cls = resolve(m.name, BUILTIN, Method, f"methods[{i}].name")
        out.append(cls(cfg, dist, options(cls, m.options, f"methods[{i}].options")))
    return out
