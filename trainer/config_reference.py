"""The config reference table (README, `python -m trainer.config_reference`), from the docstrings in config.py."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing

from trainer import config
from trainer.config import Config


def reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every setting, from the docstrings in config.py."""
    docs: dict[tuple[str, str], str] = {}
    tree = ast.parse(inspect.getsource(config))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
            ):
                docs[(cls.name, stmt.target.id)] = " ".join(str(nxt.value.value).split())
    rows = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        kind = hints[section.name]
        # A list section (methods) is a list of settings blocks: its rows read methods[].name.
        listed = typing.get_origin(kind) is list
        sub = (typing.get_args(kind)[0] if listed else kind)()
        prefix = f"{section.name}[]" if listed else section.name
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            rows.append((f"{prefix}.{f.name}", json.dumps(default), docs.get((type(sub).__name__, f.name), "")))
    return rows


if __name__ == "__main__":
    print("| setting | default | meaning |\n| --- | --- | --- |")
    for key, default, doc in reference():
        print(f"| `{key}` | `{default}` | {doc} |")
