"""Reading the inputs' file formats: manifests (CSV/TSV/JSONL/Parquet), shard listings, timestamps."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from collections.abc import Iterator
from datetime import date, datetime, timezone
from typing import Any

import braceexpand
import fsspec

from trainer.prep.options import PrepError

MANIFEST_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_BATCH = 65_536
MAX_CSV_FIELD = 16 * 2**20
"""Longest CSV/TSV field read: a caption of any real length; a longer one is a runaway quote or junk."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_when(value: Any) -> tuple[int, str | None]:
    """(year, ISO-8601 UTC timestamp or None) from a year, epoch seconds/ms, a date or a date string."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"no year in {value!r}")
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        return value.year, value.isoformat()
    elif isinstance(value, (int, float)) or hasattr(value, "dtype"):
        number = float(value)
        if 1000 <= number <= 9999 and number.is_integer():
            return int(number), None
        # Epochs past year 5138 in seconds are really milliseconds.
        moment = datetime.fromtimestamp(number / 1000 if abs(number) > 1e11 else number, tz=timezone.utc)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{4}", text):
            return int(text), None
        if re.fullmatch(r"-?\d+(\.\d*)?", text):
            return parse_when(float(text))
        month = re.fullmatch(r"(\d{4})[-/](0?[1-9]|1[0-2])", text)
        if month:
            return int(month.group(1)), None
        moment = datetime.fromisoformat(text)
    else:
        raise ValueError(f"no year in {value!r}")
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment.year, moment.isoformat().replace("+00:00", "Z")


def manifest_kind(url: str) -> str:
    """csv, tsv, jsonl or parquet from the file name (ignoring a compression suffix)."""
    name = url.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    kind = MANIFEST_KINDS.get(posixpath.splitext(name)[1])
    if kind is None:
        raise PrepError(f"--manifest {url}: unknown format; name it .csv, .tsv, .jsonl, .ndjson or .parquet")
    return kind


def manifest_base(url: str) -> str:
    """The folder that relative image paths in the manifest are relative to."""
    return url.rsplit("/", 1)[0] if "://" in url else os.path.dirname(os.path.abspath(url))


def _open_text(url: str):
    # utf-8-sig: a BOM (Excel writes one) would otherwise become part of the first column's name.
    # surrogateescape: a stray non-UTF-8 byte spoils only its row (see _undecodable), not the file.
    return fsspec.open(url, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="", compression="infer")


def _csv_reader(file: Any, kind: str) -> Iterator[list[str]]:
    # The limit is the csv module's global setting; its 128 KiB default is short for some captions.
    csv.field_size_limit(MAX_CSV_FIELD)
    return csv.reader(file, delimiter="\t" if kind == "tsv" else ",")


def _undecodable(value: Any) -> bool:
    """True for text holding bytes that were not UTF-8 (surrogateescape keeps them as lone surrogates)."""
    return isinstance(value, str) and _SURROGATE.search(value) is not None


def _checked(row: tuple[Any, ...]) -> tuple[Any, ...] | str:
    # Only the columns make_shards reads: a bad byte in a column it ignores does not spoil the row.
    return "bad_encoding" if any(_undecodable(value) for value in row) else row


def manifest_columns(url: str) -> list[str]:
    """Column names of a manifest (JSONL: keys of the first record); PrepError if it is missing or empty."""
    kind = manifest_kind(url)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(url, "rb") as file:
                return list(pq.ParquetFile(file).schema_arrow.names)
        with _open_text(url) as file:
            if kind == "jsonl":
                first = next((line for line in file if line.strip()), None)
                columns = list(json.loads(first)) if first else []
            else:
                columns = next(_csv_reader(file, kind), [])
    except FileNotFoundError as error:
        raise PrepError(f"--manifest {url}: no such file") from error
    except (OSError, ValueError, csv.Error) as error:
        raise PrepError(f"--manifest {url}: cannot read it as {kind}: {error}") from error
    if any(_undecodable(c) for c in columns):
        raise PrepError(f"--manifest {url}: the header is not UTF-8 text; save the file as UTF-8")
    return columns


def iter_manifest(url: str, columns: list[str | None]) -> Iterator[tuple[Any, ...] | str]:
    """Rows as tuples of the given columns (None for a column not asked for), or the reason a row is unusable:
    bad_row (unparseable), field_too_large (a CSV field over MAX_CSV_FIELD), bad_encoding (not UTF-8)."""
    kind = manifest_kind(url)
    if kind == "parquet":
        import pyarrow.parquet as pq

        wanted = [c for c in columns if c]
        with fsspec.open(url, "rb") as file:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH, columns=wanted):
                data = {name: batch.column(name).to_pylist() for name in wanted}
                blank = [None] * batch.num_rows
                yield from zip(*(data[c] if c else blank for c in columns))
        return
    with _open_text(url) as file:
        if kind == "jsonl":
            for line in file:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    yield "bad_row"
                    continue
                if not isinstance(record, dict):
                    yield "bad_row"
                    continue
                yield _checked(tuple(record.get(c) if c else None for c in columns))
            return
        reader = _csv_reader(file, kind)
        header = next(reader)
        where = [header.index(c) if c else None for c in columns]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                # The reader goes on at the next line; only this row is lost.
                yield "field_too_large" if "field limit" in str(error) else "bad_row"
                continue
            if len(row) != len(header):
                yield "bad_row"
                continue
            yield _checked(tuple(row[i] if i is not None else None for i in where))


def pick_column(
    columns: list[str],
    given: str | None,
    candidates: tuple[str, ...],
    what: str,
    flag: str,
    source: str,
    required: bool = True,
) -> str | None:
    """The column to use: the one given (which must exist) or the first candidate present."""
    if given is not None:
        if given not in columns:
            raise PrepError(f"{flag} {given!r}: {source} has no such column (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise PrepError(
            f"{source} has no {what} column (looked for {', '.join(candidates)};"
            f" columns: {', '.join(columns) or 'none'}); name it with {flag}"
        )
    return found


def list_shards(spec: str) -> list[str]:
    """Shard URLs named by a folder, a file, a brace pattern or a glob, sorted; PrepError if there are none."""
    found: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = [p for p in fs.ls(path, detail=False) if p.endswith(SHARD_SUFFIXES)]
        else:
            paths = [path] if fs.exists(path) else []
        found.extend(p if "://" not in pattern else fs.unstrip_protocol(p) for p in paths)
    if not found:
        raise PrepError(f"--shards {spec}: no .tar shards found there")
    return sorted(set(found))


def read_lines(url: str, flag: str) -> list[str]:
    """Non-empty lines of a small text file (class names, templates)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as file:
            lines = [line.strip() for line in io.StringIO(file.read()) if line.strip()]
    except FileNotFoundError as error:
        raise PrepError(f"{flag} {url}: no such file") from error
    if not lines:
        raise PrepError(f"{flag} {url}: the file is empty")
    return lines
