"""Hostile samples at training time: decompression bombs, oversized tar members, and a corrupt-data
error raised in a DataLoader worker reaching the user as one line."""

from __future__ import annotations

import io
import multiprocessing
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import trainer.data.shards as shards
import trainer.layout as layout
from tests.conftest import write_year
from tests.data.test_pipeline import PREPROCESS, build, run, write_root
from tests.dist_helpers import clean_env
from tests.prep.helpers import bomb_png, spy_loads
from trainer.data.loading import RankLoader
from trainer.data.pipeline import build_loader, decode
from trainer.data.shards import DataError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_the_pixel_limit_is_refused_before_decoding(monkeypatch):
    loaded = spy_loads(monkeypatch)
    small = io.BytesIO()
    Image.new("RGB", (40, 30)).save(small, "PNG")
    assert not isinstance(decode({"__key__": "s", "png": small.getvalue(), "txt": b"ok"}, PREPROCESS, seed=0), str)
    assert (40, 30) in loaded  # the spy sees real decodes
    loaded.clear()
    width = 10_000
    height = layout.MAX_IMAGE_PIXELS // width + 1
    sample = {"__key__": "k", "png": bomb_png(width, height), "txt": b"a caption"}
    assert decode(sample, PREPROCESS, seed=0) == "image_too_large"
    # PIL's own DecompressionBombError (twice its warning size) is the same reason, not bad_image.
    sample["png"] = bomb_png(20_000, 2 * height)
    assert decode(sample, PREPROCESS, seed=0) == "image_too_large"
    assert loaded == []


def _rewrite_member(shard: Path, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(shard, "w") as tar:
        for info, old in members:
            new = data if info.name == name else old
            info.size = len(new)
            tar.addfile(info, io.BytesIO(new))


@pytest.mark.timeout(60)
def test_oversized_tar_member_is_skipped_unread_and_counted(tmp_path, monkeypatch):
    keys = {
        "2014": write_year(tmp_path, "2014", 40, 10, image_size=16),
        "2015": write_year(tmp_path, "2015", 24, 6, image_size=16),
    }
    # A 64 px noise PNG is ~12 KB; the 16 px ones are under 1 KB. Real limit: hundreds of MB.
    big = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(big, "PNG")
    _rewrite_member(tmp_path / "train/2014/000000.tar", f"{keys['2014'][2]}.png", big.getvalue())
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 4096, raising=False)
    ds = build(str(tmp_path), {"2014": 40, "2015": 24}, workers=0, micro=4, lanes=1, max_bad_frac=0.2)
    bad: dict[str, int] = {}
    for batch in run(ds):
        for reason, n in batch["bad"].items():
            bad[reason] = bad.get(reason, 0) + n
    assert bad == {"member_too_large": 1, "substituted": 1}


@pytest.mark.timeout(60)
def test_worker_data_error_reaches_the_rank_as_one_line_and_ends_the_workers(tmp_path):
    write_root(tmp_path, corrupt=tuple(range(0, 40, 2)))
    ds = build(str(tmp_path), {"2014": 40}, workers=2, micro=4, max_bad_frac=0.05)
    before = set(multiprocessing.active_children())
    with pytest.raises(DataError) as caught:
        list(RankLoader(build_loader(ds)))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert re.fullmatch(r"\S+/train/2014/00000\d\.tar: 6 of \d+ samples of stream \d are corrupt .*", message)
    # torch's re-raise keeps the iterator alive in a cycle; its workers (which ignore SIGTERM) must
    # not be left for interpreter exit, which would wait for them forever.
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.reliability
@pytest.mark.timeout(300)
def test_corrupt_data_error_in_a_loader_worker_is_one_line_exit_2(tmp_path, tiny_model_json):
    root = tmp_path / "data"
    write_year(root, "2014", n=96, per_shard=24, corrupt=tuple(range(0, 96, 3)))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"data.root={root}",
        f"model.name={tiny_model_json}",
        f"logging.run_dir={tmp_path / 'runs'}",
        "train.global_batch=8",
        "train.micro_batch=8",
        "train.samples=96",
        "data.workers=2",
        "plan.years=[2014]",
        "logging.progress=false",
    ]
    # Before the fix the rank also hung at exit, joining a worker that ignores SIGTERM.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=280)
    # torch logs this once at import on a machine without CUDA; it is not ours to silence.
    lines = [line for line in proc.stderr.strip().splitlines() if "No CUDA runtime is found" not in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("train: error: ") and "more than data.max_bad_frac=0.01" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
