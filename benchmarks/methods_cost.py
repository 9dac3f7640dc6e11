"""Step time and peak memory of each continual method against plain CLIP, in interleaved runs.

    python benchmarks/methods_cost.py --config configs/demo.yaml --rounds 3 --steps 20

Each measurement is a fresh process (so its peak memory is its own): one DeepSpeed rank, the
config's model and micro-batch, random batches with years half old, half new, the method set up
as in a plan's second step (a previous model to distil from, a Fisher to hold to, a momentum
encoder and queue) and `--steps` timed optimizer steps after 3 warm-up steps, the method's
per-step hooks included. Rounds visit the methods in turn (A B C ... A B C ...), so a change in
the machine's speed affects them alike. Peak memory: the process's peak resident set on the
CPU (VmHWM), torch's peak allocation on CUDA. The year-end passes (EWC's Fisher, merging) are
not in the step time; tools/plan.py --compare counts their FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

METHODS: dict[str, list[dict[str, Any]]] = {
    "clip": [],
    "distill": [{"name": "distill"}],
    "ewc": [{"name": "ewc"}],
    "ctp": [{"name": "ctp"}],
    "merge-ema": [{"name": "merge", "options": {"mode": "ema"}}],
}


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(config: str, method: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    """One measurement in this process: build, set the method up, time `steps` optimizer steps."""
    from safetensors.torch import save_file

    from trainer.config import MethodConfig, accumulation_steps, load_config
    from trainer.distributed import init_distributed
    from trainer.engine import build_engine
    from trainer.loop import accumulate_gradients
    from trainer.methods import build_methods
    from trainer.methods.base import YearContext
    from trainer.methods.ewc import fisher_file
    from trainer.model import create_model
    from trainer.objectives import build_objective
    from trainer.plan import YearStep
    from trainer.rundir import RunDir

    dist = init_distributed()
    cfg = load_config(config, ["data.root=/unused", *overrides])
    cfg.methods = [MethodConfig(**m) for m in METHODS[method]]
    accum = accumulation_steps(cfg, dist.world_size)
    torch.manual_seed(1)
    previous = {k: v.float() for k, v in create_model(cfg.model)[0].state_dict().items()}
    torch.manual_seed(0)
    model = create_model(cfg.model, dist.device)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum, steps + 3, 0)
    run = Path(tempfile.mkdtemp())
    path = fisher_file(run, "2014")
    path.parent.mkdir(parents=True)
    save_file({n: torch.rand(p.shape) * 1e-3 for n, p in model.named_parameters()}, str(path))
    micro = cfg.train.micro_batch
    step = YearStep(1, "2015", ["2015"], {}, [], {}, micro, steps, 0, cfg.optim.lr, "previous")
    objective = build_objective(cfg, dist)
    methods = build_methods(cfg, dist)
    ctx = YearContext(cfg, dist, RunDir(run), step, engine.module, objective, lambda: previous, "2014")
    for m in methods:
        m.year_start(ctx)
    image = torch.randn(micro, 3, *model.visual.image_size, device=dist.device)
    text = torch.randint(1, 1000, (micro, model.context_length), device=dist.device)
    batch = {"image": image, "text": text, "year": ["2014", "2015"] * (micro // 2) + ["2015"] * (micro % 2)}
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        accumulate_gradients(engine, [batch] * accum, objective, dist.device, methods)
        for m in methods:
            m.after_step(ctx)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"method": method, "step_s": statistics.median(times), "peak_mib": _peak_memory_mib(dist.device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.config, args.child, args.steps, args.overrides)))
        return
    chosen = args.methods.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in chosen}
    for r in range(args.rounds):
        for method in chosen:
            cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps), "--child", method]
            done = subprocess.run([*cmd, *args.overrides], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{method}: failed\n{done.stderr[-2000:]}")
            results[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {method} {results[method][-1]['step_s'] * 1000:.0f} ms", file=sys.stderr)
    base = statistics.median(x["step_s"] for x in results[chosen[0]])
    base_mem = statistics.median(x["peak_mib"] for x in results[chosen[0]])
    print(f"{'method':<11} {'step ms':>8} {'vs ' + chosen[0]:>9} {'peak MiB':>9} {'+ MiB':>7}   per-round step ms")
    for method, xs in results.items():
        step = statistics.median(x["step_s"] for x in xs)
        mem = statistics.median(x["peak_mib"] for x in xs)
        rounds = " ".join(f"{x['step_s'] * 1000:.0f}" for x in xs)
        print(f"{method:<11} {step * 1000:>8.0f} {step / base:>8.2f}x {mem:>9.0f} {mem - base_mem:>+7.0f}   {rounds}")


if __name__ == "__main__":
    main()
