"""Objectives and methods by name: a built-in one, or `module:Class` of the user's own."""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any

from trainer.typed_config import ConfigError, build_dataclass


def resolve(name: str, builtins: Mapping[str, str], base: type, key: str) -> type:
    """The class `name` stands for: a key of `builtins` (-> "module:Class"), or "module:Class" itself."""
    target = builtins.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(builtins)) or "none yet"
        raise ConfigError(f"{key}: {name!r} is neither a built-in ({known}) nor module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import {module_name} ({e})") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}: {target} is not a subclass of {base.__name__}")
    return cls


def options(cls: Any, values: Mapping[str, Any], key: str) -> Any:
    """`values` checked and converted into `cls.Options`; an unknown or bad setting names `key`.<setting>.

    Options with ranges define `validate(key)`, raising ConfigError for `key`.<setting>.
    """
    built = build_dataclass(cls.Options, dict(values), key)
    check = getattr(built, "validate", None)
    if callable(check):
        check(key)
    return built


def check_range(key: str, value: float, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """ConfigError naming `key` unless low <= value <= high (low < value with `open_low`)."""
    if value < low or (open_low and value == low) or value > high:
        left = "(" if open_low else "["
        right = "]" if high != math.inf else ")"
        raise ConfigError(f"{key}: must be in {left}{low:g}, {high:g}{right}, got {value:g}")
