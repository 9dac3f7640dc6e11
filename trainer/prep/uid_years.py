"""uid -> year lookup for existing shards: from a Parquet table or TiC-DataComp per-year .npy uid lists."""

from __future__ import annotations

import hashlib
import posixpath
import re

import fsspec
import numpy as np

from trainer.prep.manifests import parse_when, pick_column
from trainer.prep.options import PrepError

# DataComp / TiC-DataComp store a 32-hex-digit uid as two big-endian uint64 halves.
UID_DTYPE = np.dtype("u8,u8")
_HEX_UID = re.compile(r"[0-9a-fA-F]{32}")
_YEAR_IN_NAME = re.compile(r"(?<!\d)(1[89]\d\d|2[01]\d\d)(?!\d)")


def uid_pair(uid: str) -> tuple[int, int]:
    """The (high, low) uint64 pair of a uid: its hex digits for DataComp uids, else a stable 128-bit hash."""
    digits = uid if _HEX_UID.fullmatch(uid) else hashlib.blake2b(uid.encode("utf-8"), digest_size=16).hexdigest()
    return int(digits[:16], 16), int(digits[16:], 16)


def _pairs(values: np.ndarray, source: str) -> np.ndarray:
    if values.dtype.names and len(values.dtype.names) == 2:
        return values.astype(UID_DTYPE)
    if values.dtype.kind in "SU":
        text = values.astype(str) if values.dtype.kind == "S" else values
        return np.array([uid_pair(str(u)) for u in text], dtype=UID_DTYPE)
    raise PrepError(f"{source}: uids must be a u8,u8 structured array or strings, not {values.dtype}")


def _read_npy(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    with fs.open(path, "rb") as file:
        try:
            return np.load(file, allow_pickle=False)
        except ValueError as error:
            raise PrepError(f"--uid-lists {path}: not a plain .npy array ({error})") from error


def uid_list_files(url: str) -> dict[int, str]:
    """{year: path} of the .npy files in a uid-list folder; the year is the 4-digit number in each name."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise PrepError(f"--uid-lists {url}: no such folder")
    files: dict[int, str] = {}
    for path in sorted(fs.ls(root, detail=False)):
        years = _YEAR_IN_NAME.findall(posixpath.basename(path)) if path.endswith(".npy") else []
        if len(years) == 1:
            files[int(years[0])] = fs.unstrip_protocol(path) if "://" in url else path
    if not files:
        raise PrepError(f"--uid-lists {url}: no <year>.npy files there")
    return files


def _from_lists(url: str) -> tuple[np.ndarray, np.ndarray]:
    keys, years = [], []
    for year, path in sorted(uid_list_files(url).items()):
        fs, local = fsspec.core.url_to_fs(path)
        pairs = _pairs(_read_npy(fs, local).reshape(-1), path)
        keys.append(pairs)
        years.append(np.full(len(pairs), year, dtype=np.int16))
    return np.concatenate(keys), np.concatenate(years)


def _from_table(url: str, uid_col: str | None, time_col: str | None) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(url, "rb") as file:
            columns = list(pq.ParquetFile(file).schema_arrow.names)
            uid_name = pick_column(columns, uid_col, ("uid", "key", "id"), "uid", "--uid-col", url)
            time_name = pick_column(columns, time_col, ("year", "timestamp", "date", "time"), "year", "--time-col", url)
            table = pq.read_table(file, columns=[uid_name, time_name])
    except FileNotFoundError as error:
        raise PrepError(f"--uid-years {url}: no such file") from error
    uids, times = table.column(uid_name).to_pylist(), table.column(time_name).to_pylist()
    years = np.empty(len(uids), dtype=np.int16)
    for row, value in enumerate(times):
        try:
            years[row] = parse_when(value)[0]
        except (ValueError, OverflowError, OSError) as error:
            raise PrepError(
                f"--uid-years {url}: row {row} has {time_name}={value!r}, not a year or timestamp"
            ) from error
    keys = np.array([uid_pair(str(u)) for u in uids], dtype=UID_DTYPE)
    order = np.argsort(years, kind="stable")
    return keys[order], years[order]


def build_uid_index(
    uid_years: str | None, uid_lists: str | None, uid_col: str | None, time_col: str | None, folder: str
) -> str:
    """Sort every (uid, year) into `folder`/uid_index.npy for memory-mapped lookups; return its path."""
    if uid_lists:
        keys, years = _from_lists(uid_lists)
    else:
        assert uid_years is not None, "a uid table or uid lists"
        keys, years = _from_table(uid_years, uid_col, time_col)
    # Stable sort over year-ordered input: a uid listed in several years resolves to its earliest one.
    order = np.argsort(keys, kind="stable")
    index = np.empty(len(keys), dtype=[("uid", UID_DTYPE), ("year", np.int16)])
    index["uid"], index["year"] = keys[order], years[order]
    path = posixpath.join(folder, "uid_index.npy")
    np.save(path, index)
    return path


class UidYearIndex:
    """Memory-mapped sorted (uid, year) pairs: worker processes share the pages instead of copying a dict."""

    def __init__(self, path: str) -> None:
        self._index = np.load(path, mmap_mode="r")
        self._uids = self._index["uid"]

    def year(self, uid: str) -> int | None:
        """The year listed for `uid`, or None when it is not listed."""
        probe = np.array([uid_pair(uid)], dtype=UID_DTYPE)
        at = int(np.searchsorted(self._uids, probe)[0])
        if at < len(self._uids) and self._uids[at] == probe[0]:
            return int(self._index["year"][at])
        return None
