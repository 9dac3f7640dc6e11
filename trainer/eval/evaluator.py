"""Evaluate a checkpoint on every year's eval split: retrieval recall and zero-shot accuracy.

From the training loop, after each year (all ranks call it; every rank gets the same dict):

    evaluator = Evaluator.from_config(cfg, dist)                              # once per run
    results = evaluator.evaluate(load_weights(ckpt_dir, year_tag(step.tag)))  # {eval year: {metric: value}}
    years_jsonl_record["eval"] = results                                      # rank 0 appends it
    metrics_log.write({"year": step.tag, **log_record(results, step.new_years)}, kind="eval")  # wandb too

Weights go into a plain fp32 open_clip model built by `create_model`, never a DeepSpeed engine,
so ZeRO-3 partitioning never matters. Keep one Evaluator for the run: it decodes each year's
images once and keeps them (up to `cache_mb`) for every later checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import Config, ConfigError, EvalConfig, ModelConfig
from trainer.data.pipeline import Item
from trainer.data.shards import DataError, YearShards
from trainer.distributed import DistInfo
from trainer.engine import resolve_precision
from trainer.eval.data import (
    Block,
    ClassSpec,
    eval_years,
    gather_objects,
    gather_rows,
    load_classes,
    rank_block,
    read_block,
    sum_over_ranks,
)
from trainer.eval.matrix import transfer_summary
from trainer.eval.metrics import KS, METRICS, retrieval_hits, zeroshot_counts, zeroshot_metrics
from trainer.model import create_model, open_clip_state_dict
from trainer.weights.open_clip import check_fits

log = logging.getLogger("tic")

TASKS = ("retrieval", "zeroshot")


@dataclass(kw_only=True)
class EvalOptions:
    """What to evaluate and how; the run config's eval section gives samples and batch_size."""

    tasks: tuple[str, ...] = TASKS
    """Which evaluations to run: retrieval, zeroshot (zero-shot needs class names and .cls labels)."""
    samples: int = 0
    """Eval samples per year, the first of the canonical order (0 = the whole split)."""
    batch_size: int = 64
    """Encoder batch per rank."""
    cache_mb: int = 2048
    """Per-rank memory for decoded eval images kept between checkpoints (0 = decode every time)."""
    classes_file: str = ""
    """JSON with "classes" and "templates" for zero-shot ('' = the dataset's manifest.json)."""
    per_year_classes: bool = True
    """Restrict each year's zero-shot candidates to the manifest's classes_by_year when it has them."""

    @classmethod
    def from_config(cls, cfg: EvalConfig, **overrides: Any) -> EvalOptions:
        """Options from the run config's eval section, plus overrides."""
        fields = {
            "tasks": tuple(cfg.tasks),
            "samples": cfg.samples,
            "batch_size": cfg.batch_size,
            "cache_mb": cfg.cache_mb,
        }
        return cls(**{**fields, **overrides})

    def validate(self) -> None:
        """Reject options that cannot work, naming the option."""
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"eval tasks: {', '.join(unknown) or 'none given'}; choose from {', '.join(TASKS)}")
        bounds = (("samples", self.samples, 0), ("batch_size", self.batch_size, 1), ("cache_mb", self.cache_mb, 0))
        for name, value, low in bounds:
            if value < low:
                raise ConfigError(f"eval {name}: must be at least {low}, got {value}")


