"""The run folder: what lives where in runs/<name>/, the checkpoint tag names, and the run's records."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from trainer.config import Config, config_from_dict, save_config
from trainer.errors import UserError
from trainer.files import write_text_atomic

CONFIG = "config.yaml"
PLAN = "plan.json"
METRICS = "metrics.jsonl"
YEARS = "years.jsonl"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
TRAIN_STATE = "trainer_state.json"
"""A readable copy of a checkpoint's client state, beside DeepSpeed's files."""

_YEAR_PREFIX = "year-"
STEP_TAG = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A run folder or checkpoint cannot be written or read (disk full, missing, incomplete)."""


def year_tag(task: str) -> str:
    """The checkpoint tag written at the end of the plan step that added `task` (a year)."""
    return f"{_YEAR_PREFIX}{task}"


def step_tag(global_step: int) -> str:
    """The tag of a mid-year checkpoint after `global_step` optimizer steps of the run."""
    return f"step-{global_step}"


def task_of(tag: str) -> str | None:
    """'year-2016' -> '2016'; None for a mid-year tag."""
    return tag[len(_YEAR_PREFIX) :] if tag.startswith(_YEAR_PREFIX) else None


@dataclass(frozen=True)
class RunDir:
    """One run's folder: config.yaml, plan.json, metrics.jsonl, years.jsonl, checkpoints/<tag>/, keys/, eval/."""

    path: Path

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        return cls(Path(cfg.logging.run_dir) / cfg.logging.name)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN

    @property
    def keys(self) -> Path:
        """Per-rank sample-key audit files (logging.record_keys)."""
        return self.path / "keys"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def tag_dir(self, tag: str) -> Path:
        return self.checkpoints / tag

    def year_tags(self) -> list[str]:
        """Tasks (years) that have a year-<task> checkpoint folder, complete or not, sorted."""
        return sorted(t for p in self.checkpoints.glob(f"{_YEAR_PREFIX}*") if (t := task_of(p.name)))

    def train_state(self, tag: str) -> dict[str, Any]:
        """The client state a checkpoint was saved with (its readable copy)."""
        return read_train_state(self.tag_dir(tag))

    def load_config(self) -> Config:
        """The resolved config the run was started with."""
        if not self.config_file.is_file():
            raise CheckpointError(f"{self.path}: not a run folder (no {CONFIG})")
        return config_from_dict(yaml.safe_load(self.config_file.read_text()))

    def write_header(self, cfg: Config, plan: dict[str, Any]) -> None:
        """config.yaml and plan.json, each written atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_file)
        write_text_atomic(self.plan_file, json.dumps(plan, indent=1))

    def append_year(self, record: dict[str, Any]) -> None:
        """One line of years.jsonl: a finished plan step and its evaluation."""
        with open(self.path / YEARS, "a") as f:
            f.write(json.dumps(record) + "\n")


class RunLock:
    """An exclusive lock on a run folder, held by one launch (its rank 0) from its checks to its end.

    flock on <run>/.lock: the kernel drops it when the holder dies, so a killed run never leaves
    a stale lock; the file names the holder for the message a second launch gets.
    """

    def __init__(self, run: RunDir) -> None:
        self.path = run.path / LOCK
        self.file: IO[str] | None = None

    def check_free(self) -> None:
        """Refuse now if another launch holds the lock (a probe that creates nothing)."""
        if not self.path.is_file():
            return
        with open(self.path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(f) from None
            fcntl.flock(f, fcntl.LOCK_UN)

    def _in_use(self, f: IO[str]) -> CheckpointError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        return CheckpointError(
            f"{self.path.parent}: in use by another launch ({holder}); wait for it to end or choose "
            "another logging.name"
        )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = self._in_use(f)
            f.close()
            raise error from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def read_train_state(tag_dir: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder."""
    return json.loads((Path(tag_dir) / TRAIN_STATE).read_text())
