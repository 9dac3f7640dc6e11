"""Atomic DeepSpeed checkpoints: yearly and mid-year tags, a COMPLETE marker, our own `latest`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainer.distributed import DistInfo, all_gather_object, barrier
from trainer.files import atomic_write, write_text_atomic
from trainer.rundir import STEP_TAG, TRAIN_STATE, CheckpointError, read_train_state
from trainer.safe_load import restricted_unpickling

COMPLETE = "COMPLETE"
LATEST = "latest"
UNIVERSAL = ".universal"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def _tag_size(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def _readable(value: object) -> str:
    """How the people's copy of the train state shows what JSON cannot hold: a tensor by its shape."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor{list(value.shape)} {value.dtype}"
    return str(value)


def check_free_space(ckpt_dir: Path, min_free_gb: float) -> None:
    """Refuse to start a save that would not fit: the last checkpoint's size plus a margin."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = [d for d in ckpt_dir.iterdir() if d.is_dir() and is_complete(d)]
    need = max((_tag_size(d) for d in previous), default=0) + int(min_free_gb * 2**30)
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise CheckpointError(
            f"{ckpt_dir}: {_amount(free)} free, a checkpoint needs {_amount(need)} "
            "(the last one's size plus checkpoint.min_free_gb)"
        )


def _amount(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


FULL_DISK_BYTES = 64 * 2**20
"""torch.save reports a full disk as a RuntimeError without errno; this little space left means it was."""


def _write_failure(e: Exception, ckpt_dir: Path) -> str:
    """Why a checkpoint write failed, in a few words."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None
    if free is not None and free < FULL_DISK_BYTES:
        return f"no space left on device, {free / 2**20:.1f} MiB free"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _agree(problem: str, dist: DistInfo) -> str:
    """The first rank's problem ('rank R on HOST: ...'), or '' when no rank has one; a collective."""
    if problem:
        problem = f"rank {dist.rank} on {socket.gethostname()}: {problem}"
    return next((p for p in all_gather_object(problem) if p), "")


def save(
    engine: Any,
    ckpt_dir: Path,
    tag: str,
    client_state: dict[str, Any],
    dist: DistInfo,
    min_free_gb: float,
    keep_last: int,
    files: Mapping[str, Callable[[Path], object]] | None = None,
) -> Path:
    """Save on all ranks; rank 0 then writes `files` (name -> writer of a temp path) into the tag,
    marks it COMPLETE and points `latest` at it.

    Every rank checks its own disk first (node-local disks differ), and a write that fails on any
    rank (a full disk, an I/O error) fails the save on all: the partial tag is removed and the
    previous checkpoint stays `latest`.
    """
    try:
        check_free_space(ckpt_dir, min_free_gb)
        problem = ""
    except (CheckpointError, OSError) as e:
        problem = str(e)
    problem = _agree(problem, dist)
    if problem:
        raise CheckpointError(f"{ckpt_dir / tag}: not saved ({problem})")
    tag_dir = ckpt_dir / tag
    if dist.is_main and tag_dir.exists():
        # A leftover from a killed save (or a run resumed from an older tag): never mix files.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(tag_dir)
    barrier()
    problem = ""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        problem = _write_failure(e, ckpt_dir)
        # DeepSpeed's writes sit between its collectives and its closing barrier, where the
        # ranks whose writes succeeded now wait: join them there.
        barrier()
    if not problem and dist.is_main:
        try:
            for name, write in (files or {}).items():
                atomic_write(tag_dir / name, write)
            write_text_atomic(tag_dir / TRAIN_STATE, json.dumps(client_state, indent=1, default=_readable))
            write_text_atomic(tag_dir / COMPLETE, tag + "\n")
        except OSError as e:
            problem = _write_failure(e, ckpt_dir)
    problem = _agree(problem, dist)
    if problem:
        if dist.is_main:
            shutil.rmtree(tag_dir, ignore_errors=True)
        barrier()
        kept = find_latest(ckpt_dir)
        raise CheckpointError(
            f"{tag_dir}: not saved ({problem}); "
            + (f"the last complete checkpoint, {kept}, is intact" if kept else "no earlier checkpoint")
        )
    if dist.is_main:
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


UNIVERSAL_COMMAND = [sys.executable, "-m", "trainer.safe_load", "deepspeed.checkpoint.ds_to_universal"]
"""DeepSpeed's documented converter, run as its command line so that options it adds get their defaults,
with the checkpoint files it reads unpickled weights-only (trainer/safe_load.py)."""


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
    with restricted_unpickling(ckpt_dir / tag):
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it")
    return client_state
