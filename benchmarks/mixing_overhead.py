"""Cost of rehearsal mixing: RehearsalSampler over 4 years vs a plain one-year webdataset stream.

    python benchmarks/mixing_overhead.py --runs 5 --workers 2 --samples 4096

A = webdataset's own pipeline (shard list, split by worker, tar -> samples, batched) over one
year's shards; B = our StreamDataset over a RehearsalSampler drawing the same number of samples
from 4 years at cumulative-all weights (a quarter each here). Both run the same decode (our
`decode`: PIL, seeded open_clip train transform) and tokenizer, the same micro-batch and the
same DataLoader workers, and no model: the figure is samples/s of iterating the loader end to
end after a warmup, so the difference is the sampler, its shard reader and its batch bookkeeping.
Runs are interleaved in pairs, A B, B A, A B, ... (so a steady rise or fall in the machine's
load favours neither); the overhead is B's time per sample over A's, minus one. CPU
us/sample (user + system of the main process and its workers over the whole run) is printed
too: on a machine busy with other work it moves much less than wall time does.
Shards (JPEG, --image-size px) are written to a temporary folder unless --data names one.

    python benchmarks/mixing_overhead.py --shuffle 8 --runs 5 --workers 2 --samples 4096

compares the shuffle instead: A = the rehearsal sampler reading each lane's shards one after
another (data.shuffle_shards=1, the order before the shuffle), B = the same with blocks of 8
shards interleaved at random (the default); same years, weights, workers and decode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

# Set before numpy and torch are imported, which read them once (hence E402 for this file in pyproject).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from trainer.config import ModelConfig
from trainer.data.pipeline import Item, StreamDataset, build_loader, decode
from trainer.data.rehearsal import RehearsalSampler, stream_count
from trainer.data.shards import find_years
from trainer.model import create_model
from trainer.plan import apportion

YEARS = ["2014", "2015", "2016", "2017"]
PLAIN_YEAR = YEARS[-1]


def write_shards(root: Path, samples: int, per_shard: int, image_size: int) -> None:
    """<root>/train/<year>/NNNNNN.tar + sizes.json for each year; smooth JPEGs with a caption."""
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    for year in YEARS:
        folder = root / "train" / year
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(int(year))
        sizes = {}
        for first in range(0, samples, per_shard):
            name, count = f"{first // per_shard:06d}.tar", min(per_shard, samples - first)
            with tarfile.open(folder / name, "w") as tar:
                for i in range(first, first + count):
                    key = f"{year}{i:07d}"
                    a, b, c = rng.uniform(0.02, 0.3, 3)
                    img = np.stack([np.sin(a * xx + c) * 127 + 128, np.cos(b * yy) * 127 + 128, (xx + yy) % 256], -1)
                    img = (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=90)
                    files = {
                        "jpg": buf.getvalue(),
                        "txt": f"a photo of thing {i % 97} in {year}".encode(),
                        "json": json.dumps({"uid": key, "year": int(year)}).encode(),
                        "cls": str(i % 8).encode(),
                    }
                    for ext, data in files.items():
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime = len(data), 0
                        tar.addfile(info, io.BytesIO(data))
            sizes[name] = count
        (folder / "sizes.json").write_text(json.dumps(sizes))


def collate(items: list[Item], tokenizer) -> dict:
    """The same batch fields StreamDataset makes, without its year and bad-sample bookkeeping."""
    return {
        "image": torch.stack([it.image for it in items]),
        "text": tokenizer([it.caption for it in items]),
        "key": [it.key for it in items],
        "cls": torch.tensor([it.cls for it in items], dtype=torch.long),
        "meta": [it.meta for it in items],
    }


def plain_loader(root: str, args, preprocess, tokenizer) -> DataLoader:
    """A: one year's shards through webdataset, split over workers, same decode and batches."""
    folder = f"{root}/train/{PLAIN_YEAR}"
    urls = [f"{folder}/{name}" for name in sorted(os.listdir(folder)) if name.endswith(".tar")]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.map(partial(decode, preprocess=preprocess, seed=args.seed)),
        wds.batched(args.micro_batch, collation_fn=partial(collate, tokenizer=tokenizer), partial=False),
    )
    prefetch = args.prefetch_factor if args.workers > 0 else None
    return DataLoader(pipeline, batch_size=None, num_workers=args.workers, prefetch_factor=prefetch)


