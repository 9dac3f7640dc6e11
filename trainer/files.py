"""Atomic writes: a reader (or a run killed mid-write) sees the old file or the whole new one, never half."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a hidden sibling of `path` (a file or a folder), then rename it onto `path`.

    A file is flushed to disk before the rename. A folder that replaces a folder is swapped in
    by two renames; a failed `write` leaves `path` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # a leftover of a killed write
    try:
        write(tmp)
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path` holds `text` (UTF-8), written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
