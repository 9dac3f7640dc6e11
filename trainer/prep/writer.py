"""Atomic, byte-reproducible shard writing into an fsspec output tree, and the tree's resume/claim rules."""

from __future__ import annotations

import io
import json
import os
import posixpath
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from trainer.layout import MANIFEST, SIZES, SPLITS
from trainer.prep.options import PrepError
from trainer.prep.records import Sample

# Fixed tar header fields: reruns and resumed runs must produce byte-identical shards.
TAR_MTIME = 0
TAR_MODE = 0o444
TAR_OWNER = "tic"
WORK_DIR = ".make_shards"
PARTIAL_SUFFIX = ".partial"


def staged_piece(unit: int, split: str, year: int) -> str:
    """Where a unit's samples of one (split, year) wait for packing, relative to the output root."""
    return posixpath.join(WORK_DIR, "units", f"{unit:06d}", f"{split}-{year}.bin")


def temp_path(path: str) -> str:
    """A hidden sibling name for `path` that no `*.tar` listing picks up; the pid keeps a stray process apart."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{os.getpid()}{PARTIAL_SUFFIX}")


class _AtomicFile:
    """A file written under a temporary name; `commit()` renames it into place, so nobody sees half of it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs, self.path, self.count = fs, path, 0
        self._temp = temp_path(path)
        self._file = fs.open(self._temp, "wb")

    def _close(self) -> None:
        self._file.close()

    def commit(self) -> None:
        """Finish the file and move it to its final name."""
        self._close()
        self.fs.mv(self._temp, self.path)

    def discard(self) -> None:
        """Drop the unfinished file."""
        self._close()
        self.fs.rm(self._temp)


