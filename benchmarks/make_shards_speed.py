"""make_shards throughput on local JPEGs with 1 and 2 workers, against a plain webdataset.ShardWriter copy.

    python benchmarks/make_shards_speed.py [--samples 20000] [--data /tmp/make_shards_bench] [--repeats 2]

Both make_shards runs do the same work (read, fully decode, stage, pack shuffled shards, sizes.json,
manifest.json); the reference loop only copies bytes into shards, no decoding. Best of --repeats.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.prep.options import PrepOptions
from trainer.prep.prepare import prepare

IMAGE_SIZE = 256
YEARS = (2014, 2015, 2016, 2017)


def make_inputs(folder: Path, samples: int) -> Path:
    """JPEGs with smooth structure plus noise (so they compress like photos) and a CSV manifest; reused if present."""
    manifest = folder / f"manifest-{samples}.csv"
    if manifest.exists():
        return manifest
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(samples):
        coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
        name = f"images/{i:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name, quality=90)
        rows.append((name, f"benchmark picture {i}", f"{YEARS[i % len(YEARS)]}-0{1 + i % 9}-15"))
    with open(manifest.with_suffix(".tmp"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("image", "caption", "timestamp"))
        writer.writerows(rows)
    manifest.with_suffix(".tmp").rename(manifest)
    return manifest


def time_make_shards(manifest: Path, out: Path, workers: int) -> float:
    """Seconds for one full make_shards run into an empty output folder."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = prepare(PrepOptions(source="manifest", input=str(manifest), out=str(out), workers=workers))
    elapsed = time.perf_counter() - started
    assert not result["already_complete"] and result["seen"] > 0
    return elapsed


def time_shardwriter_copy(manifest: Path, out: Path) -> float:
    """Seconds for the plain loop: read each file and caption, webdataset.ShardWriter, no decoding."""
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    with open(manifest, newline="") as file, wds.ShardWriter(str(out / "%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for i, row in enumerate(csv.DictReader(file)):
            image = (manifest.parent / row["image"]).read_bytes()
            sink.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": image,
                    "txt": row["caption"],
                    "json": {"uid": f"{i:09d}", "year": int(row["timestamp"][:4])},
                }
            )
    return time.perf_counter() - started


def main() -> None:
    """Build the inputs once, then time each contender and print samples/s."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--data", type=Path, default=Path("/tmp/make_shards_bench"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    manifest = make_inputs(args.data, args.samples)
    size = sum(p.stat().st_size for p in (args.data / "images").glob("*.jpg")) / args.samples / 1024
    print(f"{args.samples} local {IMAGE_SIZE}x{IMAGE_SIZE} JPEGs, {size:.1f} KiB each on average")
    results = {
        "make_shards, 1 worker": min(time_make_shards(manifest, args.data / "out1", 1) for _ in range(args.repeats)),
        "make_shards, 2 workers": min(time_make_shards(manifest, args.data / "out2", 2) for _ in range(args.repeats)),
        "webdataset.ShardWriter copy (no decode)": min(
            time_shardwriter_copy(manifest, args.data / "outw") for _ in range(args.repeats)
        ),
    }
    for name, seconds in results.items():
        print(f"{name:42s} {seconds:7.2f} s {args.samples / seconds:9.0f} samples/s")
    speedup = results["make_shards, 1 worker"] / results["make_shards, 2 workers"]
    print(f"2 workers vs 1: {speedup:.2f}x (bar: >= 1.5x) -> {'met' if speedup >= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
