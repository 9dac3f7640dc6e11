"""Read each stream's draws from tar shards, decode, augment, tokenize and batch them.

Rank r runs max(workers, 1) DataLoader workers; worker w reads stream s = r x max(workers, 1) + w
and yields whole micro-batches of consecutive draws. The DataLoader takes batches from its
workers in turn, so the rank's t-th batch is worker (t % W)'s (t // W)-th batch.

A corrupt draw is counted by reason ("missing": shard unreadable, also after retrying transient
errors, or shorter than its sizes say; "no_image", "no_caption", "bad_image", "bad_caption",
"image_too_large": over MAX_IMAGE_PIXELS, "member_too_large": over MAX_MEMBER_BYTES) and
replaced by the stream's most recent good sample of the same year (before there is one, the next
one; if the year has none left, the latest good sample of any year), so every stream still yields
exactly its share and no rank waits forever in a collective. `bad` in each batch counts these
events and "substituted" since the worker's previous batch; summing over batches gives totals.
More than max_bad_frac corrupt draws in a stream, judged over at least MIN_SAMPLES draws, raise
DataError.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import IO, Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.order import stable_hash
from trainer.data.rehearsal import Ref, RehearsalSampler, streams_per_rank
from trainer.data.shards import RETRIES, DataError, iter_samples, open_shard, retry_delay, transient
from trainer.layout import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

# The bad fraction is judged over at least this many samples, so one early bad sample in a
# stream does not fail a run that allows 1%.
MIN_SAMPLES = 100


class Item(NamedTuple):
    key: str
    image: torch.Tensor
    caption: str
    cls: int
    meta: dict[str, Any]
    views: dict[str, torch.Tensor] = {}
    """Extra image views an objective asked for, by batch key."""


class _OpenShard:
    """One shard read forward once, handing out the members asked for in increasing order.

    A transient error (a 500, SlowDown, a connection dropped mid-body) reopens the shard and reads
    forward again to the member it was at, after a backoff, so no sample is lost or read twice;
    after RETRIES such errors in a row without progress the shard ends there, like a truncated one,
    and its remaining draws count as "missing".
    """

    def __init__(self, url: str, shard: int) -> None:
        self.url, self.shard, self.next = url, shard, 0
        self.file: IO[bytes] | None = None
        self.samples: Iterator[dict[str, Any]] | None = None
        self.failures = 0  # transient errors since the last sample read
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 - retried if transient, else the shard is missing
            self._retry(e)

    def _start(self) -> None:
        """Open the shard and read forward, undecoded, past the `self.next` members already handed out."""
        # open_shard does no retries of its own here: one budget for opens and reads together.
        self.file = open_shard(self.url, retries=0)
        samples = iter_samples(self.url, self.file)
        for _ in range(self.next):
            next(samples)  # StopIteration: the shard is shorter than before; not transient
        self.samples = samples

    def _retry(self, error: BaseException) -> bool:
        """After `error`: reopen and catch up (with backoff) while it is transient; False once given up."""
        while self.failures < RETRIES and transient(_cause(error)):
            self.failures += 1
            self.close()
            delay = retry_delay(self.failures)
            log.warning(
                "%s: %s after %d samples; reopening in %.1f s (retry %d of %d)",
                self.url, error, self.next, delay, self.failures, RETRIES,
            )  # fmt: skip
            time.sleep(delay)
            try:
                self._start()
                return True
            except Exception as e:  # noqa: BLE001 - judged by `transient` on the next turn
                error = e
        self._give_up(error)
        return False

    def _give_up(self, error: BaseException) -> None:
        log.warning("%s: unreadable after %d samples (%s)", self.url, self.next, error)
        self.close()

    def get(self, member: int) -> dict[str, Any] | None:
        """Member `member` (skipping the ones before it undecoded), or None if it cannot be read."""
        while self.samples is not None and self.next <= member:
            try:
                sample = next(self.samples)
            except StopIteration:
                log.warning("%s: ends after %d samples, more are listed", self.url, self.next)
                self.close()
                return None
            except Exception as e:  # noqa: BLE001 - any tar damage ends this shard, not the run
                if self._retry(e):
                    continue
                return None
            self.next += 1
            self.failures = 0
            if self.next > member:
                return sample
        return None

    def close(self) -> None:
        self.samples = None
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - a file whose connection has failed may fail to close too
                pass
            self.file = None


def _cause(error: BaseException) -> BaseException:
    """The error behind open_shard's DataError (which says which shard), else `error` itself."""
    return error.__cause__ if isinstance(error, DataError) and error.__cause__ is not None else error


