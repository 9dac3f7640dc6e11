"""A make_shards job: ingest input units in parallel into staged pieces, check them, pack shuffled shards."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import fsspec
from tqdm import tqdm

from trainer.layout import FORMAT, MANIFEST, SPLITS
from trainer.prep import synthetic
from trainer.prep.images import ImageOptions
from trainer.prep.ingest import ManifestUnit, Routing, ShardUnit
from trainer.prep.manifests import iter_manifest, list_shards, manifest_base, manifest_columns, pick_column, read_lines
from trainer.prep.options import PrepError, PrepOptions
from trainer.prep.records import BAD_REASONS, FILTER_REASONS, Unit
from trainer.prep.uid_years import build_uid_index, uid_list_files
from trainer.prep.writer import OutputTree, PackTask, StagingFile, pack_shard, read_json, staged_piece, write_json

UNIT_ROWS = 2048
SYNTHETIC_UNIT = 1000
CREATED_BY = "tools/make_shards.py"
PR_SET_PDEATHSIG = 1


@dataclass
class JobPlan:
    """What the input turned out to be, settled before anything is written."""

    units: Callable[[str], Iterable[Unit]]
    unit_count: int | None
    source: dict[str, Any]
    resolved: dict[str, Any]
    extras: dict[str, Any]


def plan_job(options: PrepOptions) -> JobPlan:
    """Check the input and resolve column names; PrepError names what is wrong."""
    options.validate()
    years = options.year_list()
    routing = Routing(options.eval_frac, tuple(years) if years else None)
    image = ImageOptions(options.image_size, options.resize_mode, options.image_format)
    if options.source == "synthetic":
        assert years is not None and options.image_size is not None  # synthetic defaults, set by PrepOptions
        units = synthetic.synthetic_units(
            years,
            options.samples_per_year,
            options.eval_samples,
            options.seed,
            options.image_size,
            options.image_format,
            SYNTHETIC_UNIT,
        )
        extras = {
            "classes": synthetic.class_names(len(years)),
            "templates": list(synthetic.TEMPLATES),
            "classes_by_year": synthetic.classes_by_year(years),
        }
        return JobPlan(lambda _: units, len(units), {"kind": "synthetic"}, {}, extras)
    if options.source == "manifest":
        return _plan_manifest(options, routing, image)
    return _plan_shards(options, routing, image)


def _plan_manifest(options: PrepOptions, routing: Routing, image: ImageOptions) -> JobPlan:
    url = options.input
    columns = manifest_columns(url)
    where = f"--manifest {url}"
    picked = {
        "image_col": pick_column(
            columns, options.image_col, ("image", "path", "filepath", "file", "url"), "image", "--image-col", where
        ),
        "caption_col": pick_column(
            columns, options.caption_col, ("caption", "text", "txt", "title"), "caption", "--caption-col", where
        ),
        "time_col": pick_column(
            columns, options.time_col, ("year", "timestamp", "date", "time"), "year/timestamp", "--time-col", where
        ),
        "uid_col": pick_column(columns, options.uid_col, ("uid",), "uid", "--uid-col", where, required=False),
        "class_col": pick_column(columns, options.class_col, (), "class", "--class-col", where, required=False),
    }

    root = _image_root(options.image_root) if options.image_root else manifest_base(url)

    def units(_: str) -> Iterator[Unit]:
        rows = iter_manifest(url, list(picked.values()))
        while batch := tuple(row for _, row in zip(range(UNIT_ROWS), rows)):
            yield ManifestUnit(batch, root, routing, image)

    return JobPlan(units, None, {"kind": "manifest", "input": url}, picked, _class_extras(options))


def _image_root(given: str) -> str:
    """--image-root as the absolute folder (or URL) image paths are checked against."""
    fs, path = fsspec.core.url_to_fs(given)
    if not fs.isdir(path):
        raise PrepError(f"--image-root {given}: no such folder")
    return given.rstrip("/") if "://" in given else os.path.abspath(given)


def _plan_shards(options: PrepOptions, routing: Routing, image: ImageOptions) -> JobPlan:
    shards = list_shards(options.input)
    year_field = options.year_field or ("year" if not (options.uid_years or options.uid_lists) else None)
    if options.uid_lists:
        uid_list_files(options.uid_lists)
    if options.uid_years:
        fs, path = fsspec.core.url_to_fs(options.uid_years)
        if not fs.isfile(path):
            raise PrepError(f"--uid-years {options.uid_years}: no such file")

    def units(scratch: str) -> list[Unit]:
        index = (
            None
            if year_field
            else build_uid_index(options.uid_years, options.uid_lists, options.uid_col, options.time_col, scratch)
        )
        return [ShardUnit(url, routing, image, year_field, index) for url in shards]

    source = {
        "kind": "shards",
        "input": options.input,
        "shards": len(shards),
        "years_from": options.uid_lists or options.uid_years or f"json field {year_field}",
    }
    return JobPlan(units, len(shards), source, {"year_field": year_field}, _class_extras(options))


def _class_extras(options: PrepOptions) -> dict[str, Any]:
    if not options.classes:
        return {}
    templates = read_lines(options.templates, "--templates") if options.templates else ["a photo of a {}."]
    bad = next((t for t in templates if "{}" not in t), None)
    if bad is not None:
        raise PrepError(f"--templates {options.templates}: template {bad!r} has no {{}} placeholder")
    return {"classes": read_lines(options.classes, "--classes"), "templates": templates}


def ingest_unit(url: str, index: int, unit: Unit) -> dict[str, Any]:
    """Validate one unit's samples into staged pieces, one per (split, year); record the unit as done."""
    tree = OutputTree(url)
    pieces: dict[tuple[str, int], StagingFile] = {}
    skipped: Counter[str] = Counter()
    seen = 0
    try:
        for item in unit.items():
            seen += 1
            if isinstance(item, str):
                skipped[item] += 1
                continue
            where = (item.split, item.year)
            if where not in pieces:
                pieces[where] = StagingFile(tree.fs, tree.path(staged_piece(index, *where)))
            pieces[where].write(item)
    except BaseException:
        for piece in pieces.values():
            piece.discard()
        raise
    for piece in pieces.values():
        piece.commit()
    result = {
        "seen": seen,
        "skipped": dict(sorted(skipped.items())),
        "pieces": {f"{split}/{year}": piece.count for (split, year), piece in sorted(pieces.items())},
    }
    write_json(tree.fs, tree.work("units", f"{index:06d}.json"), result)
    return result


