"""Turning real inputs (manifest rows, existing webdataset shards) into validated, year- and split-tagged samples."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fsspec

from trainer.layout import EVAL, IMAGE_EXTENSIONS, MAX_MEMBER_BYTES, TRAIN
from trainer.prep.images import BadImage, ImageOptions, ImageTooLarge, prepare_image
from trainer.prep.manifests import parse_when
from trainer.prep.options import PrepError
from trainer.prep.records import UnitItem, eval_draw, make_sample
from trainer.prep.uid_years import UidYearIndex

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key/extension split: key = up to the first dot


@dataclass(frozen=True)
class Routing:
    """Where a sample goes: the year filter and the share of each year held out for eval."""

    eval_frac: float
    years: tuple[int, ...] | None

    def split(self, uid: str) -> str:
        """train or eval, fixed by the uid alone."""
        return EVAL if eval_draw(uid) < self.eval_frac else TRAIN


def _when(value: Any) -> tuple[int, str | None]:
    try:
        return parse_when(value)
    except (ValueError, OverflowError, OSError):
        return -1, None


_LOCAL = (None, "file", "local")


def resolve_image(ref: str, root: str) -> str | None:
    """Where image `ref` of a manifest is read from, or None when it points outside `root`.

    A relative path resolves against `root` (the manifest's folder or --image-root); a local path,
    absolute or relative, must stay inside it after normalising `..` (symlinks inside are the
    user's own and followed). A remote URL cannot name a local file and is read as given.
    """
    if "::" in ref:
        return None  # a chained URL (simplecache::file://...) can wrap any local file
    # Only "scheme://" makes a URL (as _read_image reads it): "data:x" is a file name here.
    protocol, path = fsspec.core.split_protocol(ref) if "://" in ref else (None, ref)
    if protocol not in _LOCAL:
        return ref
    root_protocol, root_path = fsspec.core.split_protocol(root)
    if protocol is None and not path.startswith("/"):
        path = posixpath.join(root_path, path)
    elif root_protocol not in _LOCAL:
        return None  # a local file named by a remote manifest
    path = posixpath.normpath(path)
    if not path.startswith(root_path.rstrip("/") + "/"):
        return None
    return path if root_protocol in _LOCAL else f"{root_protocol}://{path}"


def _read_image(ref: str) -> bytes | None:
    try:
        if "://" in ref:
            with fsspec.open(ref, "rb") as file:
                return file.read()
        with open(ref, "rb") as file:
            return file.read()
    except OSError:
        return None


@dataclass(frozen=True)
class ManifestUnit:
    """A run of consecutive manifest rows: (image ref, caption, time, uid, class) each, or a row's skip reason."""

    rows: tuple[tuple[Any, ...] | str, ...]
    base: str
    """The image root: relative image paths resolve against it, and no local path may leave it."""
    routing: Routing
    image: ImageOptions

    def items(self) -> Iterator[UnitItem]:
        """Validate each row in order: timestamp, year filter, caption, class, then a full image decode."""
        return (row if isinstance(row, str) else self._item(row) for row in self.rows)

    def _item(self, row: tuple[Any, ...]) -> UnitItem:
        ref, caption, when, uid, cls = row
        year, timestamp = _when(when)
        if year < 0:
            return "bad_timestamp"
        if self.routing.years is not None and year not in self.routing.years:
            return "year_not_selected"
        if not isinstance(caption, str) or not caption.strip():
            return "missing_caption"
        try:
            label = int(cls) if cls not in (None, "") else None
        except (TypeError, ValueError):
            return "bad_class"
        if not isinstance(ref, str) or not ref:
            return "missing_image"
        where = resolve_image(ref, self.base)
        if where is None:
            return "image_outside_root"
        checked = _checked_image(_read_image(where), self.image)
        if isinstance(checked, str):
            return checked
        image, ext = checked
        uid = str(uid) if uid not in (None, "") else hashlib.blake2b(ref.encode(), digest_size=16).hexdigest()
        meta = {"url": ref, "caption": caption.strip(), **({"timestamp": timestamp} if timestamp else {})}
        return make_sample(uid, year, self.routing.split(uid), image, ext, caption.strip(), meta, label)


def _checked_image(data: bytes | None, options: ImageOptions) -> tuple[bytes, str] | str:
    """(encoded image, extension) after a full decode, or the skip reason for a missing or corrupt one."""
    if data is None:
        return "missing_image"
    try:
        return prepare_image(data, options)
    except ImageTooLarge:
        return "image_too_large"
    except BadImage:
        return "corrupt_image"


@lru_cache(maxsize=2)
def _uid_index(path: str) -> UidYearIndex:
    # One mapping per worker process, reused by all its units.
    return UidYearIndex(path)


def _group(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: bytes}) per sample; a member over MAX_MEMBER_BYTES is None, left unread."""
    key, members = "", dict[str, bytes | None]()
    for info in tar:
        match = _MEMBER.match(info.name) if info.isfile() else None
        if match is None:
            continue
        # Checked before reading: a stream tar skips an unread member's bytes block by block.
        member = tar.extractfile(info) if info.size <= MAX_MEMBER_BYTES else None
        if match.group(1) != key and members:
            yield key, members
            members = {}
        key = match.group(1)
        members[match.group(2).lower()] = member.read() if member is not None else None
    if members:
        yield key, members


@dataclass(frozen=True)
class ShardUnit:
    """One input webdataset shard (img2dataset / DataComp layout), years from a json field or a uid index."""

    url: str
    routing: Routing
    image: ImageOptions
    year_field: str | None
    uid_index: str | None

    def items(self) -> Iterator[UnitItem]:
        """Validate each sample of the shard in file order."""
        try:
            with fsspec.open(self.url, "rb", compression="infer") as file, tarfile.open(fileobj=file, mode="r|") as tar:
                yield from (self._item(key, members) for key, members in _group(tar))
        except (tarfile.TarError, OSError, EOFError) as error:
            raise PrepError(f"--shards {self.url}: unreadable shard ({error}); re-download or remove it") from error

    def _item(self, key: str, members: dict[str, bytes | None]) -> UnitItem:
        if any(data is None for data in members.values()):
            return "member_too_large"
        return self._read(key, {ext: data for ext, data in members.items() if data is not None})

    def _read(self, key: str, members: dict[str, bytes]) -> UnitItem:
        try:
            meta = json.loads(members["json"]) if "json" in members else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        uid = str(meta.get("uid") or key.rsplit("/", 1)[-1])
        if self.uid_index is not None:
            year, timestamp = _uid_index(self.uid_index).year(uid), None
            if year is None:
                return "uid_not_listed"
        elif meta.get(self.year_field) is None:
            return "missing_year"
        else:
            year, timestamp = _when(meta[self.year_field])
            if year < 0:
                return "bad_timestamp"
        if self.routing.years is not None and year not in self.routing.years:
            return "year_not_selected"
        caption = members["txt"].decode("utf-8", "replace").strip() if "txt" in members else meta.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            return "missing_caption"
        checked = _checked_image(next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None), self.image)
        if isinstance(checked, str):
            return checked
        image, ext = checked
        if timestamp and "timestamp" not in meta:
            meta["timestamp"] = timestamp
        cls = members.get("cls", b"").decode("ascii", "replace").strip()
        label = int(cls) if cls.isdigit() else None
        return make_sample(uid, year, self.routing.split(uid), image, ext, caption.strip(), meta, label)
