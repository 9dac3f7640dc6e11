"""The yearly loop: check everything, then plan step after plan step (trainer/year.py trains one)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, accumulation_steps
from trainer.data.shards import find_years
from trainer.distributed import DistInfo, broadcast_object
from trainer.eval.evaluator import Evaluator
from trainer.layout import TRAIN
from trainer.logging import MetricsLog
from trainer.methods import build_methods
from trainer.model import check_supported, create_model, model_config
from trainer.objectives import build_objective
from trainer.plan import YearStep, make_plan, select_steps
from trainer.preemption import StopFlag
from trainer.rundir import CheckpointError, RunDir, RunLock, year_tag
from trainer.weights.sources import check_supported_source, weights_from
from trainer.year import RunParts, StepRun

log = logging.getLogger("tic")


class ContinualRun:
    """Everything one launch of `launch/train.py` does, step after step of the plan."""

    def __init__(self, cfg: Config, dist: DistInfo, resume: str = "", start_from: str = "", years: str = "") -> None:
        if not cfg.logging.name:
            raise ConfigError("logging.name: the run needs a name (or a --config file, whose stem names it)")
        self.cfg = cfg
        self.dist = dist
        self.accum = accumulation_steps(cfg, dist.world_size)
        self.run_dir = RunDir.of(cfg)
        # A launch on a live run is told so first, not about what the live run is writing.
        self._on_rank0(RunLock(self.run_dir).check_free)
        self.shards = find_years(cfg.data.root, TRAIN, cfg.plan.years or None)
        sizes = {y: shards.samples for y, shards in self.shards.items()}
        self.plan = make_plan(cfg, sizes)
        self.resume_tag = self._resume_tag(resume or cfg.checkpoint.resume)
        self.selected = select_steps(self.plan, years)
        if start_from:
            check_supported_source(start_from)
        check_supported(cfg.model.name, model_config(cfg.model.name))
        # Built before anything is written: a bad objective or method is a user error, not a late crash.
        self.objective = build_objective(cfg, dist)
        self.methods = build_methods(cfg, dist)
        # Built before anything is written: a missing eval split is a user error, not a late crash.
        self.evaluator = Evaluator.from_config(cfg, dist, cfg.plan.years or None) if cfg.eval.enabled else None
        # Checked before anything is written: a resume with other settings must not touch the run.
        self.saved = self._saved_state(self.resume_tag) if self.resume_tag is not None else None
        self.todo, self.mid = self._remaining()
        if self.saved is None:
            self._refuse_overwrite()
        self.start_weights = self._check_start(start_from)
        self.lock = self._own_run_dir()
        self.metrics = MetricsLog(self.run_dir.path, cfg, dist.is_main)
        self.stop = StopFlag()

    def _on_rank0(self, check: Callable[[], None]) -> None:
        """Run `check` on rank 0; a CheckpointError it raises is raised on every rank."""
        refused = ""
        if self.dist.is_main:
            try:
                check()
            except CheckpointError as e:
                refused = str(e)
        refused = broadcast_object(refused)
        if refused:
            raise CheckpointError(refused)

    def _own_run_dir(self) -> RunLock:
        """The run folder, locked by this launch until it ends, with its config and plan written.

        Rank 0 does both; every rank learns whether it could (a folder in use, a run_dir that is
        a file or read-only).
        """
        lock = RunLock(self.run_dir)

        def own() -> None:
            try:
                lock.acquire()
                self.run_dir.write_header(self.cfg, self.plan.to_dict())
            except OSError as e:
                lock.release()
                raise CheckpointError(f"{self.run_dir.path}: cannot write the run folder ({e.strerror or e})") from None

        self._on_rank0(own)
        return lock

    def _resume_tag(self, resume: str) -> str | None:
        if not resume:
            return None
        ckpt_dir = self.run_dir.checkpoints
        tag = ckpt.find_latest(ckpt_dir) if resume == "auto" else resume
        tag = broadcast_object(tag)
        if tag is not None and not ckpt.is_complete(ckpt_dir / tag):
            raise ConfigError(f"checkpoint.resume: {ckpt_dir / tag} is not a complete checkpoint")
        return tag

    def _saved_state(self, tag: str) -> dict[str, Any]:
        state = self.run_dir.train_state(tag)
        if state.get("config_digest") != self.cfg.digest():
            raise ConfigError(
                f"checkpoint.resume: {tag} was written by a run with different settings "
                "(compare its config.yaml); start a new run name instead"
            )
        return state

    def _refuse_overwrite(self) -> None:
        """A launch without --resume trains its steps anew: it may not replace checkpoints of them."""
        first = self.todo[0].index if self.todo else len(self.plan.steps)
        ckpt_dir = self.run_dir.checkpoints
        tags = sorted(d.name for d in ckpt_dir.iterdir() if ckpt.is_complete(d)) if ckpt_dir.is_dir() else []
        later = [t for t in tags if self.run_dir.train_state(t).get("plan_step", first) >= first]
        if later:
            raise ConfigError(
                f"{self.run_dir.path}: already has {', '.join(later)}; pass --resume auto to continue the run, "
                "or choose another logging.name"
            )

    def _remaining(self) -> tuple[list[YearStep], str | None]:
        """The selected steps still to train, and the mid-year tag the first of them resumes from."""
        first, mid = 0, None
        if self.saved is not None:
            first = self.saved["plan_step"] + (1 if self.saved["year_complete"] else 0)
            mid = None if self.saved["year_complete"] else self.resume_tag
        return [s for s in self.selected if s.index >= first], mid

    def _check_start(self, start_from: str) -> dict[str, torch.Tensor] | None:
        """The first step's given weights, checked against the model; or check its warm start exists."""
        if not self.todo or self.mid is not None:
            return None  # a mid-year checkpoint of this run already carries the weights
        step = self.todo[0]
        if start_from:
            model = create_model(self.cfg.model)[0]
            return weights_from(start_from, model, self.cfg)
        tag = year_tag(self.plan.steps[step.index - 1].tag) if step.init == "previous" else None
        if tag is not None and not ckpt.is_complete(self.run_dir.tag_dir(tag)):
            raise ConfigError(
                f"--years: step {step.tag} warm-starts from {tag}, which {self.run_dir.path} does not have; "
                "train that year first or pass --start-from"
            )
        return None

    def run(self) -> None:
        if self.saved is not None:
            log.info("resuming from %s (plan step %d)", self.resume_tag, self.todo[0].index if self.todo else -1)
        parts = RunParts(
            self.cfg,
            self.dist,
            self.run_dir,
            self.plan,
            self.shards,
            self.accum,
            self.objective,
            self.methods,
            self.metrics,
            self.stop,
            self.evaluator,
        )
        mid, start_weights = self.mid, self.start_weights
        try:
            for step in self.todo:
                StepRun(parts, step, mid, self._load_dir(mid), start_weights).run()
                # --start-from replaces the first step's initial weights (checked in __init__), once.
                mid, start_weights = None, None
        finally:
            self.metrics.close()
            self.lock.release()

    def _load_dir(self, resume_tag: str | None) -> Path:
        """Where to load `resume_tag` from: the run's own folder, or its universal copy when the
        checkpoint was written by another number of ranks and holds ZeRO-partitioned state."""
        ckpt_dir = self.run_dir.checkpoints
        if resume_tag is None:
            return ckpt_dir
        assert self.saved is not None  # resume_tag is self.resume_tag
        world = self.saved.get("world_size", self.dist.world_size)
        if world == self.dist.world_size or not any((ckpt_dir / resume_tag).glob("*optim_states.pt")):
            return ckpt_dir
        log.info(
            "%s was written by %d ranks, resuming on %d: loading it as a universal checkpoint",
            resume_tag,
            world,
            self.dist.world_size,
        )
        return ckpt.to_universal(ckpt_dir, resume_tag, self.dist)
