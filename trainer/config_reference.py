"""The config reference table (README, `python -m trainer.config_reference`), from the docstrings in config.py."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

from trainer import config
from trainer.config import Config


def reference() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every setting, from the docstrings in config.py."""
    docs: dict[tuple[str, str], str] = {}
    tree = ast.parse(inspect.getsource(config))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[(cls.name, stmt.target.id)] = " ".join(str(nxt.value.value).split())
    rows = []
    for section in dataclasses.fields(Config):
        sub = section.default_factory()
        for f in dataclasses.fields(sub):
            default = getattr(sub, f.name)
            rows.append((f"{section.name}.{f.name}", json.dumps(default), docs.get((type(sub).__name__, f.name), "")))
    return rows


if __name__ == "__main__":
    print("| setting | default | meaning |\n| --- | --- | --- |")
    for key, default, doc in reference():
        print(f"| `{key}` | `{default}` | {doc} |")
