"""Our trainer against open_clip's own (open_clip_train): same model, batch, precision, shards, threads.

    python benchmarks/vs_open_clip.py --setup        # once: .venv-openclip (see open_clip_venv.py)
    python benchmarks/vs_open_clip.py [--runs 5] [--steps 30] [--warmup 5] [--threads 2]

Model configs/models/tiny-vit-64.json (ViT 64 px / patch 8 / 4 x 256, text ctx 32 / 4 x 256), batch
64, fp32, 1 process, 1 data worker, no eval, on synthetic JPEG shards made once by
tools/make_shards.py. Ours is launch/train.py with configs/bench_tiny64.yaml; theirs is
open_clip_train.main with the model registered by add_model_config. Runs alternate ours/theirs
in ABBA order. A run's figure is its median step time over the steps after the warmup, taken
from each trainer's own per-step log (our metrics.jsonl samples_per_s; their "Batch (t)"); both
include the data wait. Neither evaluates; ours writes its year-end checkpoint after its last
step, theirs (--logs none) writes none. Our ZeRO stage is the config's (0: one rank). MFU is achieved
FLOP/s (torch's count, training = 3 x forward, at the text length each ran: ours cuts every
text batch after its last end-of-text token, model.trim_text) over a 2048^2 fp32 matmul
measured between runs at the same thread count; `model.trim_text=false` runs ours at full length.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import open_clip_venv
import torch

from trainer.config import ModelConfig
from trainer.flops import matmul_peak, train_flops
from trainer.model import create_model

REPO = open_clip_venv.REPO
MODEL_JSON = REPO / "configs" / "models" / "tiny-vit-64.json"
CONFIG = REPO / "configs" / "bench_tiny64.yaml"
BATCH, YEAR = 64, "2014"
RUN_TIMEOUT_S = 3600
_THEIR_STEP = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)")
# Launcher variables of a parent job would turn either trainer into a rank of it.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def make_shards(folder: Path, samples: int) -> list[Path]:
    """Synthetic 64 px JPEG shards of one year (made once per sample count); their tar files."""
    year = folder / "train" / YEAR
    if not (folder / "manifest.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "make_shards.py"),
                "--synthetic",
                "--out",
                str(folder),
                "--years",
                YEAR,
                "--samples-per-year",
                str(samples),
                "--eval-samples",
                str(BATCH),
                "--image-size",
                "64",
                "--image-format",
                "jpg",
                "--workers",
                "1",
                "--no-progress",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return sorted(year.glob("*.tar"))


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return env


def run_ours(
    work: Path, name: str, shards: Path, samples: int, threads: int, overrides: list[str]
) -> tuple[list[float], list[float]]:
    """Per-step seconds and text tokens per caption of launch/train.py, from its metrics.jsonl."""
    run_dir = work / "ours" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(CONFIG),
        f"model.name={MODEL_JSON}",
        f"data.root={shards}",
        f"plan.years=[{YEAR}]",
        f"train.samples={samples}",
        f"logging.run_dir={work / 'ours'}",
        f"logging.name={name}",
        *overrides,
    ]
    _run(cmd, work / f"{name}.log", _env(threads), REPO)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    shutil.rmtree(run_dir / "checkpoints")  # written after the last step; only disk space here
    return [BATCH / r["samples_per_s"] for r in records], [r["text_tokens"] for r in records]


def run_theirs(work: Path, name: str, tars: list[Path], samples: int, threads: int) -> list[float]:
    """Per-step seconds of open_clip_train from its "Batch (t)" log lines (logged every step)."""
    cwd = work / "theirs"
    shutil.rmtree(cwd / "none" / name, ignore_errors=True)  # --logs none still makes none/<name>
    cwd.mkdir(parents=True, exist_ok=True)
    first, last = tars[0].stem, tars[-1].stem
    cmd = [
        str(open_clip_venv.PYTHON),
        "-c",
        open_clip_venv.ENTRY,
        str(MODEL_JSON),
        "--model",
        MODEL_JSON.stem,
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--train-data",
        f"{tars[0].parent}/{{{first}..{last}}}.tar",
        "--train-num-samples",
        str(samples),
        "--dataset-type",
        "webdataset",
        "--batch-size",
        str(BATCH),
        "--epochs",
        "1",
        "--workers",
        "1",
        "--lr",
        "1e-3",
        "--wd",
        "0.1",
        "--warmup",
        "5",
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
        "--logs",
        "none",
        "--name",
        name,
        "--report-to",
        "",
    ]
    out = _run(cmd, work / f"{name}.log", _env(threads), cwd)
    return [float(m.group(2)) for m in _THEIR_STEP.finditer(out)]


def _run(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> str:
    with open(log, "w") as f:
        try:
            # A trainer that cannot read its shards logs and retries forever rather than failing.
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{cmd[0]} ran past {RUN_TIMEOUT_S} s; see {log}") from None
    out = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}); see {log}")
    return out


def _summary(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f} (min {min(values):.2f}, max {max(values):.2f}, spread {(max(values) - min(values)) / med:.1%})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create .venv-openclip and exit")
    p.add_argument("--runs", type=int, default=5, help="runs of each trainer")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps before them, not timed")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both trainers")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "vs_open_clip", help="shards, runs and logs")
    p.add_argument("overrides", nargs="*", help="dotted overrides of our config, e.g. deepspeed.zero_stage=1")
    args = p.parse_args()
    if args.setup:
        open_clip_venv.create()
        print(json.dumps(open_clip_venv.check()))
        return
    found = open_clip_venv.check()
    args.work = args.work.resolve()  # open_clip_train runs in a folder of its own
    total = args.steps + args.warmup
    samples = total * BATCH
    args.work.mkdir(parents=True, exist_ok=True)
    shards = args.work / f"shards-{samples}"
    tars = make_shards(shards, samples)
    torch.set_num_threads(args.threads)
    model = create_model(ModelConfig(name=str(MODEL_JSON)))[0]
    flops = train_flops(model)
    print(
        f"model {MODEL_JSON.name}  batch {BATCH}  fp32  1 process  1 data worker  threads {args.threads}  "
        f"steps {args.steps} timed after {args.warmup}  train FLOPs/sample {flops:.3e}  "
        f"open_clip {found['open_clip']}  webdataset (theirs) {found['webdataset']}  "
        f"ours: {CONFIG.name} {' '.join(args.overrides)}"
    )
    rates: dict[str, list[float]] = {"ours": [], "theirs": []}
    peaks: list[float] = []
    tokens: list[float] = []
    for r in range(args.runs):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for who in order:
            name = f"{who}-{r}"
            load = os.getloadavg()[0]
            if who == "ours":
                steps, run_tokens = run_ours(args.work, name, shards, samples, args.threads, args.overrides)
                tokens += run_tokens[args.warmup :]
            else:
                steps = run_theirs(args.work, name, tars, samples, args.threads)
            if len(steps) != total:
                raise SystemExit(f"{name}: logged {len(steps)} steps, expected {total}; see {args.work / name}.log")
            timed = steps[args.warmup :]
            rates[who].append(BATCH / statistics.median(timed))
            print(
                f"run {r + 1} {who:>6}: {rates[who][-1]:6.2f} samples/s  "
                f"median step {statistics.median(timed) * 1000:7.1f} ms "
                f"(min {min(timed) * 1000:.1f}, max {max(timed) * 1000:.1f})  load avg before {load:.2f}",
                flush=True,
            )
        peaks.append(matmul_peak(torch.device("cpu"), torch.float32))
        print(
            f"run {r + 1}  fp32 matmul peak {peaks[-1] / 1e9:.1f} GFLOP/s  ratio ours/theirs "
            f"{rates['ours'][-1] / rates['theirs'][-1]:.3f}",
            flush=True,
        )
    peak = statistics.median(peaks)
    ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["theirs"])
    ratios = [a / b for a, b in zip(rates["ours"], rates["theirs"])]
    print(f"samples/s ours            {_summary(rates['ours'])}")
    print(f"samples/s open_clip_train {_summary(rates['theirs'])}")
    print(f"ratio ours/open_clip_train {ours / theirs:.3f} (of medians; per run {_summary(ratios)})")
    print(f"fp32 matmul peak {_summary([x / 1e9 for x in peaks])} GFLOP/s")
    # Ours cuts each text batch after its last EOT token (model.trim_text): count what it ran.
    length = round(statistics.median(tokens))
    ours_flops = train_flops(model, length)
    print(
        f"text tokens per caption: ours {length} (median), open_clip_train {model.context_length}; train "
        f"FLOPs/sample ours {ours_flops:.3e}, open_clip_train {flops:.3e}"
    )
    print(
        f"MFU ours {ours * ours_flops / peak:.1%}  open_clip_train {theirs * flops / peak:.1%}  "
        f"(median samples/s x FLOPs/sample / median peak)"
    )


if __name__ == "__main__":
    main()
