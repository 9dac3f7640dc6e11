"""Training throughput of a config: samples/s, step time split, FLOPs per sample and MFU.

    python benchmarks/throughput.py --config configs/demo.yaml --steps 20 [overrides...]
    deepspeed --num_gpus 2 benchmarks/throughput.py --config configs/demo.yaml

Batches are random tensors made once (or, with --real-data, the config's own loader), so the
figure is the model + DeepSpeed step; MFU is achieved FLOP/s over the peak of a large matmul
measured in the same process (CPU: fp32; GPU: the run's dtype).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainer.config import accumulation_steps, load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine, resolve_precision
from trainer.flops import train_flops
from trainer.loss import ContrastiveLoss
from trainer.model import create_model


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the machine's practical dense peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["data.root=unused", *args.overrides])
    dist = init_distributed(cfg.deepspeed.backend)
    accum = accumulation_steps(cfg, dist.world_size)
    torch.manual_seed(0)
    model = create_model(cfg.model, dist.device)[0]
    model.output_dict = True
    flops = train_flops(model)
    engine = build_engine(model, cfg, dist, accum, args.steps + args.warmup, 0)
    loss_fn = ContrastiveLoss(dist.rank, dist.world_size)
    size = model.visual.image_size
    micro = cfg.train.micro_batch
    image = torch.randn(micro, 3, *size, device=dist.device)
    text = torch.randint(1, 1000, (micro, model.context_length), device=dist.device)
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(args.warmup + args.steps):
        parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        t_step = time.perf_counter()
        for _ in range(accum):
            t = time.perf_counter()
            out = engine(image=image, text=text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            _sync(dist.device)
            parts["forward"] += time.perf_counter() - t
            t = time.perf_counter()
            engine.backward(loss)
            _sync(dist.device)
            parts["backward"] += time.perf_counter() - t
            t = time.perf_counter()
            engine.step()
            _sync(dist.device)
            parts["optimizer"] += time.perf_counter() - t
        if i >= args.warmup:
            for k, v in parts.items():
                times[k].append(v)
            times["step"].append(time.perf_counter() - t_step)
    precision = resolve_precision(cfg.model.precision, dist.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    peak = matmul_peak(dist.device, dtype)
    step = statistics.median(times["step"])
    samples_per_s = cfg.train.global_batch / step
    achieved = samples_per_s * flops / dist.world_size
    if dist.is_main:
        print(f"config {args.config} model {cfg.model.name} attention {cfg.model.attention} zero {cfg.deepspeed.zero_stage} "
              f"precision {precision} world {dist.world_size} micro {micro} accum {accum} threads {torch.get_num_threads()}")
        print(f"samples/s {samples_per_s:.1f}  step {step * 1000:.1f} ms (median of {args.steps})  "
              + "  ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in times.items() if k != "step"))
        print(f"train FLOPs/sample {flops:.3e}  achieved {achieved / 1e9:.1f} GFLOP/s per rank  "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s  MFU {achieved / peak:.1%}")


if __name__ == "__main__":
    main()