def mixed_loader(root: str, args, preprocess, tokenizer, shuffle: int = 1) -> DataLoader:
    """B: the rehearsal sampler over all 4 years at cumulative-all weights, as loading.step_data builds it."""
    years = find_years(root, years=YEARS)
    streams = stream_count(1, args.workers)
    quotas = apportion(args.samples, {y: years[y].samples for y in YEARS}, multiple=streams)
    sampler = RehearsalSampler(
        years, quotas, seed=args.seed, world=1, workers=args.workers, micro=args.micro_batch, shuffle_shards=shuffle
    )
    dataset = StreamDataset(
        sampler,
        rank=0,
        world=1,
        workers=args.workers,
        micro_batch=args.micro_batch,
        preprocess=preprocess,
        tokenizer=tokenizer,
        seed=args.seed,
    )
    return build_loader(dataset, args.prefetch_factor)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the finished workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(loader: DataLoader, warmup: int) -> tuple[float, float, int]:
    """Samples/s after the first `warmup` batches, CPU us per sample of the whole run, samples seen."""
    seen = timed = 0
    cpu = cpu_seconds()
    for i, batch in enumerate(loader):  # the loader joins its workers when it is exhausted
        if i == warmup:
            start = time.perf_counter()
        n = len(batch["key"])
        seen += n
        timed += n if i >= warmup else 0
    wall = time.perf_counter() - start
    return timed / wall, (cpu_seconds() - cpu) / seen * 1e6, seen


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    return f"median {fmt.format(statistics.median(xs))}  min-max {fmt.format(min(xs))}-{fmt.format(max(xs))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="A/B pairs, interleaved")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both loaders)")
    p.add_argument("--samples", type=int, default=4096, help="samples per run (= one year's samples)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--image-size", type=int, default=64, help="stored JPEG side in px")
    p.add_argument("--model", default="configs/models/tiny-vit-32.json", help="open_clip config for transforms")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches at the start of each run")
    p.add_argument("--prefetch-factor", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="reuse (or write once) shards here instead of a temporary folder")
    p.add_argument("--shuffle", type=int, default=0, help="A = shuffle_shards 1, B = this many (0: A = webdataset)")
    args = p.parse_args()
    streams = stream_count(1, args.workers)
    if args.samples % (streams * args.micro_batch) or (args.samples // args.shard_size) % streams:
        p.error("--samples must be whole micro-batches per worker and whole shards split evenly over workers")
    if args.warmup >= args.samples // args.micro_batch:
        p.error("--warmup must leave batches to time")
    _, preprocess, _, tokenizer = create_model(ModelConfig(name=args.model, attention="sdpa"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or tmp)
        if not (root / "train" / PLAIN_YEAR / "sizes.json").exists():
            write_shards(root, args.samples, args.shard_size, args.image_size)
        if find_years(str(root), years=[PLAIN_YEAR])[PLAIN_YEAR].samples != args.samples:
            p.error(f"{root}: holds shards of another --samples; A must read exactly one year of {args.samples}")
        print(
            f"{args.samples} samples/run, micro-batch {args.micro_batch}, workers {args.workers}, shards of "
            f"{args.shard_size}, {args.image_size}px JPEG -> {args.model} train transform; "
            f"A = {'shuffle_shards 1' if args.shuffle else 'webdataset over ' + PLAIN_YEAR}, B = rehearsal over "
            f"{'+'.join(YEARS)}{f' with shuffle_shards {args.shuffle}' if args.shuffle else ''}; "
            f"cpus {os.cpu_count()}, "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        rates: dict[str, list[float]] = {"A": [], "B": []}
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        for run in range(args.runs):
            pair = [("A", plain_loader), ("B", mixed_loader)]
            if args.shuffle:
                pair = [("A", mixed_loader), ("B", partial(mixed_loader, shuffle=args.shuffle))]
            for name, make in pair if run % 2 == 0 else pair[::-1]:  # A B, B A, ...: cancels drift in load
                rate, us, seen = measure(make(str(root), args, preprocess, tokenizer), args.warmup)
                rates[name].append(rate)
                cpu[name].append(us)
                print(
                    f"run {run + 1} {name}: {rate:8.1f} samples/s  {us:7.1f} CPU us/sample  ({seen} samples)",
                    flush=True,
                )
        # The sampler's own share: all streams' draws with no reading, in this process.
        dataset = mixed_loader(str(root), args, preprocess, tokenizer, shuffle=args.shuffle or 1).dataset
        assert isinstance(dataset, StreamDataset)
        sampler = dataset.sampler
        alone = float("inf")
        for _rep in range(3):  # best of 3: the first pays for building each year's pass order
            t = time.process_time()
            draws = sum(1 for s in range(sampler.streams) for _ref in sampler.stream(s))
            alone = min(alone, (time.process_time() - t) / draws * 1e6)
    for name, what in (("A", "plain "), ("B", "mixing")):
        print(f"{name} {what}  samples/s {spread(rates[name])}   CPU us/sample {spread(cpu[name])}")
    # Overhead = B's time (or CPU) per sample over A's, minus one: per pair, then of the medians.
    wall = [a / b - 1 for a, b in zip(rates["A"], rates["B"])]
    work = [b / a - 1 for a, b in zip(cpu["A"], cpu["B"])]
    med = statistics.median
    print(
        f"overhead of B, wall: median of pairs {med(wall):+.1%} (pairs {min(wall):+.1%} to {max(wall):+.1%}), "
        f"ratio of medians {med(rates['A']) / med(rates['B']) - 1:+.1%}"
    )
    print(
        f"overhead of B, CPU:  median of pairs {med(work):+.1%} (pairs {min(work):+.1%} to {max(work):+.1%}), "
        f"ratio of medians {med(cpu['B']) / med(cpu['A']) - 1:+.1%}"
    )
    print(
        f"sampler alone (schedule + locate, no reading): {alone:.1f} CPU us/draw = "
        f"{alone / statistics.median(cpu['A']):.2%} of A's CPU per sample"
    )
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