class ShardFile(_AtomicFile):
    """One output webdataset shard."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        super().__init__(fs, path)
        # USTAR like webdataset.TarWriter (importing webdataset pulls in torch: seconds per worker process).
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, sample: Sample) -> None:
        """Append a sample's members, ordered by extension as webdataset.TarWriter does."""
        for ext in sorted(sample.members):
            data = sample.members[ext]
            info = tarfile.TarInfo(f"{sample.key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, TAR_MODE
            info.uname = info.gname = TAR_OWNER
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _close(self) -> None:
        self._tar.close()
        super()._close()


class StagingFile(_AtomicFile):
    """Samples staged between ingest and pack: a length-prefixed JSON header, then the member bytes, per sample."""

    def write(self, sample: Sample) -> None:
        """Append one sample."""
        header = json.dumps({"key": sample.key, "sizes": [[ext, len(data)] for ext, data in sample.members.items()]})
        self._file.write(struct.pack("<I", len(header)) + header.encode("utf-8"))
        for data in sample.members.values():
            self._file.write(data)
        self.count += 1


def read_staged(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a StagingFile, in the order written."""
    with fs.open(path, "rb") as file:
        while prefix := file.read(4):
            header = json.loads(file.read(struct.unpack("<I", prefix)[0]))
            yield header["key"], {ext: file.read(size) for ext, size in header["sizes"]}


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write JSON atomically (temp name + rename), with sorted keys so the bytes are reproducible."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    temp = temp_path(path)
    with fs.open(temp, "w", encoding="utf-8") as file:
        file.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    fs.mv(temp, path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """The parsed JSON at `path`, or None when there is no such file."""
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as file:
        return json.load(file)


@dataclass(frozen=True)
class PackTask:
    """One output shard: the `take` samples after skipping `skip` in each staged piece, listed in input order."""

    split: str
    year: int
    index: int
    pieces: tuple[tuple[str, int, int], ...]
    seed: int

    @property
    def name(self) -> str:
        """The shard's file name."""
        return f"{self.index:06d}.tar"


def pack_shard(url: str, task: PackTask) -> int:
    """Write one output shard from staged pieces in a seeded shuffled order; skip it if already there."""
    tree = OutputTree(url)
    path = tree.path(task.split, str(task.year), task.name)
    if tree.fs.exists(path):
        return 0
    samples = []
    for piece, skip, take in task.pieces:
        for position, (key, members) in enumerate(read_staged(tree.fs, tree.path(piece))):
            if position >= skip + take:
                break
            if position >= skip:
                samples.append(Sample(key, task.split, task.year, members))
    # Readers stream shards front to back, so no order of the input may survive inside a shard.
    order = np.random.default_rng([task.seed, SPLITS.index(task.split), task.year, task.index]).permutation(
        len(samples)
    )
    shard = ShardFile(tree.fs, path)
    for i in order:
        shard.write(samples[i])
    shard.commit()
    return len(samples)


class OutputTree:
    """The output dataset root: train/ and eval/ shard folders, manifest.json, and a running job's work folder."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    @property
    def in_process_only(self) -> bool:
        """True when other processes cannot see this filesystem (memory://)."""
        return "memory" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        """Path of `parts` below the root."""
        return posixpath.join(self.root, *parts)

    def work(self, *parts: str) -> str:
        """Path of `parts` below the hidden work folder of an unfinished job."""
        return self.path(WORK_DIR, *parts)

    def claim(self, options: dict[str, Any], overwrite: bool) -> bool:
        """Take the root for a job with `options`; True if it already holds that finished dataset."""
        options = json.loads(json.dumps(options))
        try:
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise PrepError(f"cannot write output {self.url}: it is a file, not a folder")
            manifest = read_json(self.fs, self.path(MANIFEST))
            started = read_json(self.fs, self.work("options.json"))
            if not overwrite:
                self._refuse_foreign(options, manifest, started)
                if manifest is not None:
                    # A run killed between writing manifest.json and dropping its work folder.
                    self._remove(WORK_DIR)
                    return True
                if started is not None:
                    return False
            self._remove(*SPLITS, MANIFEST, WORK_DIR)
            write_json(self.fs, self.work("options.json"), options)
        except OSError as error:
            raise PrepError(f"cannot write output {self.url}: {error.strerror or error}") from error
        return False

    def _refuse_foreign(self, options: dict[str, Any], manifest: dict | None, started: dict | None) -> None:
        for found, where in ((manifest and manifest.get("options"), MANIFEST), (started, WORK_DIR)):
            if found is not None and found != options:
                raise PrepError(
                    f"{self.url} was made with other options ({where}: {_first_difference(found, options)});"
                    " pass --overwrite to replace it"
                )
        if manifest is None and started is None and any(self.fs.exists(self.path(s)) for s in SPLITS):
            raise PrepError(f"{self.url} already has train/ or eval/ not made by make_shards; pass --overwrite")

    def _remove(self, *names: str) -> None:
        for name in names:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

    def first_missing(self) -> str | None:
        """The outermost folder of the root's path that does not exist yet (what a failed job must remove)."""
        missing, path = None, self.root
        while path and not self.fs.exists(path):
            missing, parent = path, posixpath.dirname(path)
            path = parent if parent != path else ""
        return missing

    def done_units(self) -> dict[int, dict[str, Any]]:
        """Results of the input units finished so far (a unit counts once its result file exists)."""
        folder = self.work("units")
        if not self.fs.exists(folder):
            return {}
        done = {}
        for entry in self.fs.ls(folder, detail=False):
            name = posixpath.basename(entry)
            if name.endswith(".json") and name[:-5].isdigit() and (result := read_json(self.fs, entry)) is not None:
                done[int(name[:-5])] = result
        return done

    def abandon(self, created: str | None) -> None:
        """Undo a job that stopped on a user error: drop its work folder, and `created` if it holds no files."""
        self._remove(WORK_DIR)
        if created and self.fs.exists(created) and not self.fs.find(created):
            self.fs.rm(created, recursive=True)

    def finish(self, sizes: dict[str, dict[str, dict[str, int]]], manifest: dict[str, Any]) -> None:
        """Write every sizes.json, then manifest.json (which marks the dataset complete), then drop the work folder."""
        for split, years in sizes.items():
            for year, shards in years.items():
                folder = self.path(split, year)
                for entry in self.fs.ls(folder, detail=False):
                    if entry.endswith(PARTIAL_SUFFIX):
                        self.fs.rm(entry)
                write_json(self.fs, posixpath.join(folder, SIZES), shards)
        write_json(self.fs, self.path(MANIFEST), manifest)
        self.fs.rm(self.work(), recursive=True)


def _first_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    for key in sorted(set(found) | set(wanted)):
        if found.get(key) != wanted.get(key):
            return f"{key} was {found.get(key)!r}, now {wanted.get(key)!r}"
    return "same options"
