"""One plan step: build its model, engine and data, run its optimizer steps, save, and close the year."""

from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file

from trainer import checkpoint as ckpt
from trainer.config import Config, contrastive_batch, contrastive_warning
from trainer.data.loading import step_data
from trainer.data.shards import YearShards
from trainer.distributed import DistInfo, sum_counts
from trainer.engine import build_engine
from trainer.errors import UserError
from trainer.eval.evaluator import Evaluator, log_record
from trainer.exemplars import SELECTORS, memory_shards, select_memories
from trainer.logging import MetricsLog, progress
from trainer.loop import StepRecord, method_name, optimizer_steps
from trainer.methods.base import Method, YearContext
from trainer.model import create_model
from trainer.objectives.base import Objective
from trainer.plan import Plan, YearStep
from trainer.preemption import Preempted, StopFlag
from trainer.rundir import RunDir, step_tag, year_tag
from trainer.state import CheckpointHeader, StepState, client_state, restore
from trainer.weights.consolidate import HANDED_ON, load_weights

log = logging.getLogger("tic")

BATCH_KEYS = ("image", "text", "key", "year", "cls", "meta", "year_counts", "bad")
"""What every batch holds; an objective's extra views take other names."""


class Diverged(UserError):
    """The loss became nan or inf: training stops there, its last checkpoint intact."""


@dataclass
class RunParts:
    """What every plan step of one launch shares."""

    cfg: Config
    dist: DistInfo
    run: RunDir
    plan: Plan
    shards: Mapping[str, YearShards]
    accum: int
    objective: Objective
    methods: Sequence[Method]
    metrics: MetricsLog
    stop: StopFlag
    evaluator: Evaluator | None


