"""Shared fixtures: tiny open_clip models and small webdataset shards written with tarfile + PIL."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


@pytest.fixture(autouse=True)
def _restore_linear():
    """DeepSpeed's ZeRO-3 engine replaces torch.nn.functional.linear for the whole process (its
    memory-efficient linear); a test that builds one in-process must not change later tests' math."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every `gpu`-marked test on a machine without CUDA, so plain `pytest` stays CPU-only."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="gpu test: no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def tiny_model_json(tmp_path_factory) -> Path:
    """A user JSON model config: a 32px ViT with 2 layers in each tower."""
    path = tmp_path_factory.mktemp("models") / "tiny-vit.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


def _png(rng: np.random.Generator, size: int) -> bytes:
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_year(
    root: Path,
    year: str,
    n: int,
    per_shard: int,
    split: str = "train",
    image_size: int = 32,
    corrupt: tuple[int, ...] = (),
    seed: int = 0,
) -> list[str]:
    """Write `n` samples of `year` as shards of `per_shard`; return the sample keys in order."""
    folder = root / split / year
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, int(year) if year.isdigit() else 0])
    keys, sizes = [], {}
    for shard in range(0, n, per_shard):
        name = f"{shard // per_shard:06d}.tar"
        count = min(per_shard, n - shard)
        with tarfile.open(folder / name, "w") as tar:
            for i in range(shard, shard + count):
                key = f"{year}{i:07d}"
                image = b"not an image" if i in corrupt else _png(rng, image_size)
                cls = i % len(COLORS)
                _add(tar, f"{key}.png", image)
                _add(tar, f"{key}.txt", f"a photo of something {COLORS[cls]} from {year}".encode())
                _add(tar, f"{key}.json", json.dumps({"uid": key, "year": int(year)}).encode())
                _add(tar, f"{key}.cls", str(cls).encode())
                keys.append(key)
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return keys


@pytest.fixture
def shard_root(tmp_path) -> Path:
    """Two years of 48 training samples each, in shards of 12."""
    root = tmp_path / "data"
    for year in ("2014", "2015"):
        write_year(root, year, n=48, per_shard=12)
    manifest = {"years": ["2014", "2015"], "splits": {"train": {"2014": 48, "2015": 48}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def one_rank_dataset(sampler: Any, workers: int, micro_batch: int, seed: int) -> Any:
    """A 1-rank StreamDataset over `sampler` with open_clip's 32 px eval transform and tokenizer."""
    import open_clip

    from trainer.data.pipeline import StreamDataset

    return StreamDataset(
        sampler,
        rank=0,
        world=1,
        workers=workers,
        micro_batch=micro_batch,
        preprocess=open_clip.image_transform(32, is_train=False),
        tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=TINY_MODEL["text_cfg"]["context_length"]),
        seed=seed,
    )
