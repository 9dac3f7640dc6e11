"""Find webdataset shards and their sample counts per year, on a local path or any fsspec URL."""

from __future__ import annotations

import json
import logging
import posixpath
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal, TypeVar, overload

import fsspec
import numpy as np
from braceexpand import braceexpand

from trainer.data.buffers import Listed, Pick, choose, shard_keys
from trainer.errors import UserError
from trainer.layout import MAX_MEMBER_BYTES, SIZES, TRAIN

log = logging.getLogger(__name__)

_STATS = re.compile(r"^(.*)_stats\.json$")
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar reader leaves out

# Transient read errors (a 500, SlowDown, a dropped connection) are retried this many times, the
# first after RETRY_DELAY seconds, doubling up to RETRY_MAX_DELAY: about 15 s of outage survived
# before a shard counts as missing. botocore and s3fs retry below this too; this is the layer that
# also survives a connection dropped mid-shard, by reopening the shard where it was.
RETRIES = 5
RETRY_DELAY = 0.5
RETRY_MAX_DELAY = 8.0
# Errors that say the file is not there (or not ours): trying again cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Jitter from its own generator: thousands of workers hit by one outage should not retry in step,
# and the process's RNGs (augmentation, order) must not move.
_jitter = random.Random()

T = TypeVar("T")


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
    def __init__(self, prefix: str, names: list[str], sizes: np.ndarray, pick: Pick | Listed | None = None) -> None:
        self.prefix = prefix
        self.names = names
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.pick = pick
        self._members: dict[int, np.ndarray] = {}

    def member(self, index: int, k: int) -> int:
        """The file-order member index of the k-th sample of shard `index` (a buffer holds only some)."""
        if self.pick is None:
            return k
        members = self._members.get(index)
        if members is None:
            # A stream reads a few shards of a year at once (its lanes, passes): keep theirs.
            if len(self._members) >= 64:
                del self._members[next(iter(self._members))]
            members = self._members[index] = self.pick.members(index)
        return int(members[k])

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

    def subset(self, samples: int, seed: int, year: str, by: Literal["samples", "shards"] = "samples") -> YearShards:
        """A fixed replay buffer of exactly `samples`, nested: a smaller one lies inside a larger one.

        by="samples": the samples with the smallest hashes (trainer/data/buffers.py), spread over
        every shard; reading them reads their shards whole, so a buffer of a fraction f of the
        year reads 1/f of its bytes per sample. by="shards": whole shards in an order seeded by
        (seed, year), the last cut short to its first members; read without waste, but each shard
        holds what it was cut from.
        """
        if not 0 < samples <= self.samples:
            raise ValueError(f"year {year}: a buffer of {samples} from {self.samples} samples")
        if self.pick is not None:
            raise ValueError(f"year {year}: a buffer of a buffer")
        if by == "samples":
            keys = shard_keys(self.names, seed, year)
            cut, counts = choose(keys, self.sizes, samples)
            kept = np.flatnonzero(counts)
            pick = Pick(cut, kept, keys[kept], self.sizes[kept])
            return YearShards(self.prefix, [self.names[i] for i in kept], counts[kept], pick)
        order = np.random.default_rng([seed, int.from_bytes(year.encode(), "little") % 2**32]).permutation(len(self))
        sizes = self.sizes[order]
        keep = int(np.searchsorted(np.cumsum(sizes), samples)) + 1
        chosen = sorted(order[:keep].tolist())
        cut_short = {int(order[keep - 1]): int(samples - sizes[: keep - 1].sum())}
        return YearShards(
            self.prefix,
            [self.names[i] for i in chosen],
            np.array([cut_short.get(i, int(self.sizes[i])) for i in chosen], dtype=np.int64),
        )


def filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for `url`; a protocol whose backend is not installed is a DataError."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
        raise DataError(f"{url}: this URL needs an fsspec backend that is not installed ({e})") from None
    except ValueError as e:
        raise DataError(f"{url}: not a URL fsspec can open ({e})") from None


def transient(error: BaseException) -> bool:
    """Whether reading again may succeed: a network or server error, not a missing file or tar damage."""
    if isinstance(error, _PERMANENT):
        return False
    # s3fs turns S3 error replies into OSError (500 -> EREMOTEIO, SlowDown -> EBUSY) but lets a body
    # cut short through as aiohttp's ClientPayloadError. Such types are only checked when their
    # library is loaded: an error of a library's type means the library was imported.
    kinds: list[type[BaseException]] = [OSError]
    if (aiohttp := sys.modules.get("aiohttp")) is not None:
        kinds.append(aiohttp.ClientError)
    if (boto := sys.modules.get("botocore.exceptions")) is not None:
        # Connection refused or reset, timeouts, a stream cut short; not BotoCoreError as a whole,
        # which also means missing credentials or a bad parameter.
        kinds += [boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError]
        if isinstance(error, boto.ClientError):  # an error reply s3fs did not translate
            reply = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return reply >= 500 or error.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    return isinstance(error, tuple(kinds))


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): exponential, capped, with jitter."""
    return min(RETRY_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY) * _jitter.uniform(0.5, 1.0)


def retrying(what: str, call: Callable[[], T], retries: int = RETRIES) -> T:
    """`call()`, tried again after a transient error up to `retries` times; then its error is raised."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            if attempt >= retries or not transient(e):
                raise
            attempt += 1
            delay = retry_delay(attempt)
            log.warning("%s: %s; retry %d of %d in %.1f s", what, e, attempt, retries, delay)
            time.sleep(delay)


