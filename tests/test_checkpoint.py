"""Checkpoints: COMPLETE marker + our own latest, pruning, interrupted saves, fp32 weights per stage."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_ranks
from tests.fs_helpers import small_disk
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine
from trainer.model import create_model, open_clip_state_dict
from trainer.weights.consolidate import load_weights


@pytest.fixture(scope="module")
def dist():
    return init_distributed("gloo")


def _engine(dist, tiny_model_json: Path, stage: int):
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_json}",
            "data.root=/unused",
            f"train.global_batch={2 * dist.world_size}",
            "train.micro_batch=2",
            f"deepspeed.zero_stage={stage}",
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=10, warmup=0)
    image, text = torch.randn(2, 3, 32, 32), torch.randint(1, 300, (2, 16))
    out = engine(image=image, text=text)
    engine.backward((out["image_features"] * out["text_features"]).sum() * out["logit_scale"])
    engine.step()
    return engine


@pytest.mark.timeout(240)
def test_save_marks_complete_prunes_and_skips_interrupted(dist, tiny_model_json: Path, tmp_path: Path) -> None:
    engine = _engine(dist, tiny_model_json, stage=1)
    d = tmp_path / "checkpoints"
    for n in (1, 2, 3):
        ckpt.save(engine, d, f"step-{n}", {"global_step": n}, dist, min_free_gb=0, keep_last=2)
    ckpt.save(engine, d, "year-2014", {"global_step": 4}, dist, min_free_gb=0, keep_last=2)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["step-2", "step-3", "year-2014"]
    assert (d / "latest").read_text().strip() == "year-2014"
    assert ckpt.find_latest(d) == "year-2014"
    # A save killed half-way: files written, no COMPLETE marker, `latest` already moved.
    shutil.copytree(d / "step-3", d / "step-9")
    (d / "step-9" / ckpt.COMPLETE).unlink()
    (d / "latest").write_text("step-9\n")
    assert ckpt.find_latest(d) == "year-2014"
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load(engine, d, "step-9")
    client = ckpt.load(engine, d, "step-3")
    assert client["global_step"] == 3


@pytest.mark.timeout(120)
def test_full_disk_refuses_before_writing(dist, tiny_model_json: Path, tmp_path: Path) -> None:
    engine = _engine(dist, tiny_model_json, stage=0)
    d = tmp_path / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match="GiB free"):
        ckpt.save(engine, d, "step-1", {}, dist, min_free_gb=1e9, keep_last=2)
    assert not (d / "step-1").exists() and not (d / "latest").exists()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp32_weights_in_open_clip_form(dist, tiny_model_json: Path, tmp_path: Path, stage: int) -> None:
    engine = _engine(dist, tiny_model_json, stage=stage)
    ckpt.save(engine, tmp_path, "year-2014", {}, dist, min_free_gb=0, keep_last=2)
    weights = load_weights(tmp_path, "year-2014")
    fresh = create_model(load_config(None, [f"model.name={tiny_model_json}", "data.root=/x"]).model)[0]
    reference = open_clip_state_dict(fresh)
    assert weights.keys() == reference.keys()
    assert all(weights[k].shape == reference[k].shape for k in reference)
    assert weights["logit_scale"].shape == torch.Size([])
    fresh.load_state_dict(weights)
    if stage != 3:
        trained = {k: v.float() for k, v in engine.module.state_dict().items()}
        assert all(torch.equal(trained[k], weights[k]) for k in weights)


@pytest.mark.timeout(120)
def test_universal_conversion_uses_options_deepspeeds_command_line_has() -> None:
    """We drive DeepSpeed's documented converter through its command line; an upgrade that drops or
    renames an option we pass fails here, not in a resume on another number of ranks."""
    import inspect
    import subprocess

    from trainer import checkpoint as ckpt

    passed = [t for t in inspect.getsource(ckpt._convert_universal).split('"') if t.startswith("--")]
    assert passed == [
        "--input_folder",
        "--output_folder",
        "--num_extract_workers",
        "--num_merge_workers",
        "--inject_missing_state",
    ]
    usage = subprocess.run([*ckpt.UNIVERSAL_COMMAND, "--help"], capture_output=True, text=True, timeout=100).stdout
    missing = [flag for flag in passed if flag not in usage]
    assert not missing, f"DeepSpeed's ds_to_universal no longer takes {missing}"


@pytest.mark.timeout(120)
def test_disk_full_mid_write_fails_the_save_and_keeps_the_last_checkpoint(
    dist, tiny_model_json: Path, tmp_path: Path
) -> None:
    """A real small tmpfs: the first save fits; the second passes the free-space check (room for one
    more of the first's size) but is larger, and runs out of space half-way through."""
    engine = _engine(dist, tiny_model_json, stage=1)
    probe = tmp_path / "probe"
    ckpt.save(engine, probe, "step-1", {}, dist, min_free_gb=0, keep_last=2)
    size = sum(p.stat().st_size for p in (probe / "step-1").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", f"{int(size * 2.5) // 1024}k") as disk:
        d = disk / "checkpoints"
        ckpt.save(engine, d, "step-1", {"global_step": 1}, dist, min_free_gb=0, keep_last=2)
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.save(engine, d, "step-2", {"global_step": 2, "log": "x" * 2 * size}, dist, 0, keep_last=2)
        assert "no space left on device" in str(e.value) and "step-1, is intact" in str(e.value)
        assert "\n" not in str(e.value)
        assert not (d / "step-2").exists()
        assert (d / "latest").read_text().strip() == "step-1" and ckpt.find_latest(d) == "step-1"
        assert ckpt.load(engine, d, "step-1")["global_step"] == 1


def _rank_fails_to_write(rank: int, world: int, model: str, out: str, failing: str) -> None:
    """Rank `failing` (or every rank's disk check, 'space') hits the problem; every rank must raise."""
    dist = init_distributed("gloo")
    engine = _engine(dist, Path(model), stage=1)
    d = Path(out) / "checkpoints"
    ckpt.save(engine, d, "step-1", {"global_step": 1}, dist, min_free_gb=0, keep_last=2)
    if failing == "space" and rank == 1:
        usage = shutil.disk_usage(d)
        ckpt.shutil.disk_usage = lambda _: usage._replace(free=10)  # type: ignore[assignment]
    elif failing == "write" and rank == 1:
        # Rank 1's own optimizer shard hits ENOSPC while rank 0's files are written fine.
        def full(*_: object, **__: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        engine.checkpoint_engine.save = full
    try:
        ckpt.save(engine, d, "step-2", {"global_step": 2}, dist, min_free_gb=0, keep_last=2)
    except ckpt.CheckpointError as e:
        (Path(out) / f"rank-{rank}.txt").write_text(str(e))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("failing", ["space", "write"])
def test_one_ranks_disk_problem_fails_the_save_on_every_rank(
    tiny_model_json: Path, tmp_path: Path, failing: str
) -> None:
    run_ranks(_rank_fails_to_write, 2, str(tiny_model_json), str(tmp_path), failing)
    messages = [(tmp_path / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1] and "rank 1 on " in messages[0]
    assert ("MiB free" if failing == "space" else "No space left on device") in messages[0]
    d = tmp_path / "checkpoints"
    assert not (d / "step-2").exists() and ckpt.find_latest(d) == "step-1"
