"""Each year's eval split in canonical order, split into per-rank blocks; the zero-shot class spec.

Canonical order: a year's shards sorted by name, members in file order, the first `samples` of
them (all when 0). Rank r encodes positions [r x per, (r + 1) x per) where per is a whole number of
batches, so a rank's batches are the same positions whatever the world size (identical
embeddings, bit for bit), and gathering every rank's padded block in rank order gives exactly
the canonical order followed by padding.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as tdist
from PIL import Image

from trainer.data.pipeline import Item, decode
from trainer.data.shards import DataError, YearShards, find_years, iter_samples, open_shard
from trainer.layout import EVAL, MANIFEST, TRAIN

log = logging.getLogger("tic")

Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Block:
    """One rank's positions [start, stop) of n, padded to `per` rows."""

    start: int
    stop: int
    per: int


def rank_block(n: int, world: int, rank: int, batch: int) -> Block:
    """Rank `rank`'s block of n positions: whole batches, equal padded length on every rank."""
    per = math.ceil(n / (world * batch)) * batch
    start = min(rank * per, n)
    return Block(start, min(start + per, n), per)


def _world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Every rank's equal-length block concatenated in rank order, cut to the first n rows."""
    size = _world_size()
    if size == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(size)]
    tdist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    size = _world_size()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    tdist.all_gather_object(out, obj)
    return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of `t` over ranks (exact for counts)."""
    if _world_size() > 1:
        t = t.clone()
        tdist.all_reduce(t)
    return t


def eval_years(root: str, years: list[str] | None) -> dict[str, YearShards]:
    """Each year's eval shards under <root>/eval/<year>/ (or {"all": ...} for a plain folder of shards)."""
    if "{" not in root:
        fs, path = fsspec.core.url_to_fs(root)
        marks = [posixpath.join(path, name) for name in (TRAIN, MANIFEST)]
        if fs.isdir(path) and any(fs.exists(m) for m in marks) and not fs.isdir(posixpath.join(path, EVAL)):
            raise DataError(f"{root}: no eval/<year>/ folders (tools/make_shards.py writes them; see --eval-frac)")
    return find_years(root, EVAL, years)


def read_block(shards: YearShards, start: int, stop: int, preprocess: Preprocess) -> Iterator[Item | str]:
    """Positions [start, stop) of a year's canonical order: each an Item or the reason it is unusable."""
    offset = 0
    for index in range(len(shards)):
        size = int(shards.sizes[index])
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            yield from _read_members(shards.url(index), lo - offset, hi - offset, preprocess)
        offset += size
        if offset >= stop:
            return


def _read_members(url: str, first: int, last: int, preprocess: Preprocess) -> Iterator[Item | str]:
    done = first
    try:
        f = open_shard(url)
    except DataError as e:
        log.warning("%s", e)
        f = None
    if f is not None:
        with f:
            samples = enumerate(iter_samples(url, f))
            while done < last:
                try:
                    member, sample = next(samples)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - any tar damage ends this shard, not the evaluation
                    log.warning("%s: unreadable after %d samples (%s)", url, done, e)
                    break
                if member >= first:
                    done += 1
                    yield decode(sample, preprocess=preprocess, seed=0)
    if done < last:
        log.warning("%s: %d listed samples missing", url, last - done)
        yield from ["missing"] * (last - done)


@dataclass(frozen=True)
class ClassSpec:
    """Zero-shot classes: names in label order, prompt templates, optional per-year class subsets."""

    classes: list[str]
    templates: list[str]
    by_year: dict[str, list[int]] = field(default_factory=dict)

    def prompts(self) -> list[str]:
        """Every class x template prompt, class-major."""
        return [t.replace("{}", c) for c in self.classes for t in self.templates]


def load_classes(root: str, path: str = "") -> ClassSpec | None:
    """Classes and templates from a user JSON file, else <root>/manifest.json; None when neither has them."""
    if path:
        p = Path(path)
        try:
            spec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not a readable JSON file ({e})") from None
        source = str(p)
        if not isinstance(spec, dict):
            raise DataError(f"{p}: want a JSON object with 'classes' and 'templates'")
    else:
        if "{" in root:
            return None
        fs, base = fsspec.core.url_to_fs(root)
        manifest = posixpath.join(base, MANIFEST)
        if not fs.isfile(manifest):
            return None
        try:
            spec = json.loads(fs.cat_file(manifest))
        except (OSError, ValueError) as e:
            raise DataError(f"{root}/{MANIFEST}: not readable JSON ({e})") from None
        source = f"{root}/{MANIFEST}"
        if not isinstance(spec, dict) or not spec.get("classes"):
            return None
    classes, templates = spec.get("classes"), spec.get("templates") or ["a photo of a {}."]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{source}: 'classes' must be a non-empty list of class names in label order")
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise DataError(f"{source}: 'templates' must be a list of strings with a {{}} placeholder")
    by_year = spec.get("classes_by_year") or {}
    for year, ids in by_year.items():
        if not all(isinstance(i, int) and 0 <= i < len(classes) for i in ids):
            raise DataError(f"{source}: classes_by_year[{year!r}] must list class indices below {len(classes)}")
    return ClassSpec(list(classes), list(templates), {str(y): list(v) for y, v in by_year.items()})
