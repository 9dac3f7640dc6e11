"""Evaluate every yearly checkpoint on every year's eval split: `python tools/evaluate.py --run runs/<name>`.

Writes <run>/eval/matrix.json, matrix.csv and heatmap_<metric>.png and prints the in-domain /
backward / forward summary. Runs under torchrun / deepspeed too (rank 0 writes and prints).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.config import ConfigError
from trainer.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", type=Path, help="run folder (runs/<name>): its yearly checkpoints, model and data")
    p.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="compare runs: evaluate each (unless its eval/matrix.json is current) and plot them together",
    )
    p.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="[YEAR=]PT",
        help="open_clip .pt files instead of a run's checkpoints (YEAR= names the last training year)",
    )
    p.add_argument("--model", default="", help="open_clip model name or JSON config (default: the run's)")
    p.add_argument("--quick-gelu", action="store_true", help="with --model: QuickGELU (OpenAI / TiC-CLIP weights)")
    p.add_argument("--data", default="", help="dataset root with eval/<year>/ shards (default: the run's data.root)")
    p.add_argument("--years", nargs="+", help="eval years (default: all under <data>/eval/)")
    p.add_argument("--samples", type=int, default=0, help="eval samples per year, first of each year (0 = all)")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch per rank")
    p.add_argument("--tasks", nargs="+", default=["retrieval", "zeroshot"], choices=["retrieval", "zeroshot"])
    p.add_argument("--classes", default="", help="JSON file with 'classes' and 'templates' (default: the manifest's)")
    p.add_argument(
        "--all-classes",
        action="store_true",
        help="zero-shot over all classes even where the manifest lists classes_by_year",
    )
    p.add_argument("--cache-mb", type=int, default=2048, help="per-rank memory for decoded eval images")
    p.add_argument(
        "--heatmaps",
        nargs="+",
        metavar="METRIC",
        help="metrics to draw, or 'all' (default: mean_R1, strict_mean_R1, i2t_R1, t2i_R1, mean_R5, zs_*)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: <run>/eval; with --compare: <runs>/compare)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for user errors, with one line on stderr)."""
    args = parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"evaluate: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not args.run and not args.compare and not args.checkpoints:
        raise ConfigError("give --run RUN, --checkpoints FILE ..., or --compare RUN RUN ...")
    if args.compare and (args.run or args.checkpoints):
        raise ConfigError("--compare takes run folders only; drop --run / --checkpoints")
    import torch.distributed as tdist

    from trainer.distributed import init_distributed, shutdown
    from trainer.eval.evaluator import EvalOptions
    from trainer.eval.metrics import HEADLINE, METRICS
    from trainer.eval.plots import compare_table, save_compare
    from trainer.eval.report import console_table
    from trainer.eval.runs import EvalRequest, evaluate_request
    from trainer.logging import setup_console

    options = EvalOptions(
        tasks=tuple(args.tasks),
        samples=args.samples,
        batch_size=args.batch_size,
        cache_mb=args.cache_mb,
        classes_file=args.classes,
        per_year_classes=not args.all_classes,
    )
    options.validate()
    heatmaps = list(METRICS) if args.heatmaps == ["all"] else args.heatmaps
    unknown = [m for m in heatmaps or [] if m not in METRICS]
    if unknown:
        raise ConfigError(f"--heatmaps: unknown metric {', '.join(unknown)} (valid: all, {', '.join(METRICS)})")

    def request(run: Path | None, out: Path | None) -> EvalRequest:
        return EvalRequest(
            run=run,
            checkpoints=args.checkpoints or [],
            model=args.model,
            quick_gelu=args.quick_gelu,
            data=args.data,
            years=args.years,
            options=options,
            out=out,
            heatmaps=heatmaps,
        )

    owns_group = not tdist.is_initialized()  # a caller's process group (tests, notebooks) stays up
    dist = init_distributed("auto")
    setup_console(dist.rank)
    try:
        if args.compare:
            matrices = {run.name: evaluate_request(request(run, None), dist, reuse=True) for run in args.compare}
            if dist.is_main:
                out = args.out or args.compare[0].parent / "compare"
                metrics = [m for m in (HEADLINE, "zs_top1") if any(m in x.metrics() for x in matrices.values())]
                save_compare(matrices, out, metrics)
                for name, matrix in matrices.items():
                    print(f"== {name}\n{console_table(matrix, HEADLINE)}\n")
                print("\n\n".join(compare_table(matrices, m) for m in metrics))
                print(f"\nplots: {out}/compare_*.png")
        else:
            matrix = evaluate_request(request(args.run, args.out), dist)
            if dist.is_main:
                shown = [m for m in (HEADLINE, "strict_mean_R1", "zs_top1") if m in matrix.metrics()]
                print("\n\n".join(console_table(matrix, m) for m in shown))
    finally:
        if owns_group:
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
