"""Inputs for the make_shards tests, made on the fly (images, img2dataset-style shards), and output readers."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile


def tree(root: Path) -> dict[str, bytes]:
    """Every file below `root` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shard_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, in file order."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def dataset(root: Path) -> dict[str, dict[str, dict[str, dict[str, bytes]]]]:
    """{split: {year: {key: members}}} of a finished output, checking sizes.json against the tars."""
    result: dict = {}
    for split in ("train", "eval"):
        for folder in sorted((root / split).glob("*")) if (root / split).exists() else []:
            sizes = json.loads((folder / "sizes.json").read_text())
            assert sorted(sizes) == sorted(p.name for p in folder.glob("*.tar"))
            for name, count in sizes.items():
                samples = shard_samples(folder / name)
                assert len(samples) == count
                for key, members in samples:
                    assert "." not in key
                    assert key not in result.get(split, {}).get(folder.name, {})
                    result.setdefault(split, {}).setdefault(folder.name, {})[key] = members
    return result


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Real JPEG and PNG files of varied sizes; returns their names relative to `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(20 + 3 * i, 30 + i, 3), dtype=np.uint8)
        name = f"im{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def truncate(path: Path) -> None:
    """Cut a file in half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_input_shards(folder: Path, uids: list[str], per_shard: int, meta: dict[str, dict]) -> None:
    """img2dataset/DataComp-style shards: NNNNN.tar with .jpg/.txt/.json, plus their _stats.json sidecars."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for shard in range(0, len(uids), per_shard):
        name = f"{shard // per_shard:05d}"
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for i in range(shard, min(shard + per_shard, len(uids))):
                key = f"{name}{i:04d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
                members = {
                    "jpg": buffer.getvalue(),
                    "txt": f"caption {i}".encode(),
                    "json": json.dumps({"uid": uids[i], "key": key, **meta.get(uids[i], {})}).encode(),
                }
                if i == 4:
                    members["jpg"] = members["jpg"][:100]
                if i == 6:
                    del members["txt"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{name}_stats.json").write_text('{"successes": 1}')


def uid_pairs(uids: list[str]) -> np.ndarray:
    """DataComp's u8,u8 form of 32-hex-digit uids."""
    return np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: a few KB on disk, any size decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def spy_loads(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of every image PIL decodes from now on."""
    loaded: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):
        loaded.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loaded
