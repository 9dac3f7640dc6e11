"""Training throughput of a config: samples/s, step time split, peak memory, FLOPs per sample and MFU.

    python benchmarks/throughput.py --config configs/demo.yaml --steps 20 [overrides...]
    python benchmarks/throughput.py --config configs/demo.yaml --data data/demo   # real loader
    deepspeed --num_gpus 2 benchmarks/throughput.py --config configs/demo.yaml

Batches are random tensors made once (data wait 0), or with --data DIR the shards under DIR read
by the config's own loader for the first step of its plan, exactly as a training run reads them.
Each optimizer step is split into data wait / forward (with the loss) / backward / optimizer.
FLOPs are counted by torch under SDPA's math kernel (training = 3 x forward) and checked against
the formula, and scaled to the text lengths the batches had (model.trim_text cuts each batch
after its last end-of-text token); MFU is achieved FLOP/s over the peak of a large matmul measured in this process
before and after the timed steps (CPU: fp32; GPU: the run's dtype), the higher of the two.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch

from trainer.config import Config, accumulation_steps, load_config
from trainer.data.loading import step_data
from trainer.data.shards import find_years
from trainer.distributed import DistInfo, init_distributed
from trainer.engine import build_engine, resolve_precision
from trainer.flops import analytic_flops, forward_flops, matmul_peak, sync
from trainer.host import tune_cpu_process
from trainer.model import create_model
from trainer.objectives.clip import ContrastiveLoss
from trainer.plan import make_plan

PARTS = ("data", "forward", "backward", "optimizer")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_batches(model: Any, micro: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """The same random batch forever: the step without any data loading."""
    image = torch.randn(micro, 3, *model.visual.image_size, device=device)
    text = torch.randint(1, 1000, (micro, model.context_length), device=device)
    return itertools.repeat({"image": image, "text": text})


def loader_batches(cfg: Config, dist: DistInfo, preprocess: Any, tokenizer: Any) -> Iterator[dict[str, Any]]:
    """The rank's batches of the plan's first step, through the same loader a training run builds."""
    shards = find_years(cfg.data.root, "train", cfg.plan.years or None)
    plan = make_plan(cfg, {year: s.samples for year, s in shards.items()})
    return iter(step_data(cfg, dist, plan.steps[0], shards, preprocess, tokenizer).loader)


def time_steps(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    loss_fn: ContrastiveLoss,
    accum: int,
    device: torch.device,
    n: int,
    text_lengths: list[int],
) -> list[dict[str, float]]:
    """Seconds of each part of `n` optimizer steps (DeepSpeed gradient accumulation over `accum`).

    Appends each micro-batch's text length (trimmed batches are shorter than the context) to `text_lengths`.
    """
    steps = []
    for _ in range(n):
        parts = dict.fromkeys(PARTS, 0.0)

        def lap(part: str, since: float, parts: dict[str, float] = parts) -> float:
            sync(device)  # kernels are asynchronous on CUDA: charge each part its own work
            now = time.perf_counter()
            parts[part] += now - since
            return now

        for _ in range(accum):
            t = time.perf_counter()
            batch = next(batches)
            image = batch["image"].to(device, non_blocking=True)
            text = batch["text"].to(device, non_blocking=True)
            text_lengths.append(text.shape[1])
            t = lap("data", t)
            out = engine(image=image, text=text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            t = lap("forward", t)
            engine.backward(loss)
            t = lap("backward", t)
            engine.step()
            lap("optimizer", t)
        steps.append(parts)
    return steps


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes and what they measure: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS of the training process"


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--data", metavar="DIR", help="read these shards with the config's loader (default: random tensors)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = as launch/train.py picks)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    probe = load_config(args.config, ["data.root=unused", *args.overrides])
    # Enough samples for every timed step, so the loader never runs dry mid-benchmark.
    samples = (args.warmup + args.steps) * probe.train.global_batch
    data = [f"data.root={args.data}", f"train.samples={samples}"] if args.data else ["data.root=unused"]
    cfg = load_config(args.config, [*data, *args.overrides])
    dist = init_distributed(cfg.deepspeed.backend)
    tune_cpu_process(dist.device)  # as launch/train.py does
    if args.threads:
        torch.set_num_threads(args.threads)
    accum = accumulation_steps(cfg, dist.world_size)
    torch.manual_seed(0)
    model, preprocess, _, tokenizer = create_model(cfg.model, dist.device)
    model.output_dict = True
    forward = forward_flops(model)
    formula = analytic_flops(model)
    engine = build_engine(model, cfg, dist, accum, args.steps + args.warmup, 0)
    loss_fn = ContrastiveLoss(
        dist.rank, dist.world_size, cfg.train.local_loss, cfg.train.gather_with_grad, cfg.train.max_logit_scale
    )
    if args.data:
        batches = loader_batches(cfg, dist, preprocess, tokenizer)
    else:
        batches = random_batches(model, cfg.train.micro_batch, dist.device)
    precision = resolve_precision(cfg.model.precision, dist.device)
    peak_dtype = DTYPES[precision] if dist.device.type == "cuda" else torch.float32
    peak_before = matmul_peak(dist.device, peak_dtype)
    lengths: list[int] = []
    time_steps(engine, batches, loss_fn, accum, dist.device, args.warmup, lengths)
    lengths.clear()
    steps = time_steps(engine, batches, loss_fn, accum, dist.device, args.steps, lengths)
    peak_after = matmul_peak(dist.device, peak_dtype)
    memory, memory_what = peak_memory(dist.device)
    if not dist.is_main:
        return
    totals = [sum(s.values()) for s in steps]
    step = statistics.median(totals)
    samples_per_s = cfg.train.global_batch / step
    # What the steps ran: the counter's forward at the full context, scaled by the formula to the
    # batches' text lengths (test_flops checks the formula against the counter at both).
    run = forward * statistics.mean(analytic_flops(model, n).total for n in lengths) / formula.total
    achieved = samples_per_s / dist.world_size * 3 * run
    peak = max(peak_before, peak_after)
    source = f"shards {args.data}" if args.data else "random tensors"
    print(
        f"config {args.config}  model {cfg.model.name}  attention {cfg.model.attention}  "
        f"zero {cfg.deepspeed.zero_stage}  "
        f"precision {precision}  world {dist.world_size}  micro {cfg.train.micro_batch}  accum {accum}  "
        f"threads {torch.get_num_threads()}  data {source} (workers {cfg.data.workers if args.data else 0})"
    )
    print(
        f"samples/s {samples_per_s:.1f}  step {step * 1000:.1f} ms (median of {args.steps}; "
        f"min {min(totals) * 1000:.1f}, max {max(totals) * 1000:.1f})"
    )
    print("  " + "  ".join(f"{part} {_ms([s[part] for s in steps])}" for part in PARTS))
    print(f"peak memory {memory / 2**30:.2f} GiB ({memory_what})")
    print(
        f"FLOPs/sample: train {3 * forward:.3e} (3 x forward {forward:.3e}, torch counter under SDPA math); "
        f"formula {formula.total:.3e}, attention {formula.attention / formula.total:.1%} of it"
    )
    print(
        f"text tokens per batch: {statistics.mean(lengths):.1f} of {model.context_length} (model.trim_text="
        f"{cfg.model.trim_text}); train FLOPs/sample run {3 * run:.3e}"
    )
    print(
        f"achieved {achieved / 1e9:.1f} GFLOP/s per rank  {str(peak_dtype).removeprefix('torch.')} matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})  "
        f"MFU {achieved / peak:.1%}"
    )


if __name__ == "__main__":
    main()
