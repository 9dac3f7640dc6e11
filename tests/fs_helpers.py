"""Small real filesystems for full-disk tests: a size-limited tmpfs mounted in a tmp dir."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax, e.g. '2m') at `path`; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize(path: Path, size: str) -> None:
    """Grow or shrink a mounted small_disk in place, its files kept."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def read_only(path: Path) -> None:
    """Make a mounted small_disk read-only, as a failing or full storage node can become."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
