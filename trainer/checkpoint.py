"""Atomic DeepSpeed checkpoints: yearly and mid-year tags, a COMPLETE marker, our own `latest`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from trainer.distributed import DistInfo, barrier, broadcast_object

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = ".universal"
STEP_TAG = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (disk full, missing, incomplete)."""


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        _write_atomic(tag_dir / "trainer_state.json", json.dumps(client_state, indent=1, default=str))
        _write_atomic(tag_dir / COMPLETE, tag + "\n")
        _write_atomic(ckpt_dir / LATEST, tag + "\n")
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
        state = json.loads((tag_dir / "trainer_state.json").read_text())
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
        from deepspeed.checkpoint.ds_to_universal import main as convert

        tmp = out / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True,
            # Our checkpoints are not Megatron's: DeepSpeed's own flag adds the version record.
            inject_missing_state=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress report
            convert(args)
        shutil.copy(ckpt_dir / tag / "trainer_state.json", tmp / "trainer_state.json")
        _write_atomic(tmp / COMPLETE, tag + "\n")
        shutil.rmtree(done, ignore_errors=True)
        os.replace(tmp, done)
    barrier()
    return out


def load(engine: Any, ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """Restore model, optimizer and LR schedule through DeepSpeed; return the client state."""
    if not is_complete(ckpt_dir / tag):
        raise CheckpointError(f"{ckpt_dir / tag}: not a complete checkpoint (no {COMPLETE} marker)")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it")
    return client_state
