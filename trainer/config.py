"""The run's configuration: typed dataclasses, loaded from YAML plus dotted CLI overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.files import write_text_atomic
from trainer.typed_config import ConfigError, build_dataclass, merge_trees, parse_overrides


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "ViT-B-32"
    """open_clip model name (zoo) or path to a user JSON model config."""
    attention: Literal["auto", "xformers", "sdpa", "torch"] = "auto"
    """Attention kernel: auto = xformers on CUDA when importable, else SDPA; torch = open_clip as is."""
    grad_checkpointing: bool = False
    """Recompute transformer blocks in backward to save activation memory."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on CUDA, fp32 on CPU."""
    force_quick_gelu: bool = False
    """Use QuickGELU (OpenAI-trained weights and TiC-CLIP checkpoints use it)."""
    trim_text: bool = True
    """Run the text tower only up to each batch's last end-of-text token (exact: causal, EOT-pooled)."""


@dataclass(kw_only=True)
class DataConfig:
    root: str = ""
    """Dataset root (<root>/train/<year>/*.tar) or a folder / brace pattern / fsspec URL of shards."""
    workers: int = 2
    """DataLoader worker processes per rank (0 = read in the training process)."""
    lanes: int = 0
    """Shards read side by side per year; fixes the global sample order (0 = world x workers)."""
    shuffle_shards: int = 8
    """Shards of a lane whose samples are interleaved at random (each still read forward, once a pass)."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready."""
    max_bad_frac: float = 0.01
    """Fail the run when more than this fraction of samples is corrupt."""


@dataclass(kw_only=True)
class TrainConfig:
    global_batch: int = 256
    """Samples per optimizer step over all ranks (= micro_batch x world x accumulation)."""
    micro_batch: int = 32
    """Samples per rank per forward pass."""
    accumulation: Literal["gradients", "features"] = "gradients"
    """How steps beyond micro x world are reached: DeepSpeed gradient accumulation (negatives only
    within micro x world) or open_clip's feature cache (negatives over the whole global batch)."""
    samples: int = 0
    """Samples to train on (per plan step); 0 = one pass over the data."""
    seed: int = 0
    """Seed for init, data order and augmentation."""
    local_loss: bool = False
    """open_clip's local loss: each rank scores its own rows against all columns."""
    gather_with_grad: bool = True
    """Gather features with gradients (exact full-batch gradients)."""
    max_logit_scale: float = 100.0
    """Cap on exp(logit_scale): the parameter is clamped to ln(cap) after every step, as open_clip_train does."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.2
    """Decay for weights with ndim >= 2 (not norms, biases, logit_scale)."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps."""
    schedule: Literal["cosine", "const"] = "cosine"
    """LR after warmup."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 = off)."""
    year_lr_decay: float = 1.0
    """Peak LR of the k-th warm-started plan step = lr x this^k (1 = the same peak every year, as TiC-CLIP)."""


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0-3."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO keeps optimizer state."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO-3 keeps parameters."""
    nvme_path: str = ""
    """Folder for nvme offload."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: auto = nccl on CUDA, gloo on CPU."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged over the generated ones (expert use)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a mid-year checkpoint every N optimizer steps (0 = only at year ends)."""
    keep_last: int = 2
    """Mid-year checkpoints to keep."""
    resume: str = ""
    """'' = fresh run, 'auto' = newest complete checkpoint of this run, or a checkpoint folder."""
    min_free_gb: float = 1.0
    """Refuse to save when the disk has less free space than this plus the last checkpoint's size."""


@dataclass(kw_only=True)
class LoggingConfig:
    run_dir: str = "runs"
    """Folder that holds runs."""
    name: str = ""
    """Run name (folder under run_dir); '' = the config file's stem."""
    every_steps: int = 10
    """Log a metrics line every N optimizer steps."""
    progress: bool = True
    """Show a tqdm bar on rank 0."""
    record_keys: bool = False
    """Write every rank's sample keys per optimizer step to keys/rank-<r>.jsonl (a data audit)."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline needs no network; sync later with `wandb sync`."""
    wandb_project: str = "tic-trainer"
    """W&B project."""


