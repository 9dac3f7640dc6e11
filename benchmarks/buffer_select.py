"""Time to choose a replay buffer by sample hash from shard sizes alone (no shard is read).

    python benchmarks/buffer_select.py [--shards 15000] [--per-shard 10000] [--fraction 0.5]

Prints the seconds `YearShards.subset` takes for a year of shards x per-shard samples, and the
spread of the buffer over the shards. TiC-DataComp's ~1.3M shards hold ~12.7B samples over 9 years.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data.shards import YearShards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=15000)
    parser.add_argument("--per-shard", type=int, default=10000)
    parser.add_argument("--fraction", type=float, default=0.5)
    args = parser.parse_args()
    year = YearShards(
        "s3://never-read/", [f"{i:08d}.tar" for i in range(args.shards)], np.full(args.shards, args.per_shard)
    )
    want = int(year.samples * args.fraction)
    t = time.perf_counter()
    buffer = year.subset(want, 0, "2014")
    took = time.perf_counter() - t
    per_shard = buffer.sizes / args.per_shard
    print(
        f"{year.samples:,} samples in {args.shards:,} shards -> buffer of {buffer.samples:,} "
        f"({args.fraction:g}) in {took:.1f} s ({year.samples / took / 1e6:.0f}M samples/s); "
        f"{len(buffer):,} shards kept, per-shard share {per_shard.min():.3f}-{per_shard.max():.3f}"
    )


if __name__ == "__main__":
    main()