class MethodStates:
    """The methods' states as one Stateful part, each under its method_name."""

    def __init__(self, methods: Sequence[Method]) -> None:
        self.methods = methods

    def state_dict(self) -> dict[str, Any]:
        return {method_name(i, m): m.state_dict() for i, m in enumerate(self.methods)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, m in enumerate(self.methods):
            m.load_state_dict(state.get(method_name(i, m), {}))


class StepRun:
    """Plan step `step` of a run: `run()` trains it to its yearly checkpoint (resuming from `resume_tag`)."""

    def __init__(
        self,
        parts: RunParts,
        step: YearStep,
        resume_tag: str | None,
        load_dir: Path,
        start_weights: dict[str, torch.Tensor] | None,
    ) -> None:
        self.p, self.step, self.resume_tag, self.load_dir = parts, step, resume_tag, load_dir
        self.start_weights = start_weights

    def run(self) -> None:
        self._build()
        rec = self._train()
        self._finish(rec)

    # -- build -------------------------------------------------------------------------------

    def _build(self) -> None:
        p, step = self.p, self.step
        model, preprocess, tokenizer = self._model()
        # The step's own peak (optim.year_lr_decay); the cosine floor never above it.
        optim = replace(p.cfg.optim, lr=step.lr, min_lr=min(p.cfg.optim.min_lr, step.lr))
        self.engine = build_engine(
            model,
            replace(p.cfg, optim=optim),
            p.dist,
            p.accum,
            step.steps,
            step.warmup,
            load_universal=self.load_dir != p.run.checkpoints,
        )
        self.state = StepState(plan_step=step.index, global_step=sum(s.steps for s in p.plan.steps[: step.index]))
        views = p.objective.views(preprocess)
        clash = sorted(set(views) & set(BATCH_KEYS))
        if clash:
            raise ValueError(f"{type(p.objective).__name__}: view names {clash} are batch keys already")
        self.inputs = ("image", "text", *views)
        memories = {}
        if p.cfg.plan.buffer_select in SELECTORS:
            memories = {y: memory_shards(p.shards[y], p.run.path, y, step.pool[y]) for y in step.buffered}
        self.data = step_data(
            p.cfg,
            p.dist,
            step,
            p.shards,
            preprocess,
            tokenizer,
            start=self._cursors_after(step.index - 1),
            views=views,
            buffers=memories,
        )
        if self.resume_tag is not None:
            client = ckpt.load(self.engine, self.load_dir, self.resume_tag)
            # Checkpoints written before objectives and methods had state lack their entries.
            restore(client, self._parts(), optional=("objective", "methods"))
        self.data.batches = self.state.opt_step * p.accum
        self.ctx = YearContext(
            p.cfg,
            p.dist,
            p.run,
            step,
            self.engine.module,
            p.objective,
            self._previous(),
            p.plan.steps[step.index - 1].tag if step.index else None,
            [y for s in p.plan.steps[: step.index] for y in s.new_years],
        )
        for method in p.methods:
            method.year_start(self.ctx)
        if self.ctx.previous is not None:
            self._previous_weights.cache_clear()

    def _model(self) -> tuple[torch.nn.Module, Any, Any]:
        """The step's model (scratch, the previous year's or given weights), transform and tokenizer."""
        p, step = self.p, self.step
        torch.manual_seed(p.cfg.train.seed + step.index)
        model, preprocess, _, tokenizer = create_model(p.cfg.model, p.dist.device)
        if self.start_weights is not None:
            model.load_state_dict(self.start_weights)
        elif step.init == "previous":
            model.load_state_dict(load_weights(p.run.checkpoints, self._year_tag(step.index - 1)))
        model.output_dict = True
        return model, preprocess, tokenizer

    def _previous(self) -> Callable[[], dict[str, torch.Tensor]] | None:
        if self.step.index == 0:
            return None
        tag = self._year_tag(self.step.index - 1)
        # Read once however many methods ask at year start (a teacher, an anchor, a momentum start);
        # _build clears it after, so the copy is not held through the year.
        self._previous_weights = functools.cache(lambda: load_weights(self.p.run.checkpoints, tag))
        return self._previous_weights

    def _year_tag(self, index: int) -> str:
        return year_tag(self.p.plan.steps[index].tag)

    def _cursors_after(self, index: int) -> dict[str, int] | None:
        """Per-year read positions where step `index` ended, so the next step reads on from there."""
        if index < 0 or not ckpt.is_complete(self.p.run.tag_dir(self._year_tag(index))):
            return None
        return self.p.run.train_state(self._year_tag(index))["cursors"]

    def _parts(self) -> dict[str, Any]:
        return {
            "step_state": self.state,
            "sampler": self.data,
            "objective": self.p.objective,
            "methods": MethodStates(self.p.methods),
        }

    # -- the optimizer-step loop ----------------------------------------------------------------

    def _train(self) -> StepRecord:
        p, step, state = self.p, self.step, self.state
        cfg = p.cfg
        contrastive = contrastive_batch(cfg, p.dist.world_size)
        self.contrastive = contrastive
        warning = contrastive_warning(cfg, p.dist.world_size)
        if warning:
            log.warning("%s", warning)
        log.info(
            "step %d (%s): %d optimizer steps of %d samples, years %s; contrastive batch %d (%s accumulation x%d)",
            step.index,
            step.tag,
            step.steps,
            cfg.train.global_batch,
            step.quotas,
            contrastive,
            cfg.train.accumulation,
            p.accum,
        )
        bar = progress(step.steps, state.opt_step, f"{step.tag}", p.dist.is_main and cfg.logging.progress)
        keys = self._keys_file() if cfg.logging.record_keys else None
        self._t_last, self._steps_since = time.perf_counter(), 0
        records = optimizer_steps(
            self.engine,
            iter(self.data.loader),
            p.objective,
            p.methods,
            p.accum,
            cfg.train.accumulation,
            p.dist.device,
            self.inputs,
            cfg.train.max_logit_scale,
        )
        rec: StepRecord | None = None
        try:
            while state.opt_step < step.steps:
                rec = next(records, None)
                if rec is None:
                    raise RuntimeError(f"data ran out at optimizer step {state.opt_step} of {step.steps}")
                if not math.isfinite(rec.loss):
                    # Before anything is logged or saved: the last checkpoint is the last good one.
                    raise Diverged(
                        f"loss is {rec.loss} at optimizer step {state.opt_step + 1} of year {step.tag} (global step "
                        f"{state.global_step + 1}); nothing after it was saved: resume from the last checkpoint "
                        "with a lower optim.lr or optim.grad_clip"
                    )
                self._count(rec, keys)
                for method in p.methods:
                    method.after_step(self.ctx)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec.loss:.4f}")
                self._log(rec)
                self._save_point()
        finally:
            if bar is not None:
                bar.close()
            if keys is not None:
                keys.close()
        assert rec is not None, "a plan step has at least one optimizer step"
        return rec

    def _count(self, rec: StepRecord, keys: IO[str] | None) -> None:
        state = self.state
        state.opt_step += 1
        state.global_step += 1
        self.data.batches = state.opt_step * self.p.accum
        for b in rec.batches:
            for reason, n in b.get("bad", {}).items():
                state.bad[reason] = state.bad.get(reason, 0) + n
        if keys is not None:
            keys.write(
                json.dumps({"global_step": state.global_step, "keys": [k for b in rec.batches for k in b["key"]]})
                + "\n"
            )

    def _log(self, rec: StepRecord) -> None:
        cfg, state, step = self.p.cfg, self.state, self.step
        self._steps_since += 1
        if state.opt_step % cfg.logging.every_steps and state.opt_step != step.steps:
            return
        now = time.perf_counter()
        self.p.metrics.write(
            {
                "plan_step": step.index,
                "year": step.tag,
                "step": state.opt_step,
                "global_step": state.global_step,
                "loss": rec.loss,
                **{f"loss/{name}": v for name, v in rec.terms.items()},
                "lr": rec.lr,
                "samples_per_s": self._steps_since * cfg.train.global_batch / (now - self._t_last),
                "data_wait_s": rec.data_wait,
                "compute_s": rec.compute,
                "contrastive_batch": self.contrastive,
                # Tokens the text tower ran per caption: batches are cut after their last EOT.
                "text_tokens": statistics.mean(b["text"].shape[1] for b in rec.batches),
                "skipped_rank0": dict(state.bad),
                "year_counts": _year_counts(rec.batches),
            }
        )
        self._t_last, self._steps_since = now, 0

    def _save_point(self) -> None:
        """Mid-year checkpoints every checkpoint.every_steps, and on SIGTERM (then stop)."""
        state, every = self.state, self.p.cfg.checkpoint.every_steps
        # Only where every worker stream has drawn the same count is the sampler's state one
        # point of its segment, so mid-year saves wait for such a step.
        if not self.data.at_stream_boundary() or state.opt_step >= self.step.steps:
            return
        stopping = self.p.stop.agreed()
        if stopping or (every and state.opt_step % every == 0):
            self._save(step_tag(state.global_step), year_complete=False)
        if stopping:
            by = self.p.stop.name if self.p.stop.raised else "another rank's stop signal"
            raise Preempted(f"stopped by {by} after saving {step_tag(state.global_step)}")

    def _keys_file(self) -> IO[str]:
        folder = self.p.run.keys
        folder.mkdir(exist_ok=True)
        return open(folder / f"rank-{self.p.dist.rank}.jsonl", "a", buffering=1)

    # -- year end -------------------------------------------------------------------------------

    def _finish(self, rec: StepRecord) -> None:
        p, step, state = self.p, self.step, self.state
        for method in p.methods:
            method.year_end(self.ctx)
        if p.cfg.plan.buffer_select in SELECTORS:
            select_memories(p.cfg, p.dist, self.engine.module, p.plan, step.index, p.run.path)
        handed = [w for w in (m.handed_on(self.ctx) for m in p.methods) if w is not None]
        tag = year_tag(step.tag)
        self._save(tag, year_complete=True, handed_on=handed[-1] if handed else None)
        skipped = sum_counts(state.bad)
        log.info(
            "step %d (%s) done: loss %.4f, corrupt samples (all ranks) %s",
            step.index,
            step.tag,
            rec.loss,
            skipped or "none",
        )
        del self.engine, self.ctx
        record: dict[str, Any] = {
            "plan_step": step.index,
            "year": step.tag,
            "samples": step.samples,
            "steps": step.steps,
            "loss": rec.loss,
            "skipped": skipped,
        }
        if p.evaluator is not None:
            results = p.evaluator.evaluate(load_weights(p.run.checkpoints, tag), name=tag)
            record["eval"] = log_record(results, step.new_years)
            p.metrics.write(
                {"plan_step": step.index, "year": step.tag, "global_step": state.global_step, **record["eval"]},
                kind="eval",
            )
        if p.dist.is_main:
            p.run.append_year(record)

    def _save(self, tag: str, year_complete: bool, handed_on: dict[str, torch.Tensor] | None = None) -> None:
        p, state = self.p, self.state
        files = {}
        if handed_on is not None:
            weights = {k: v.contiguous() for k, v in handed_on.items()}
            files[HANDED_ON] = lambda tmp: save_file(weights, str(tmp))
        header = CheckpointHeader(
            plan_step=state.plan_step,
            global_step=state.global_step,
            year_complete=year_complete,
            config_digest=p.cfg.digest(),
            world_size=p.dist.world_size,
            cursors=self.data.cursors(),
        )
        ckpt.save(
            self.engine,
            p.run.checkpoints,
            tag,
            client_state(header, self._parts()),
            p.dist,
            p.cfg.checkpoint.min_free_gb,
            p.cfg.checkpoint.keep_last,
            files,
        )
        log.info("saved checkpoint %s", tag)


def _year_counts(batches: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in batches:
        for y in b["year"]:
            counts[y] = counts.get(y, 0) + 1
    return counts