def open_shard(url: str, retries: int = RETRIES) -> IO[bytes]:
    """Open a shard for reading through fsspec (webdataset's gopen knows no fsspec URLs)."""
    fs, path = filesystem(url)
    try:
        return retrying(url, lambda: fs.open(path, "rb"), retries)
    except Exception as e:
        if isinstance(e, (OSError, ValueError)) or transient(e):  # transient: outlived the retries
            raise DataError(f"{url}: cannot open shard ({e})") from e  # the cause says if it was transient
        raise


def iter_samples(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """The samples of an open tar shard in file order, grouped by key by webdataset.

    A member over MAX_MEMBER_BYTES is left unread and stands in its sample as None, which `decode`
    counts as "member_too_large"; webdataset's own tar reader would read it into memory whole.
    """
    # Imported here because webdataset imports torch, which `DataError` users need not load.
    from webdataset.tariterators import group_by_keys

    return group_by_keys(_members(url, stream))


def _members(url: str, stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    """webdataset's tar_file_expander for one shard, with each member's size checked before it is read."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or _META.match(info.name):
                continue
            # An unread member's bytes are skipped block by block when the stream moves on.
            member = tar.extractfile(info) if info.size <= MAX_MEMBER_BYTES else None
            yield {"fname": info.name, "data": member.read() if member is not None else None, "__url__": url}
            # As webdataset does: a streamed shard need not keep every member header it has passed.
            tar.members = []  # type: ignore[attr-defined]  # undocumented, so not in typeshed


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
    if not _retry_fs(fs, path, fs.isdir):
        raise DataError(f"{root}: no such folder")
    where = posixpath.join(path, split)
    if _retry_fs(fs, where, fs.isdir):
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
        for e in _retry_fs(fs, path, lambda p: fs.ls(p, detail=True))
        if e["type"] == "directory"
    }


def _names(fs: fsspec.AbstractFileSystem, path: str) -> set[str]:
    """The file names in folder `path`."""
    return {posixpath.basename(p) for p in _retry_fs(fs, path, lambda p: fs.ls(p, detail=False))}


def _retry_fs(fs: fsspec.AbstractFileSystem, path: str, call: Callable[[str], T]) -> T:
    """`call(path)` (a listing, a small read) retried on transient errors; one outliving them is a DataError."""
    url = _url(fs, path)
    try:
        return retrying(url, lambda: call(path))
    except PermissionError as e:
        raise DataError(f"{url}: access denied ({e})") from None
    except Exception as e:
        if transient(e):
            raise DataError(f"{url}: still failing after {RETRIES} retries ({e})") from None
        if _no_credentials(e):
            raise DataError(f"{url}: no credentials for this store ({e})") from None
        raise


def _no_credentials(e: BaseException) -> bool:
    """botocore's missing or partial credentials errors (s3fs raises them as they are)."""
    return type(e).__module__.startswith("botocore") and "Credentials" in type(e).__name__


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: plain for local files, with the protocol otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _read_sizes(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str], np.ndarray] | None:
    """A sizes.json's shard file names (sorted) and sample counts, or None when there is none."""
    # Read, not `isfile` first: fsspec's isfile answers False for any error, so a transient 500
    # would silently turn into "no sizes.json" and a read of every shard.
    try:
        sizes = json.loads(_retry_fs(fs, path, fs.cat_file))
    except (FileNotFoundError, IsADirectoryError):
        return None
    except DataError:
        raise
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
    files = _names(fs, path)
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
            return int(json.loads(_retry_fs(fs, posixpath.join(path, stats), fs.cat_file))["successes"])
        except DataError:
            raise
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
            if not _retry_fs(fs, path, fs.isdir):
                raise DataError(f"{pattern}: no such folder {folder}")
            listing[folder] = _names(fs, path)
        if name not in listing[folder]:
            raise DataError(f"{url}: no such shard (from pattern {pattern})")
        sizes[i] = _size_without_sizes_json(fs, path, folder + "/", name, listing[folder])
    return YearShards("", urls, sizes)
