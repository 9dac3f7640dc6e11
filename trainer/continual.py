"""The yearly loop: plan -> for each step: data, init, train, checkpoint, record."""

from __future__ import annotations

import json
import logging
import signal
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist

from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, accumulation_steps, save_config
from trainer.data.loading import step_loader
from trainer.data.pipeline import StreamDataset
from trainer.data.shards import find_years
from trainer.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, sum_counts
from trainer.engine import build_engine
from trainer.evaluate import Evaluator, log_record
from trainer.logging import MetricsLog, progress
from trainer.loop import StepState, optimizer_steps
from trainer.loss import ContrastiveLoss
from trainer.model import check_supported, create_model, model_config
from trainer.plan import Plan, YearStep, make_plan, select_steps
from trainer.sources import check_supported_source, weights_from
from trainer.weights import load_weights

log = logging.getLogger("tic")


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run should exit 0."""


class _StopFlag:
    """Remembers SIGTERM (SLURM preemption) until the loop reaches a point it can save at."""

    def __init__(self) -> None:
        self.raised = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def agreed(self) -> bool:
        """True when any rank was signalled: ranks must stop at the same step or they hang."""
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return self.raised
        return all_reduce_sum([float(self.raised)])[0] > 0


class ContinualRun:
    """Everything one launch of `launch/train.py` does, step after step of the plan."""

    def __init__(
        self, cfg: Config, dist: DistInfo, resume: str = "", start_from: str = "", years: str = ""
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.accum = accumulation_steps(cfg, dist.world_size)
        self.run_dir = Path(cfg.logging.run_dir) / cfg.logging.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.shards = find_years(cfg.data.root, "train", cfg.plan.years or None)
        sizes = {y: shards.samples for y, shards in self.shards.items()}
        self.plan: Plan = make_plan(cfg, sizes)
        self.resume_tag = self._resume_tag(resume or cfg.checkpoint.resume)
        self.selected = select_steps(self.plan, years)
        if start_from:
            check_supported_source(start_from)
        check_supported(cfg.model.name, model_config(cfg.model.name))
        # Built before anything is written: a missing eval split is a user error, not a late crash.
        self.evaluator = Evaluator.from_config(cfg, dist, cfg.plan.years or None) if cfg.eval.enabled else None
        # Checked before anything is written: a resume with other settings must not touch the run.
        self.saved = self._saved_state(self.resume_tag) if self.resume_tag is not None else None
        self.todo, self.mid = self._remaining()
        self.start_weights = self._check_start(start_from)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "plan.json").write_text(json.dumps(self.plan.to_dict(), indent=1))
        barrier()
        self.metrics = MetricsLog(self.run_dir, cfg, dist.is_main)
        self.stop = _StopFlag()

    def _resume_tag(self, resume: str) -> Optional[str]:
        if not resume:
            return None
        tag = ckpt.find_latest(self.ckpt_dir) if resume == "auto" else resume
        tag = broadcast_object(tag)
        if tag is not None and not ckpt.is_complete(self.ckpt_dir / tag):
            raise ConfigError(f"checkpoint.resume: {self.ckpt_dir / tag} is not a complete checkpoint")
        return tag

    def _saved_state(self, tag: str) -> dict[str, Any]:
        state = json.loads((self.ckpt_dir / tag / "trainer_state.json").read_text())
        if state.get("config_digest") != self.cfg.digest():
            raise ConfigError(
                f"checkpoint.resume: {tag} was written by a run with different settings "
                "(compare its config.yaml); start a new run name instead"
            )
        return state

    def _remaining(self) -> tuple[list[YearStep], Optional[str]]:
        """The selected steps still to train, and the mid-year tag the first of them resumes from."""
        first, mid = 0, None
        if self.saved is not None:
            first = self.saved["plan_step"] + (1 if self.saved["year_complete"] else 0)
            mid = None if self.saved["year_complete"] else self.resume_tag
        return [s for s in self.selected if s.index >= first], mid

    def _check_start(self, start_from: str) -> Optional[dict[str, torch.Tensor]]:
        """The first step's given weights, checked against the model; or check its warm start exists."""
        if not self.todo or self.mid is not None:
            return None  # a mid-year checkpoint of this run already carries the weights
        step = self.todo[0]
        if start_from:
            model = create_model(self.cfg.model)[0]
            return weights_from(start_from, model, self.cfg)
        tag = self._year_tag(step.index - 1) if step.init == "previous" else None
        if tag is not None and not ckpt.is_complete(self.ckpt_dir / tag):
            raise ConfigError(
                f"--years: step {step.tag} warm-starts from {tag}, which {self.run_dir} does not have; "
                "train that year first or pass --start-from"
            )
        return None

    def run(self) -> None:
        if self.saved is not None:
            log.info("resuming from %s (plan step %d)", self.resume_tag, self.todo[0].index if self.todo else -1)
        mid = self.mid
        try:
            for step in self.todo:
                self.train_step(step, resume_tag=mid)
                mid = None
        finally:
            self.metrics.close()

    def _model_for(self, step: YearStep) -> tuple[torch.nn.Module, Any, Any]:
        """The step's model (scratch, the previous year's or given weights), transform and tokenizer."""
        torch.manual_seed(self.cfg.train.seed + step.index)
        model, preprocess, _, tokenizer = create_model(self.cfg.model, self.dist.device)
        if self.start_weights is not None:
            # --start-from replaces the first step's initial weights (checked in __init__), once.
            model.load_state_dict(self.start_weights)
            self.start_weights = None
        elif step.init == "previous":
            model.load_state_dict(load_weights(self.ckpt_dir, self._year_tag(step.index - 1)))
        model.output_dict = True
        return model, preprocess, tokenizer

    def _year_tag(self, index: int) -> str:
        return f"year-{self.plan.steps[index].tag}"

    def _cursors_after(self, index: int) -> Optional[dict[str, int]]:
        """Per-year read positions where step `index` ended, so the next step reads on from there."""
        if index < 0 or not ckpt.is_complete(self.ckpt_dir / self._year_tag(index)):
            return None
        return self._saved_state(self._year_tag(index))["cursors"]

    def train_step(self, step: YearStep, resume_tag: Optional[str]) -> None:
        cfg, dist = self.cfg, self.dist
        model, preprocess, tokenizer = self._model_for(step)
        load_dir = self._load_dir(resume_tag)
        engine = build_engine(model, cfg, dist, self.accum, step.steps, step.warmup,
                              load_universal=load_dir != self.ckpt_dir)
        state = StepState(plan_step=step.index, global_step=self._steps_before(step))
        sampler_state = None
        if resume_tag is not None:
            client = ckpt.load(engine, load_dir, resume_tag)
            state = StepState(**client["step_state"])
            sampler_state = client["sampler"]
        loader, dataset = step_loader(
            cfg, dist, step, self.shards, preprocess, tokenizer,
            start=self._cursors_after(step.index - 1), state=sampler_state,
        )
        loss_fn = ContrastiveLoss(
            dist.rank, dist.world_size, cfg.train.local_loss, cfg.train.gather_with_grad, cfg.train.max_logit_scale
        )
        contrastive = cfg.train.micro_batch * dist.world_size * (self.accum if cfg.train.accumulation == "features" else 1)
        log.info(
            "step %d (%s): %d optimizer steps of %d samples, years %s; contrastive batch %d (%s accumulation x%d)",
            step.index, step.tag, step.steps, cfg.train.global_batch, step.quotas, contrastive,
            cfg.train.accumulation, self.accum,
        )
        bar = progress(step.steps, state.opt_step, f"{step.tag}", dist.is_main and cfg.logging.progress)
        workers = max(cfg.data.workers, 1)
        t_last, samples_since = time.perf_counter(), 0
        it = iter(loader)
        keys = self._keys_file() if cfg.logging.record_keys else None
        records = optimizer_steps(engine, it, loss_fn, self.accum, cfg.train.accumulation, dist.device)
        while state.opt_step < step.steps:
            rec = next(records, None)
            if rec is None:
                raise RuntimeError(f"data ran out at optimizer step {state.opt_step} of {step.steps}")
            state.opt_step += 1
            state.global_step += 1
            for b in rec["batches"]:
                for reason, n in b.get("bad", {}).items():
                    state.bad[reason] = state.bad.get(reason, 0) + n
            samples_since += cfg.train.global_batch
            if keys is not None:
                keys.write(json.dumps({"global_step": state.global_step, "keys": [k for b in rec["batches"] for k in b["key"]]}) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if state.opt_step % cfg.logging.every_steps == 0 or state.opt_step == step.steps:
                now = time.perf_counter()
                self.metrics.write(
                    {
                        "plan_step": step.index,
                        "year": step.tag,
                        "step": state.opt_step,
                        "global_step": state.global_step,
                        "loss": rec["loss"],
                        "lr": float(engine.get_lr()[0]),
                        "samples_per_s": samples_since / (now - t_last),
                        "data_wait_s": rec["data_wait"],
                        "compute_s": rec["compute"],
                        "contrastive_batch": contrastive,
                        # Tokens the text tower ran per caption: batches are cut after their last EOT.
                        "text_tokens": statistics.mean(b["text"].shape[1] for b in rec["batches"]),
                        "skipped_rank0": dict(state.bad),
                        "year_counts": _year_counts(rec["batches"]),
                    }
                )
                t_last, samples_since = now, 0
            # Only where every worker stream has consumed the same count is the sampler's state
            # a plain per-year cursor, so mid-year saves wait for such a step.
            if (state.opt_step * self.accum) % workers == 0 and state.opt_step < step.steps:
                stopping = self.stop.agreed()
                every = cfg.checkpoint.every_steps
                if stopping or (every and state.opt_step % every == 0):
                    self._save(engine, f"step-{state.global_step}", state, dataset, year_complete=False)
                if stopping:
                    raise Preempted(f"stopped by SIGTERM after saving step-{state.global_step}")
        if bar is not None:
            bar.close()
        if keys is not None:
            keys.close()
        tag = f"year-{step.tag}"
        self._save(engine, tag, state, dataset, year_complete=True)
        skipped = sum_counts(state.bad)
        log.info("step %d (%s) done: loss %.4f, corrupt samples (all ranks) %s", step.index, step.tag,
                 rec["loss"], skipped or "none")
        del engine, model
        record = {"plan_step": step.index, "year": step.tag, "samples": step.samples, "steps": step.steps,
                  "loss": rec["loss"], "skipped": skipped}
        if self.evaluator is not None:
            results = self.evaluator.evaluate(load_weights(self.ckpt_dir, tag), name=tag)
            record["eval"] = log_record(results, step.new_years)
            self.metrics.write({"plan_step": step.index, "year": step.tag, "global_step": state.global_step,
                                **record["eval"]}, kind="eval")
        if dist.is_main:
            with open(self.run_dir / "years.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _load_dir(self, resume_tag: Optional[str]) -> Path:
        """Where to load `resume_tag` from: the run's own folder, or its universal copy when the
        checkpoint was written by another number of ranks and holds ZeRO-partitioned state."""
        if resume_tag is None:
            return self.ckpt_dir
        world = self.saved.get("world_size", self.dist.world_size)  # resume_tag is self.resume_tag
        if world == self.dist.world_size or not any((self.ckpt_dir / resume_tag).glob("*optim_states.pt")):
            return self.ckpt_dir
        log.info("%s was written by %d ranks, resuming on %d: loading it as a universal checkpoint",
                 resume_tag, world, self.dist.world_size)
        return ckpt.to_universal(self.ckpt_dir, resume_tag, self.dist)

    def _keys_file(self) -> Any:
        folder = self.run_dir / "keys"
        folder.mkdir(exist_ok=True)
        return open(folder / f"rank-{self.dist.rank}.jsonl", "a", buffering=1)

    def _steps_before(self, step: YearStep) -> int:
        return sum(s.steps for s in self.plan.steps[: step.index])

    def _save(self, engine: Any, tag: str, state: StepState, dataset: StreamDataset, year_complete: bool) -> None:
        batches = state.opt_step * self.accum
        client = {
            "plan_step": state.plan_step,
            "global_step": state.global_step,
            "year_complete": year_complete,
            "config_digest": self.cfg.digest(),
            "world_size": self.dist.world_size,
            "step_state": asdict(state),
            "sampler": dataset.state_dict(batches),
            "cursors": dataset.sampler.cursors(batches * self.cfg.train.micro_batch * self.dist.world_size),
        }
        ckpt.save(engine, self.ckpt_dir, tag, client, self.dist, self.cfg.checkpoint.min_free_gb,
                  self.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", tag)


def _year_counts(batches: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in batches:
        for y in b["year"]:
            counts[y] = counts.get(y, 0) + 1
    return counts