def _die_with_parent() -> None:
    """Worker initializer: a killed job must not leave workers writing into the output it will resume."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _parallel(fn: Callable[..., Any], jobs: Iterable[tuple], workers: int) -> Iterator[Any]:
    """fn(*job) for every job, in any order; at most 2 x workers jobs are held in memory."""
    if workers == 1:
        yield from (fn(*job) for job in jobs)
        return
    # spawn, not fork: the caller may hold threads (tqdm) or torch's OpenMP pool.
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_die_with_parent)
    try:
        pending: set = set()
        for job in jobs:
            pending.add(pool.submit(fn, *job))
            if len(pending) >= 2 * workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in finished)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in finished)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pack_tasks(results: dict[int, dict[str, Any]], shard_size: int, seed: int) -> list[PackTask]:
    """Cut each (split, year) stream of staged pieces, in unit order, into balanced shards of <= shard_size."""
    streams: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for index in sorted(results):
        for where, count in results[index]["pieces"].items():
            split, year = where.split("/")
            streams.setdefault((split, int(year)), []).append((staged_piece(index, split, int(year)), count))
    tasks = []
    for (split, year), pieces in sorted(streams.items()):
        total = sum(count for _, count in pieces)
        shards = math.ceil(total / shard_size)
        piece, offset = 0, 0  # piece index and samples of it already handed out
        for shard in range(shards):
            need = (shard + 1) * total // shards - shard * total // shards
            parts = []
            while need:
                path, count = pieces[piece]
                take = min(need, count - offset)
                parts.append((path, offset, take))
                need, offset = need - take, offset + take
                if offset == count:
                    piece, offset = piece + 1, 0
            tasks.append(PackTask(split, year, shard, tuple(parts), seed))
    return tasks


def _check_counts(seen: int, skipped: Counter, max_bad_frac: float) -> None:
    usable_input = seen - sum(skipped[r] for r in FILTER_REASONS)
    bad = sum(skipped[r] for r in BAD_REASONS)
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items()) if n)
    if bad > max_bad_frac * usable_input:
        raise PrepError(
            f"{bad} of {usable_input} input samples ({100 * bad / max(usable_input, 1):.1f}%) are unusable"
            f" ({reasons}), more than --max-bad-frac {max_bad_frac}; nothing was written"
        )
    if usable_input - bad <= 0:
        raise PrepError(
            f"no samples left out of {seen} input samples ({reasons or 'empty input'}); nothing was written"
        )


def prepare(options: PrepOptions) -> dict[str, Any]:
    """Run the whole job (resuming an unfinished one) and return the manifest written."""
    plan = plan_job(options)
    tree = OutputTree(options.out)
    created = tree.first_missing()
    wanted = options.output_options(plan.resolved)
    if tree.claim(wanted, options.overwrite):
        return {**(read_json(tree.fs, tree.path(MANIFEST)) or {}), "already_complete": True}
    workers = 1 if tree.in_process_only else options.workers
    try:
        results = _ingest(tree, plan, workers, options.progress)
        skipped: Counter[str] = Counter()
        for result in results.values():
            skipped.update(result["skipped"])
        seen = sum(result["seen"] for result in results.values())
        _check_counts(seen, skipped, options.max_bad_frac)
    except PrepError:
        tree.abandon(created)
        raise
    assert options.shard_size is not None  # its default is set by PrepOptions
    tasks = pack_tasks(results, options.shard_size, options.seed)
    for _ in tqdm(
        _parallel(pack_shard, ((tree.url, task) for task in tasks), workers),
        total=len(tasks),
        unit="shard",
        desc="pack",
        disable=not options.progress,
    ):
        pass
    sizes: dict[str, dict[str, dict[str, int]]] = {}
    for task in tasks:
        sizes.setdefault(task.split, {}).setdefault(str(task.year), {})[task.name] = sum(p[2] for p in task.pieces)
    manifest = {
        "format": FORMAT,
        "years": sorted({year for split in sizes.values() for year in split}),
        "splits": {
            split: {year: sum(n.values()) for year, n in sorted(sizes.get(split, {}).items())} for split in SPLITS
        },
        "source": plan.source,
        "created_by": CREATED_BY,
        "options": wanted,
        "seen": seen,
        "skipped": dict(sorted(skipped.items())),
        **plan.extras,
    }
    tree.finish(sizes, manifest)
    return {**manifest, "already_complete": False}


def _ingest(tree: OutputTree, plan: JobPlan, workers: int, progress: bool) -> dict[int, dict[str, Any]]:
    """Run every unit not done yet; the results of all units, by unit index."""
    done = tree.done_units()
    with tempfile.TemporaryDirectory(prefix="make_shards-") as scratch:
        jobs = ((tree.url, i, unit) for i, unit in enumerate(plan.units(scratch)) if i not in done)
        with tqdm(total=plan.unit_count, initial=len(done), unit="unit", desc="ingest", disable=not progress) as bar:
            for result in _parallel(ingest_unit, jobs, workers):
                bar.update()
                bar.set_postfix(samples=result["seen"], refresh=False)
    return tree.done_units()


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """A per-year table of the samples written and the skip counts, for the end of a run."""
    splits = manifest["splits"]
    lines = [f"{'year':>6} {'train':>10} {'eval':>8}"]
    for year in manifest["years"]:
        lines.append(f"{year:>6} {splits['train'].get(year, 0):>10} {splits['eval'].get(year, 0):>8}")
    lines.append(
        f"{'total':>6} {sum(splits['train'].values()):>10} {sum(splits['eval'].values()):>8}"
        f"   (from {manifest['seen']} input samples)"
    )
    skipped = ", ".join(f"{reason} {count}" for reason, count in manifest["skipped"].items())
    lines.append(f"skipped: {skipped or 'none'}")
    return lines