@dataclass(kw_only=True)
class EvalConfig:
    enabled: bool = False
    """Evaluate every yearly checkpoint on every year's eval split during training."""
    samples: int = 0
    """Eval samples per year (0 = all)."""
    batch_size: int = 64
    """Eval batch per rank."""
    tasks: list[str] = field(default_factory=lambda: ["retrieval", "zeroshot"])
    """Which evaluations run after each year: retrieval, zeroshot."""
    cache_mb: int = 2048
    """Per-rank memory for decoded eval images kept between yearly evaluations."""


Strategy = Literal["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "replay", "restart"]


@dataclass(kw_only=True)
class PlanConfig:
    strategy: Strategy = "cumulative-all"
    """Continual strategy (README, 'Continual training: plans and the rehearsal sampler')."""
    years: list[str] = field(default_factory=list)
    """Years of the plan, in order ([] = every year under data.root)."""
    first_step_years: int = 1
    """How many of the first years form the first step (TiC groups 2014-2016 = 3)."""
    warmup_first: int = -1
    """Warmup steps of the first step (-1 = optim.warmup_steps)."""
    buffer_samples: int = 0
    """Replay buffer size for buffer-limited strategies (0 = the new year's size)."""
    buffer_split: Literal["exp", "equal", "size"] = "exp"
    """How `replay` divides its buffer over old years: halving from the newest, equally, or by year size (ER)."""
    buffer_select: Literal["samples", "shards", "herding", "kmeans"] = "samples"
    """What a buffer is made of: the samples of smallest hash (spread over the year), whole shards, or
    exemplars the year-end model picks (herding: iCaRL's mean of features; kmeans: nearest to centroids)."""
    memory_pool: int = 10000
    """herding/kmeans: candidates of a year (smallest key hash) embedded to choose its exemplars from."""
    memory_features: Literal["image", "text", "joint"] = "joint"
    """herding/kmeans: the embedding exemplars are chosen by (joint = both towers' side by side)."""
    restart_budget: Literal["grow", "same"] = "grow"
    """restart: budget x steps so far (grow) or the step budget (same)."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: str = "clip"
    """What a step learns from: clip (open_clip's contrastive loss), or module:Class of your own."""
    options: dict[str, Any] = field(default_factory=dict)
    """The objective's own settings (each objective documents its own)."""


@dataclass(kw_only=True)
class MethodConfig:
    name: str = ""
    """A continual method (reads the previous year's model or data): a built-in name or module:Class."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's own settings."""


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    methods: list[MethodConfig] = field(default_factory=list)
    """Continual methods, applied in order on top of the objective (e.g. distillation, EWC)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of the settings that change what a run computes (not where it logs)."""
        d = self.to_dict()
        for volatile in ("logging", "checkpoint", "eval"):
            d.pop(volatile)
        d["data"].pop("workers")
        d["data"].pop("prefetch_factor")
        # Like the world size, the micro-batch says how a step is split, so a run may resume on
        # another number of ranks with it changed.
        d["train"].pop("micro_batch")
        # Sections and settings added after the first release count only when set, so runs
        # started before they existed (all at these defaults) still resume.
        later: tuple[tuple[dict[str, Any], str, object], ...] = (
            (d, "objective", dataclasses.asdict(ObjectiveConfig())),
            (d, "methods", []),
            (d["data"], "shuffle_shards", DataConfig().shuffle_shards),
            (d["plan"], "buffer_select", PlanConfig().buffer_select),
            (d["plan"], "memory_pool", PlanConfig().memory_pool),
            (d["plan"], "memory_features", PlanConfig().memory_features),
            (d["optim"], "year_lr_decay", OptimConfig().year_lr_decay),
        )
        for section, key, unset in later:
            if section[key] == unset:
                section.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (or defaults when None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    tree = merge_trees(tree, parse_overrides(list(overrides)))
    cfg = build_dataclass(Config, tree, "")
    if not cfg.logging.name and path is not None:
        cfg.logging.name = Path(path).stem
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a saved run's config.yaml)."""
    return build_dataclass(Config, tree, "")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Reject impossible settings; with `world_size`, also the batch arithmetic."""
    t, d, o, ds = cfg.train, cfg.data, cfg.optim, cfg.deepspeed
    positive = {
        "train.global_batch": t.global_batch,
        "train.micro_batch": t.micro_batch,
        "eval.batch_size": cfg.eval.batch_size,
        "data.prefetch_factor": d.prefetch_factor,
        "data.shuffle_shards": d.shuffle_shards,
        "plan.first_step_years": cfg.plan.first_step_years,
        "plan.memory_pool": cfg.plan.memory_pool,
        "logging.every_steps": cfg.logging.every_steps,
        # Keep-last prunes after each save: it must keep the checkpoint it has just written.
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key}: must be at least 1, got {v}")
    non_negative = {
        "train.samples": t.samples,
        "data.workers": d.workers,
        "data.lanes": d.lanes,
        "optim.warmup_steps": o.warmup_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "eval.samples": cfg.eval.samples,
        "plan.buffer_samples": cfg.plan.buffer_samples,
    }
    for key, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {v}")
    if not 0 <= ds.zero_stage <= 3:
        raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param: parameter offload needs deepspeed.zero_stage=3")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer: optimizer offload needs deepspeed.zero_stage >= 1")
    if "nvme" in (ds.offload_param, ds.offload_optimizer) and not ds.nvme_path:
        raise ConfigError("deepspeed.nvme_path: nvme offload needs a folder")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr: must be in [0, optim.lr] = [0, {o.lr}], got {o.min_lr}")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps: must be positive, got {o.eps}")
    for key, amount in (("optim.weight_decay", o.weight_decay), ("checkpoint.min_free_gb", cfg.checkpoint.min_free_gb)):
        if amount < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {amount}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas: two numbers in [0, 1), got {o.betas}")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip: must be 0 (off) or positive, got {o.grad_clip}")
    if not 0 < o.year_lr_decay <= 1:
        raise ConfigError(f"optim.year_lr_decay: must be in (0, 1], got {o.year_lr_decay}")
    if not 0 <= d.max_bad_frac <= 1:
        raise ConfigError(f"data.max_bad_frac: a fraction in [0, 1], got {d.max_bad_frac}")
    if t.max_logit_scale <= 1:
        raise ConfigError(f"train.max_logit_scale: must exceed 1, got {t.max_logit_scale}")
    if not d.root:
        raise ConfigError("data.root: no training data given (a dataset root, shard folder or URL)")
    name = cfg.logging.name
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"logging.name: must be one folder name inside logging.run_dir, got {name!r}")
    if world_size is not None:
        per_step = t.micro_batch * world_size
        if t.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch: {t.global_batch} is not divisible by micro_batch x world size "
                f"= {t.micro_batch} x {world_size}; use a multiple of {per_step}"
            )


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step: the one place the batch arithmetic is done."""
    validate(cfg, world_size)
    return cfg.train.global_batch // (cfg.train.micro_batch * world_size)


def contrastive_batch(cfg: Config, world_size: int) -> int:
    """The negatives each sample is contrasted with: the global batch under feature-cache
    accumulation, one micro-batch per rank (micro x world) under gradient accumulation."""
    t = cfg.train
    return t.global_batch if t.accumulation == "features" else min(t.global_batch, t.micro_batch * world_size)


def contrastive_warning(cfg: Config, world_size: int | None) -> str | None:
    """A warning when gradient accumulation shrinks the contrastive batch below the global batch
    (on `world_size` ranks; None: on any cluster smaller than global batch / micro-batch)."""
    t = cfg.train
    if t.accumulation == "features":
        return None
    fits = t.global_batch // t.micro_batch
    if world_size is None:
        return (
            f"train.accumulation=gradients: on fewer than {fits} GPUs the contrastive batch is micro-batch x "
            f"GPUs, not the global batch {t.global_batch}; train.accumulation=features keeps it"
        )
    if contrastive_batch(cfg, world_size) >= t.global_batch:
        return None
    return (
        f"train.accumulation=gradients: contrastive batch {contrastive_batch(cfg, world_size)} "
        f"(micro-batch {t.micro_batch} x {world_size} ranks), not the global batch {t.global_batch}; "
        "train.accumulation=features keeps it"
    )


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