class _Reader:
    """The open shards of one stream: per (year, pass, lane) the shards of its current block, since
    a block's draws interleave its shards and each is read forward (order.py)."""

    def __init__(self, sampler: RehearsalSampler) -> None:
        self.sampler = sampler
        self.open: dict[tuple[str, int, int], dict[int, _OpenShard]] = {}

    def get(self, ref: Ref) -> tuple[dict[str, Any] | None, str]:
        key = (ref.year, ref.pass_index, ref.lane)
        member = self.sampler.member(ref)
        if key not in self.open:
            for old in [k for k in self.open if k[0] == ref.year and k[1] < ref.pass_index]:
                for finished in self.open.pop(old).values():
                    finished.close()
            self.open[key] = {}
        lane = self.open[key]
        cur = lane.get(ref.shard)
        if cur is None or cur.next > member:
            if cur is not None:
                lane.pop(ref.shard).close()
            # Blocks follow one another: a lane's oldest shard beyond a block's worth is finished.
            while len(lane) >= self.sampler.shuffle_shards:
                lane.pop(next(iter(lane))).close()
            cur = lane[ref.shard] = _OpenShard(self.sampler.url(ref), ref.shard)
        return cur.get(member), cur.url

    def close(self) -> None:
        for lane in self.open.values():
            for cur in lane.values():
                cur.close()
        self.open.clear()


Transform = Callable[[Image.Image], torch.Tensor]


def _augment(transform: Transform, image: Image.Image, aug_seed: int) -> torch.Tensor:
    """`transform(image)` with its randomness drawn from `aug_seed` alone, the caller's RNGs untouched."""
    # Only the CPU generator is seeded: torch.manual_seed would also queue a CUDA reseed, with a
    # formatted stack trace, on every sample.
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(aug_seed)
            random.seed(aug_seed)  # timm-style transforms draw from Python's RNG
            return transform(image)
    finally:
        random.setstate(state)


def decode(
    sample: dict[str, Any], preprocess: Transform, seed: int, views: Mapping[str, Transform] | None = None
) -> Item | str:
    """The preprocessed sample (and its extra `views`), or the reason it is unusable."""
    if any(value is None for value in sample.values()):
        return "member_too_large"  # iter_samples left a member over MAX_MEMBER_BYTES unread
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        return "no_image"
    if "txt" not in sample:
        return "no_caption"
    key = sample["__key__"]
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption"
    try:
        with Image.open(io.BytesIO(sample[ext])) as opened:
            # From the header alone: a decompression bomb is never decoded.
            if opened.width * opened.height > MAX_IMAGE_PIXELS:
                return "image_too_large"
            image = opened.convert("RGB")
    except Image.DecompressionBombError:  # PIL's own check in open(), at twice MAX_IMAGE_PIXELS
        return "image_too_large"
    except Exception:  # noqa: BLE001 - PIL raises many types for damaged files
        return "bad_image"
    # Augmentation randomness depends on (seed, key[, view]) only: not on the worker, nor the
    # caller's RNG, so a resumed run augments every sample as the uninterrupted run did.
    tensor = _augment(preprocess, image, stable_hash(seed, key))
    extra = {name: _augment(t, image, stable_hash(seed, key, name)) for name, t in (views or {}).items()}
    try:
        cls = int(sample["cls"]) if "cls" in sample else -1
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        cls, meta = -1, {}
    return Item(key, tensor, caption, cls, meta, extra)