@dataclass
class _Year:
    """What an Evaluator keeps of one year between checkpoints (this rank's view)."""

    n: int
    block: Block
    groups: torch.Tensor
    """Caption id of every position (equal captions share one), -1 for unusable samples."""
    labels: torch.Tensor
    """Class label of every position, -1 when none."""
    skipped: dict[str, int]
    captions: int
    """Distinct captions of the year."""
    text_block: Block
    text_tokens: torch.Tensor
    """Tokens of this rank's share of the year's distinct captions."""
    images: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Cached (block positions, preprocessed images) per batch window, or None to re-read."""


class Evaluator:
    """Evaluates models on the eval split of chosen years; keeps decoded images between checkpoints."""

    def __init__(
        self, model_cfg: ModelConfig, data_root: str, years: list[str] | None, options: EvalOptions, dist: DistInfo
    ) -> None:
        options.validate()
        self.options, self.dist, self.device = options, dist, dist.device
        self.shards: dict[str, YearShards] = eval_years(data_root, years or None)
        self.years = list(self.shards)
        self.spec: ClassSpec | None = None
        if "zeroshot" in options.tasks:
            self.spec = load_classes(data_root, options.classes_file)
            if self.spec is None and dist.is_main:
                log.warning("%s: no class names (manifest 'classes' or a classes file); zero-shot skipped", data_root)
        self.model, _, self.preprocess, self.tokenizer = create_model(model_cfg, self.device)
        self.model.eval()
        # CPU stays fp32 (bf16 autocast there is ~30x slower); CUDA follows the training precision.
        precision = resolve_precision(model_cfg.precision, self.device) if self.device.type == "cuda" else "fp32"
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.cache_left = options.cache_mb * 2**20
        self.state: dict[str, _Year] = {}
        self.prompt_tokens: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Config, dist: DistInfo, years: list[str] | None = None) -> Evaluator:
        """The evaluator a training run uses: its model, data root and eval section."""
        return cls(cfg.model, cfg.data.root, years, EvalOptions.from_config(cfg.eval), dist)

    def evaluate(
        self, model_or_weights: nn.Module | dict[str, torch.Tensor], name: str = "checkpoint"
    ) -> dict[str, dict[str, float]]:
        """{year: {metric: value}} for a model (not ZeRO-3 partitioned) or an open_clip state dict."""
        weights = model_or_weights
        if isinstance(weights, nn.Module):
            weights = open_clip_state_dict(weights)
        check_fits(weights, self.model, name)
        self.model.load_state_dict(weights)
        results: dict[str, dict[str, float]] = {}
        classifier: torch.Tensor | None = None
        with torch.inference_mode():
            for year in self.years:
                state, image_emb = self._images(year)
                # Labels are known to every rank alike, so all join the collective encoding or none does.
                if classifier is None and self.spec is not None and bool((state.labels >= 0).any()):
                    classifier = self._classifier()
                results[year] = self._metrics(year, state, image_emb, classifier)
        return results

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def _encode(self, fn: Any, batch: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = fn(batch.to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=-1)

    def _encode_texts(self, tokens: torch.Tensor, block: Block, total: int) -> torch.Tensor:
        """Embeddings of `total` texts, each rank encoding its block's tokens; all ranks get all rows."""
        local = torch.zeros(block.per, self._dim(), device=self.device)
        bs = self.options.batch_size
        for i in range(0, len(tokens), bs):
            chunk = tokens[i : i + bs]
            local[i : i + len(chunk)] = self._encode(self.model.encode_text, chunk)
        return gather_rows(local, total)

    def _dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def _spec(self) -> ClassSpec:
        """The class names and templates; zero-shot runs only when the data has them."""
        assert self.spec is not None, "zero-shot evaluation without class names"
        return self.spec

    def _classifier(self) -> torch.Tensor:
        """One embedding per class: the normalised mean of its template prompts (open_clip's recipe)."""
        spec = self._spec()
        prompts = spec.prompts()
        rank, size = self.dist.rank, self.dist.world_size
        block = rank_block(len(prompts), size, rank, self.options.batch_size)
        if self.prompt_tokens is None:
            self.prompt_tokens = self.tokenizer(prompts[block.start : block.stop])
        emb = self._encode_texts(self.prompt_tokens, block, len(prompts))
        emb = emb.view(len(spec.classes), len(spec.templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def _read(self, year: str, block: Block, meta: list | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(block positions, images) of the usable samples per batch window, read and decoded now.

        With `meta`, also appends each position's (caption, class) or the reason it is unusable.
        """
        bs, length = self.options.batch_size, block.stop - block.start
        window: list[tuple[int, torch.Tensor]] = []
        for pos, got in enumerate(read_block(self.shards[year], block.start, block.stop, self.preprocess)):
            if meta is not None:
                meta.append(got if isinstance(got, str) else (got.caption, got.cls))
            if isinstance(got, Item):
                window.append((pos, got.image))
            # Windows end at whole batches of the canonical order, whatever the world size.
            if window and ((pos + 1) % bs == 0 or pos + 1 == length):
                yield torch.tensor([p for p, _ in window]), torch.stack([im for _, im in window])
                window = []

    def _images(self, year: str) -> tuple[_Year, torch.Tensor]:
        """The year's description (built on first use) and every position's image embedding."""
        state = self.state.get(year)
        if state is None:
            n = _limit(self.shards[year].samples, self.options.samples)
            if n == 0:
                raise DataError(f"{self.shards[year].prefix}: the eval split of {year} has no samples")
            block = rank_block(n, self.dist.world_size, self.dist.rank, self.options.batch_size)
        else:
            n, block = state.n, state.block
        meta: list = []
        kept: list | None = [] if state is None else None
        if state is not None and state.images is not None:
            windows: Iterable[tuple[torch.Tensor, torch.Tensor]] = state.images
        else:
            windows = self._read(year, block, meta if state is None else None)
        local = torch.zeros(block.per, self._dim(), device=self.device)
        for positions, images in windows:
            local[positions.to(self.device)] = self._encode(self.model.encode_image, images)
            kept = self._keep(kept, positions, images)
        if state is None:
            state = self.state[year] = self._describe(year, n, block, meta, kept)
        return state, gather_rows(local, n)

    def _metrics(
        self, year: str, state: _Year, image_emb: torch.Tensor, classifier: torch.Tensor | None
    ) -> dict[str, float]:
        valid = (state.groups >= 0).nonzero().squeeze(1)
        if len(valid) == 0:
            raise DataError(f"{self.shards[year].prefix}: no usable eval sample in {year} (skipped: {state.skipped})")
        out: dict[str, float] = {"samples": len(valid), "skipped": state.n - len(valid)}
        # Each rank scores the queries of its own block against every candidate; the counts are summed.
        mine = valid[(valid >= state.block.start) & (valid < state.block.stop)].to(self.device)
        valid = valid.to(self.device)
        if "retrieval" in self.options.tasks:
            unique_emb = self._encode_texts(state.text_tokens, state.text_block, state.captions)
            text_emb = unique_emb[state.groups.clamp(min=0).to(self.device)]
            out.update(self._retrieval(image_emb, text_emb, state.groups.to(self.device), mine, valid))
        if classifier is not None and bool((state.labels >= 0).any()):
            out.update(self._zeroshot(year, state.labels.to(self.device), image_emb, classifier, mine, valid))
        return out

    def _zeroshot(
        self,
        year: str,
        labels: torch.Tensor,
        image_emb: torch.Tensor,
        classifier: torch.Tensor,
        mine: torch.Tensor,
        valid: torch.Tensor,
    ) -> dict[str, float]:
        """Zero-shot accuracies over the labelled samples, candidates restricted to the year's classes if listed."""
        spec = self._spec()
        labelled = mine[labels[mine] >= 0]
        allowed = spec.by_year.get(year) if self.options.per_year_classes else None
        counts = zeroshot_counts(
            image_emb[labelled] @ classifier.T,
            labels[labelled],
            len(spec.classes),
            None if allowed is None else torch.tensor(allowed, device=self.device),
        )
        out = zeroshot_metrics(sum_over_ranks(counts), len(spec.classes))
        if out:
            out["zs_samples"] = int((labels[valid] >= 0).sum())
        return out

    def _retrieval(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        groups: torch.Tensor,
        mine: torch.Tensor,
        valid: torch.Tensor,
    ) -> dict[str, float]:
        """Recall counts for this rank's queries against every usable candidate, summed over ranks."""
        hits = torch.stack(
            [
                retrieval_hits(image_emb[mine], text_emb[valid], groups[mine], groups[valid]),
                retrieval_hits(text_emb[mine], image_emb[valid], groups[mine], groups[valid]),
                retrieval_hits(image_emb[mine], text_emb[valid], mine, valid),
                retrieval_hits(text_emb[mine], image_emb[valid], mine, valid),
            ]
        )
        rates = (sum_over_ranks(hits).double() / len(valid)).tolist()
        out: dict[str, float] = {}
        for prefix, (i2t, t2i) in (("", rates[0:2]), ("strict_", rates[2:4])):
            for j, k in enumerate(KS):
                out[f"{prefix}i2t_R{k}"], out[f"{prefix}t2i_R{k}"] = i2t[j], t2i[j]
                out[f"{prefix}mean_R{k}"] = (i2t[j] + t2i[j]) / 2
        return out

    def _keep(self, kept: list | None, positions: torch.Tensor, images: torch.Tensor) -> list | None:
        """Add a window to the year's cache being built (None: not building), or give up when over budget."""
        if kept is None:
            return None
        size = images.numel() * images.element_size()
        if size > self.cache_left:
            self.cache_left += sum(im.numel() * im.element_size() for _, im in kept)
            return None
        self.cache_left -= size
        kept.append((positions, images))
        return kept

    def _describe(self, year: str, n: int, block: Block, items: list, kept: list | None) -> _Year:
        """The year's shared description: every rank's captions and labels, caption ids, text shares."""
        everything = [x for part in gather_objects(items) for x in part]
        skipped: dict[str, int] = {}
        ids: dict[str, int] = {}
        groups, labels = [], []
        for got in everything:
            if isinstance(got, str):
                skipped[got] = skipped.get(got, 0) + 1
                groups.append(-1)
                labels.append(-1)
                continue
            caption, cls = got
            groups.append(ids.setdefault(caption, len(ids)))
            labels.append(cls)
        if skipped and self.dist.is_main:
            log.warning("eval %s: %d of %d samples unusable (%s)", year, sum(skipped.values()), n, skipped)
        if self.spec is not None and max(labels, default=-1) >= len(self.spec.classes):
            raise DataError(f"eval {year}: class label {max(labels)} but only {len(self.spec.classes)} class names")
        captions = list(ids)
        text_block = rank_block(len(captions), self.dist.world_size, self.dist.rank, self.options.batch_size)
        share = captions[text_block.start : text_block.stop]
        tokens = self.tokenizer(share) if share else torch.zeros(0, 1, dtype=torch.long)
        return _Year(
            n=n,
            block=block,
            groups=torch.tensor(groups),
            labels=torch.tensor(labels),
            skipped=skipped,
            captions=len(captions),
            text_block=text_block,
            text_tokens=tokens,
            images=kept,
        )


def _limit(available: int, samples: int) -> int:
    return min(available, samples) if samples else available


def evaluate_checkpoint(
    model_or_weights: nn.Module | dict[str, torch.Tensor],
    data_root: str,
    years: list[str] | None,
    model_cfg: ModelConfig,
    options: EvalOptions,
    dist: DistInfo,
) -> dict[str, dict[str, float]]:
    """One-shot evaluation of one checkpoint; to evaluate several, keep an Evaluator (it caches images)."""
    return Evaluator(model_cfg, data_root, years, options, dist).evaluate(model_or_weights)


def log_record(results: dict[str, dict[str, float]], train_years: list[str]) -> dict[str, Any]:
    """Flat numbers for MetricsLog.write(kind="eval"): <year>/<metric>, <in_domain|backward|forward|mean>/<metric>."""
    record: dict[str, Any] = {f"{y}/{m}": v for y, ms in results.items() for m, v in ms.items()}
    for metric in METRICS:
        values = {y: ms[metric] for y, ms in results.items() if metric in ms}
        if values:
            for part, v in transfer_summary(values, train_years).items():
                if v is not None:
                    record[f"{part}/{metric}"] = v
    return record


def options_dict(options: EvalOptions) -> dict[str, Any]:
    """The options as plain JSON."""
    d = asdict(options)
    d["tasks"] = list(options.tasks)
    return d
