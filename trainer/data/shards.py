"""Find webdataset shards and their sample counts per year, on a local path or any fsspec URL."""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, overload

import fsspec
import numpy as np
from braceexpand import braceexpand

from trainer.errors import UserError
from trainer.layout import SIZES, TRAIN

log = logging.getLogger(__name__)

_STATS = re.compile(r"^(.*)_stats\.json$")


class DataError(UserError, ValueError):
    """Data the user pointed us at is missing or broken; the message names the file, URL or key."""


@dataclass(frozen=True)
class Shard:
    url: str
    size: int


class YearShards(Sequence[Shard]):
    """One year's shards, sorted by name: a URL prefix, the file names and a numpy array of sizes."""

    # Parallel arrays instead of Shard objects: TiC-DataComp has ~1.3M shards, and a million
    # frozen dataclasses cost seconds and hundreds of MB on every rank.
    def __init__(self, prefix: str, names: list[str], sizes: np.ndarray) -> None:
        self.prefix = prefix
        self.names = names
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def url(self, index: int) -> str:
        """The URL of shard `index`."""
        return self.prefix + self.names[index]

    @property
    def samples(self) -> int:
        """Samples over all shards."""
        return int(self.sizes.sum())

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Shard: ...
    @overload
    def __getitem__(self, index: slice) -> list[Shard]: ...
    def __getitem__(self, index: int | slice) -> Shard | list[Shard]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return Shard(self.url(index), int(self.sizes[index]))

    def __repr__(self) -> str:
        return f"YearShards({self.prefix!r}, {len(self)} shards, {self.samples} samples)"

    def subset(self, samples: int, seed: int, year: str) -> YearShards:
        """A fixed replay buffer of exactly `samples`: whole shards in a seeded order, the last cut short.

        The shard order depends on (seed, year) only, so a smaller buffer of a later step is a
        subset of an earlier one, as TiC-CLIP's shrinking buffers are. A shard cut short keeps its
        first members: the reader addresses members below the size it is given.
        """
        if not 0 < samples <= self.samples:
            raise ValueError(f"year {year}: a buffer of {samples} from {self.samples} samples")
        order = np.random.default_rng([seed, int.from_bytes(year.encode(), "little") % 2**32]).permutation(len(self))
        sizes = self.sizes[order]
        keep = int(np.searchsorted(np.cumsum(sizes), samples)) + 1
        chosen = sorted(order[:keep].tolist())
        cut = {int(order[keep - 1]): int(samples - sizes[: keep - 1].sum())}
        return YearShards(
            self.prefix,
            [self.names[i] for i in chosen],
            np.array([cut.get(i, int(self.sizes[i])) for i in chosen], dtype=np.int64),
        )


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for `url`; a protocol whose backend is not installed is a DataError."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
        raise DataError(f"{url}: this URL needs an fsspec backend that is not installed ({e})") from None
    except ValueError as e:
        raise DataError(f"{url}: not a URL fsspec can open ({e})") from None


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for reading through fsspec (webdataset's gopen knows no fsspec URLs)."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb")
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: cannot open shard ({e})") from None


def iter_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The samples of an open tar shard in file order, grouped by key by webdataset."""
    # Imported here because webdataset imports torch, which `DataError` users need not load.
    from webdataset.tariterators import group_by_keys, tar_file_expander

    return group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def count_samples(url: str) -> int:
    """Samples in one shard, by reading it through (used only when no sizes metadata exists)."""
    n = 0
    with open_shard(url) as f:
        try:
            for _ in iter_samples(url, f):
                n += 1
        except Exception as e:  # noqa: BLE001 - a truncated tar still has its readable samples
            log.warning("%s: unreadable after %d samples (%s)", url, n, e)
    return n


def find_years(root: str, split: str = TRAIN, years: list[str] | None = None) -> dict[str, YearShards]:
    """Shards per year under <root>/<split>/<year>/ (or TiC-CLIP's <root>/<year>/), else {"all": ...}."""
    if "{" in root:
        if years:
            raise DataError(f"{root}: a brace pattern has no year folders to pick {years} from")
        return {"all": _from_pattern(root)}
    fs, path = filesystem(root)
    if not fs.isdir(path):
        raise DataError(f"{root}: no such folder")
    where = posixpath.join(path, split)
    if fs.isdir(where):
        found = _subfolders(fs, where)
        if not found:
            raise DataError(f"{_url(fs, where)}: no year folders")
    else:
        where, found = path, {k: v for k, v in _subfolders(fs, path).items() if k.isdigit()}
        if not found:
            if years:
                raise DataError(f"{root}: no {split}/<year>/ or <year>/ folders to pick years {years} from")
            return {"all": _from_folder(fs, path)}
    missing = [y for y in years or [] if y not in found]
    if missing:
        raise DataError(f"{_url(fs, where)}: no year {', '.join(missing)} (found {', '.join(sorted(found))})")
    return {y: _from_folder(fs, found[y]) for y in sorted(years or found)}


def _subfolders(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, str]:
    """Name -> path of the folders directly inside `path`."""
    return {
        posixpath.basename(e["name"].rstrip("/")): e["name"]
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory"
    }


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: plain for local files, with the protocol otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _read_sizes(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str], np.ndarray] | None:
    """A sizes.json's shard file names (sorted) and sample counts, or None when there is none."""
    if not fs.isfile(path):
        return None
    try:
        sizes = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{_url(fs, path)}: broken sizes file ({e})") from None
    want = f'{_url(fs, path)}: broken sizes file (want {{"000000.tar": samples, ...}})'
    if not isinstance(sizes, dict):
        raise DataError(want)
    names = sorted(sizes)
    # TiC's sizes files hold ~150k shards: take the values in one go when the file is already
    # sorted (writers usually sort), and check them with numpy rather than value by value.
    try:
        counts = np.array(list(sizes.values()) if names == list(sizes) else [sizes[n] for n in names])
    except ValueError:  # ragged nested values
        raise DataError(want) from None
    if names and (counts.dtype.kind != "i" or counts.ndim != 1 or counts.min() < 0):
        raise DataError(want)
    return names, counts.astype(np.int64)


def _from_folder(fs: fsspec.AbstractFileSystem, path: str) -> YearShards:
    """The shards of one folder: from its sizes.json alone if present, else listing the folder."""
    prefix = _url(fs, path).rstrip("/") + "/"
    listed = _read_sizes(fs, posixpath.join(path, SIZES))
    if listed is not None:
        if not listed[0]:
            raise DataError(f"{prefix}{SIZES}: lists no shards")
        return YearShards(prefix, *listed)
    files = {posixpath.basename(p) for p in fs.ls(path, detail=False)}
    names = sorted(f for f in files if f.endswith(".tar"))
    if not names:
        raise DataError(f"{prefix}: no .tar shards")
    counts = [_size_without_sizes_json(fs, path, prefix, name, files) for name in names]
    return YearShards(prefix, names, np.array(counts, dtype=np.int64))


def _size_without_sizes_json(fs: fsspec.AbstractFileSystem, path: str, prefix: str, name: str, files: set[str]) -> int:
    """img2dataset's NNNNN_stats.json "successes" if present, else the shard read through."""
    stats = name[: -len(".tar")] + "_stats.json"
    if stats in files:
        try:
            return int(json.loads(fs.cat_file(posixpath.join(path, stats)))["successes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{prefix}{stats}: broken img2dataset stats ({e})") from None
    log.warning("%s%s: no %s or stats file, counting samples by reading the shard", prefix, name, SIZES)
    return count_samples(prefix + name)


def _from_pattern(pattern: str) -> YearShards:
    """Shards named by a brace pattern; sizes from each folder's sizes.json, stats or the tars."""
    urls = list(braceexpand(pattern))
    by_folder: dict[str, dict[str, int]] = {}
    listing: dict[str, set[str]] = {}
    sizes = np.zeros(len(urls), dtype=np.int64)
    for i, url in enumerate(urls):
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        fs, path = filesystem(folder)
        if folder not in by_folder:
            listed = _read_sizes(fs, posixpath.join(path, SIZES))
            by_folder[folder] = dict(zip(listed[0], listed[1].tolist())) if listed else {}
        if name in by_folder[folder]:
            sizes[i] = by_folder[folder][name]
            continue
        if folder not in listing:
            if not fs.isdir(path):
                raise DataError(f"{pattern}: no such folder {folder}")
            listing[folder] = {posixpath.basename(p) for p in fs.ls(path, detail=False)}
        if name not in listing[folder]:
            raise DataError(f"{url}: no such shard (from pattern {pattern})")
        sizes[i] = _size_without_sizes_json(fs, path, folder + "/", name, listing[folder])
    return YearShards("", urls, sizes)