class StreamDataset(IterableDataset):
    """One rank's batches of a plan step; each DataLoader worker reads its own stream."""

    def __init__(
        self,
        sampler: RehearsalSampler,
        *,
        rank: int,
        world: int,
        workers: int,
        micro_batch: int,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        seed: int,
        max_bad_frac: float = 0.01,
        views: Mapping[str, Transform] | None = None,
    ) -> None:
        self.sampler, self.rank, self.world, self.workers = sampler, rank, world, workers
        self.micro_batch, self.preprocess, self.tokenizer = micro_batch, preprocess, tokenizer
        self.seed, self.max_bad_frac = seed, max_bad_frac
        self.views = dict(views or {})
        self.check_sampler()

    def check_sampler(self) -> None:
        """The sampler must be split for this world and workers, in whole micro-batches per stream."""
        per_rank = streams_per_rank(self.workers)
        if self.sampler.streams != self.world * per_rank:
            raise ValueError(
                f"sampler has {self.sampler.streams} streams, world {self.world} x workers {per_rank} need "
                f"{self.world * per_rank}; build or load_state_dict it for this world and workers"
            )
        if self.sampler.samples_per_stream % self.micro_batch:
            raise ValueError(
                f"{self.sampler.samples_per_stream} samples per stream are not whole micro-batches of "
                f"{self.micro_batch}"
            )

    def __len__(self) -> int:
        return streams_per_rank(self.workers) * self.sampler.samples_per_stream // self.micro_batch

    def state_dict(self, batches: int) -> dict[str, Any]:
        """Sampler state after `batches` micro-batches per rank of the step (optimizer steps x accumulation)."""
        consumed = batches * self.micro_batch * self.world
        since = (consumed - self.sampler.consumed) // (self.micro_batch * self.world)
        if since % streams_per_rank(self.workers):
            raise ValueError(
                f"{batches} batches: workers have not all delivered the same count "
                f"({since} since the loader started, {streams_per_rank(self.workers)} workers)"
            )
        return self.sampler.state_dict(consumed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"dataset made for {self.workers} workers runs in {info.num_workers}")
        stream = self.rank * streams_per_rank(self.workers) + (info.id if info is not None else 0)
        reader = _Reader(self.sampler)
        try:
            yield from self._batches(stream, reader)
        finally:
            reader.close()

    def _items(self, stream: int, reader: _Reader, bad: Counter) -> Iterator[tuple[str, Item | None]]:
        seen = failed = 0
        for ref in self.sampler.stream(stream):
            raw, url = reader.get(ref)
            got = decode(raw, self.preprocess, self.seed, self.views) if raw is not None else "missing"
            seen += 1
            if isinstance(got, str):
                bad[got] += 1
                failed += 1
                if failed > self.max_bad_frac * max(seen, MIN_SAMPLES):
                    raise DataError(
                        f"{url}: {failed} of {seen} samples of stream {stream} are corrupt "
                        f"(last: {got}, member {ref.member}), more than data.max_bad_frac={self.max_bad_frac}"
                    )
                yield ref.year, None
            else:
                yield ref.year, got

    def _batches(self, stream: int, reader: _Reader) -> Iterator[dict[str, Any]]:
        bad: Counter = Counter()
        slots: deque[list[Any]] = deque()  # [year, Item or None while waiting for a substitute]
        last: dict[str, Item] = {}
        latest: Item | None = None
        waiting: dict[str, list[list[Any]]] = {}
        for year, item in self._items(stream, reader, bad):
            slot = [year, item]
            if item is not None:
                last[year] = latest = item
                for w in waiting.pop(year, []):
                    w[1] = item
                    bad["substituted"] += 1
            elif year in last:
                slot[1] = last[year]
                bad["substituted"] += 1
            else:
                waiting.setdefault(year, []).append(slot)
            slots.append(slot)
            while len(slots) >= self.micro_batch and all(s[1] is not None for s in islice(slots, self.micro_batch)):
                yield self._collate([slots.popleft() for _ in range(self.micro_batch)], bad)
        if waiting:
            # A year with no good sample left in this stream borrows the latest good one of any year.
            if latest is None:
                raise DataError(f"stream {stream}: no readable sample at all (bad: {dict(bad)})")
            for w in (w for ws in waiting.values() for w in ws):
                w[1] = latest
                bad["substituted"] += 1
        while slots:
            yield self._collate([slots.popleft() for _ in range(self.micro_batch)], bad)

    def _collate(self, slots: list[list[Any]], bad: Counter) -> dict[str, Any]:
        items: list[Item] = [s[1] for s in slots]
        years = [s[0] for s in slots]
        batch = {
            "image": torch.stack([it.image for it in items]),
            "text": self.tokenizer([it.caption for it in items]),
            "key": [it.key for it in items],
            "year": years,
            "cls": torch.tensor([it.cls for it in items], dtype=torch.long),
            "meta": [it.meta for it in items],
            "year_counts": dict(Counter(years)),
            "bad": dict(bad),
            **{name: torch.stack([it.views[name] for it in items]) for name in self.views},
        }
        bad.clear()
        return batch


def _leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader worker start: ignore SIGTERM and SIGINT.

    SLURM's --signal=TERM and a terminal's Ctrl-C reach every process of the group; a worker that
    died of them would take the rank down before it saves. The rank's own handler decides when to stop.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(dataset: StreamDataset, prefetch_factor: int = 2) -> DataLoader:
    """The rank's DataLoader: whole batches from the dataset's workers, pinned when CUDA is used."""
    # DataLoader refuses a prefetch factor without workers.
    prefetch = prefetch_factor if dataset.workers > 0 else None
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=dataset.workers,
        # Each plan step builds its own loader and iterates it once: persistent workers would only
        # keep idle processes, with their open shards, alive into the next step.
        persistent_workers=False,
        # init_distributed trains on CUDA whenever it is available (and has set this rank's device
        # by now); pinned batches let the loop's non_blocking copies overlap with compute.
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch,
        worker_init_fn=_leave_stop_signals_to_the_rank,
    )
