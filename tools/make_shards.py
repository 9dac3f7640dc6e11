"""Prepare yearly webdataset shards: from a manifest, from existing shards, or the synthetic drift benchmark."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Literal, NoReturn

from trainer.errors import UserError
from trainer.prep.options import IMAGE_FORMATS, RESIZE_MODES, PrepError, PrepOptions
from trainer.prep.prepare import prepare, summary_lines


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Report through main's one-line error path instead of argparse's usage + message + SystemExit.
        raise PrepError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option maps onto a PrepOptions field of the same name."""
    parser = _Parser(prog="make_shards", description=__doc__)
    parser.add_argument("--out", required=True, help="output root: local path or fsspec URL")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="generate the synthetic drift benchmark")
    source.add_argument("--manifest", metavar="FILE", help="CSV/TSV/JSONL/Parquet of image, caption, year/timestamp")
    source.add_argument("--shards", metavar="SPEC", help="img2dataset/DataComp shards: folder, {a..b} pattern or glob")
    parser.add_argument("--years", help="synthetic: years to generate (default 2014-2016); else keep only these")
    parser.add_argument("--seed", type=int, default=0, help="shuffle order in shards, synthetic images")
    parser.add_argument("--shard-size", type=int, help="samples per shard at most (10000; synthetic 500)")
    parser.add_argument("--eval-frac", type=float, default=0.01, help="real data: share of each year held out")
    parser.add_argument("--samples-per-year", type=int, default=2000, help="synthetic: training samples per year")
    parser.add_argument("--eval-samples", type=int, default=500, help="synthetic: eval samples per year")
    parser.add_argument("--image-size", type=int, help="resize to this size (synthetic default 32)")
    parser.add_argument("--resize-mode", choices=RESIZE_MODES, default="center_crop")
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="keep", help="keep = input's jpg/png/webp")
    parser.add_argument(
        "--image-root",
        metavar="DIR",
        help="manifest: folder all local image paths must lie in, relative ones resolve against (default: its folder)",
    )
    for column in ("image", "caption", "time", "uid", "class"):
        parser.add_argument(f"--{column}-col", help=f"manifest column for the {column} (auto-detected)")
    years_from = parser.add_mutually_exclusive_group()
    years_from.add_argument("--year-field", help="shards: json field with the year or timestamp (default year)")
    years_from.add_argument("--uid-years", metavar="FILE", help="shards: Parquet table of uid -> year/timestamp")
    years_from.add_argument("--uid-lists", metavar="DIR", help="shards: folder of TiC-style <year>.npy uid lists")
    parser.add_argument("--classes", metavar="FILE", help="class names, one per line, for manifest.json")
    parser.add_argument("--templates", metavar="FILE", help="zero-shot templates with {}, one per line")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--max-bad-frac", type=float, default=0.05, help="fail above this share of unusable inputs")
    parser.add_argument("--overwrite", action="store_true", help="replace output made with other options")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the job, print a summary; user errors exit 2 with one line on stderr."""
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
        source: Literal["synthetic", "manifest", "shards"] = (
            "synthetic" if args.synthetic else "manifest" if args.manifest else "shards"
        )
        fields = {k: v for k, v in vars(args).items() if k not in ("synthetic", "manifest", "shards", "no_progress")}
        options = PrepOptions(
            source=source,
            input=args.manifest or args.shards or "",
            progress=not args.no_progress and sys.stderr.isatty(),
            **fields,
        )
        manifest = prepare(options)
    except UserError as error:
        print(f"make_shards: error: {error}", file=sys.stderr)
        return 2
    state = "already complete" if manifest["already_complete"] else f"done in {time.perf_counter() - started:.1f} s"
    print(f"make_shards: {options.out}: {state}")
    print("\n".join(summary_lines(manifest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
