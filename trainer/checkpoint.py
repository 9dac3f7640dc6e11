"""Atomic DeepSpeed checkpoints: yearly and mid-year tags, a COMPLETE marker, our own `latest`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.distributed import DistInfo, barrier, broadcast_object
from trainer.files import atomic_write, write_text_atomic
from trainer.rundir import STEP_TAG, TRAIN_STATE, CheckpointError, read_train_state

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = ".universal"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def _tag_size(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def check_free_space(ckpt_dir: Path, min_free_gb: float) -> None:
    """Refuse to start a save that would not fit: the last checkpoint's size plus a margin."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = [d for d in ckpt_dir.iterdir() if d.is_dir() and is_complete(d)]
    need = max((_tag_size(d) for d in previous), default=0) + int(min_free_gb * 2**30)
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise CheckpointError(
            f"{ckpt_dir}: {free / 2**30:.1f} GiB free, a checkpoint needs {need / 2**30:.1f} GiB "
            "(checkpoint.min_free_gb sets the margin)"
        )


def save(
    engine: Any,
    ckpt_dir: Path,
    tag: str,
    client_state: dict[str, Any],
    dist: DistInfo,
    min_free_gb: float,
    keep_last: int,
) -> Path:
    """Save on all ranks; rank 0 then marks it COMPLETE and points `latest` at it."""
    ok = None
    if dist.is_main:
        try:
            check_free_space(ckpt_dir, min_free_gb)
            ok = ""
        except CheckpointError as e:
            ok = str(e)
    ok = broadcast_object(ok)
    if ok:
        raise CheckpointError(ok)
    tag_dir = ckpt_dir / tag
    if dist.is_main and tag_dir.exists():
        # A leftover from a killed save (or a run resumed from an older tag): never mix files.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    if dist.is_main:
        write_text_atomic(tag_dir / TRAIN_STATE, json.dumps(client_state, indent=1, default=str))
        write_text_atomic(tag_dir / COMPLETE, tag + "\n")
        write_text_atomic(ckpt_dir / LATEST, tag + "\n")
        prune(ckpt_dir, keep_last)
    barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete mid-year (step-N) checkpoints beyond the newest `keep_last`; yearly ones stay."""
    steps = sorted(
        (int(m.group(1)), d)
        for d in ckpt_dir.iterdir()
        if d.is_dir() and (m := STEP_TAG.match(d.name)) and is_complete(d)
    )
    for _, d in steps[: max(0, len(steps) - keep_last)]:
        (d / COMPLETE).unlink()
        shutil.rmtree(d)
        shutil.rmtree(ckpt_dir / UNIVERSAL / d.name, ignore_errors=True)


def _order(tag_dir: Path) -> tuple[int, float]:
    """Newest first by the optimizer step recorded in the train state, then by time."""
    try:
        state = read_train_state(tag_dir)
        return int(state.get("global_step", -1)), (tag_dir / COMPLETE).stat().st_mtime
    except (OSError, ValueError):
        return -1, (tag_dir / COMPLETE).stat().st_mtime


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag to resume from: `latest` if complete, else the newest complete tag, else None."""
    if not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(ckpt_dir / tag):
            return tag
    done = [d for d in ckpt_dir.iterdir() if d.is_dir() and is_complete(d)]
    return max(done, key=_order).name if done else None


def to_universal(ckpt_dir: Path, tag: str, dist: DistInfo) -> Path:
    """Convert `tag` to DeepSpeed's universal format (once, atomically); return the folder to load from.

    ZeRO shards optimizer state by data-parallel rank and DeepSpeed refuses to load it on another
    number of ranks; its universal checkpoint stores every parameter's fp32 weights and Adam
    moments whole, so any world size can load them.
    """
    out = ckpt_dir / UNIVERSAL
    done = out / tag
    if dist.is_main and not is_complete(done):
        out.mkdir(exist_ok=True)
        shutil.rmtree(done, ignore_errors=True)
        atomic_write(done, lambda tmp: _convert_universal(ckpt_dir / tag, tmp))
    barrier()
    return out


UNIVERSAL_COMMAND = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
"""DeepSpeed's documented converter, run as its command line so that options it adds get their defaults."""


def _convert_universal(tag_dir: Path, out: Path) -> None:
    """The universal copy of `tag_dir` in `out`, with our train state and COMPLETE marker."""
    args = [
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(out),
        "--num_extract_workers",
        "1",
        # Our checkpoints are not Megatron's: DeepSpeed's own flag adds the version record.
        "--num_merge_workers",
        "1",
        "--inject_missing_state",
    ]
    done = subprocess.run([*UNIVERSAL_COMMAND, *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal conversion failed ({last})")
    shutil.copy(tag_dir / TRAIN_STATE, out / TRAIN_STATE)
    write_text_atomic(out / COMPLETE, tag_dir.name + "\n")


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer and LR schedule through DeepSpeed; return the client state."""
    if not is_complete(ckpt_dir / tag):
        raise CheckpointError(f"{ckpt_dir / tag}: not a complete checkpoint (no {COMPLETE} marker)")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it")
    return client_state
