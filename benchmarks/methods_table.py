"""Every continual method on the synthetic drift benchmark at equal compute: the methods table.

    python benchmarks/methods_table.py              # or: make methods
    python benchmarks/methods_table.py --only lwf,ewc --seed 1
    python benchmarks/methods_table.py --only sequential,replay,hash_exp,er,mof,kmeans,icarl,lucir

Trains the demo's 3 synthetic years (configs/demo.yaml) once per entry below on 2 DeepSpeed CPU
ranks, each entry's per-step sample budget cut so that its training FLOPs, the method's extras
included (tools/plan.py's count), equal plain training's; then evaluates every yearly checkpoint
on every year and prints ID / BWT / FWT / mean for caption R@1 and zero-shot top-1 side by side
(tools/evaluate.py --compare). Runs already complete are reused (--resume auto).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer.config import load_config
from trainer.data.shards import find_years
from trainer.distributed import DistInfo
from trainer.flops import train_flops
from trainer.methods import build_methods
from trainer.model import create_model
from trainer.objectives import build_objective
from trainer.plan_report import method_flops, plan_for, selection_flops

REPO = Path(__file__).resolve().parents[1]
HERDING = ["plan.buffer_select=herding"]
# name: (plan.strategy, methods, other settings)
ENTRIES: dict[str, tuple[str, list[dict[str, Any]], list[str]]] = {
    "sequential": ("sequential", [], []),
    "replay": ("cumulative-all", [], []),
    "lwf": ("sequential", [{"name": "distill"}], []),
    "ewc": ("sequential", [{"name": "ewc"}], []),
    "ctp": ("sequential", [{"name": "ctp"}], []),
    "ctp_er": ("cumulative-all", [{"name": "ctp"}], []),
    "merge": ("sequential", [{"name": "merge", "options": {"alpha": 0.5}}], []),
    # Memories: a buffer of the new year's size over the old years (TiC's cumulative-exp split)
    # chosen by hash, or by the model; ER shares it in proportion to what was seen.
    "hash_exp": ("cumulative-exp", [], []),
    "er": ("replay", [], ["plan.buffer_split=size"]),
    "mof": ("cumulative-exp", [], HERDING),
    "kmeans": ("cumulative-exp", [], ["plan.buffer_select=kmeans"]),
    "icarl": ("cumulative-exp", [{"name": "distill"}], HERDING),
    "lucir": ("cumulative-exp", [{"name": "lucir"}], HERDING),
}


def equal_compute_samples(
    config: str, data: str, strategy: str, methods: list[dict[str, Any]], other: list[str]
) -> int:
    """The per-step samples (whole global batches) at which the entry costs what plain training does."""
    overrides = [f"data.root={data}", f"plan.strategy={strategy}", f"methods={json.dumps(methods)}", *other]
    cfg = load_config(config, overrides)
    sizes = {y: s.samples for y, s in find_years(data, "train", ["2014", "2015", "2016"]).items()}
    plan = plan_for(cfg, sizes, strategy)
    dist = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    flops = train_flops(create_model(cfg.model)[0])
    plain = plan.total_samples * build_objective(cfg, dist).flops_per_sample(flops)
    extra = method_flops(plan, build_methods(cfg, dist), flops) + selection_flops(plan, cfg, flops)
    batch = cfg.train.global_batch
    return int(cfg.train.samples * plain / (plain + extra)) // batch * batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--data", default=str(REPO / "data" / "demo"))
    p.add_argument("--runs", default=str(REPO / "runs" / "methods"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated entries (default all: " + ", ".join(ENTRIES) + ")")
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else list(ENTRIES)
    bin_dir = Path(sys.executable).parent
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "tools" / "make_shards.py"), "--synthetic", "--out", args.data]
            + ["--years", "2014-2016", "--workers", "2"],
            check=True,
        )
    names = []
    for entry in chosen:
        strategy, methods, other = ENTRIES[entry]
        samples = equal_compute_samples(args.config, args.data, strategy, methods, other)
        name = f"{entry}-s{args.seed}"
        names.append(str(Path(args.runs) / name))
        cmd = [str(bin_dir / "deepspeed"), "--num_gpus", "2", str(REPO / "launch" / "train.py")]
        cmd += ["--config", args.config, "--resume", "auto", f"data.root={args.data}"]
        cmd += [f"logging.run_dir={args.runs}", f"logging.name={name}", f"plan.strategy={strategy}"]
        cmd += [f"train.samples={samples}", f"train.seed={args.seed}", "logging.progress=false"]
        cmd += [f"methods={yaml.safe_dump(methods, default_flow_style=True).strip()}", *other]
        t0 = time.perf_counter()
        print(
            f"== {name}: {strategy} {' '.join(other)}, methods {methods or 'none'}, {samples} samples per step",
            flush=True,
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        print(f"   trained in {time.perf_counter() - t0:.0f} s", flush=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--compare", *names], check=True)


if __name__ == "__main__":
    main()
