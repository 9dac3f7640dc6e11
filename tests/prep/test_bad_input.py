"""make_shards on hostile or sloppy input: huge CSV fields, a BOM, non-UTF-8 bytes, image paths
outside the manifest's folder, decompression bombs, oversized tar members. Each is a counted skip
(the job goes on) or one line on stderr with exit 2 and nothing left behind."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import trainer.layout as layout
import trainer.prep.ingest as ingest
from tests.prep.helpers import bomb_png, dataset, make_images, spy_loads, write_input_shards
from tests.prep.test_make_shards import _one_line_error, run

FIELDS = ["image", "caption", "year"]


def write_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8", delimiter: str = ",") -> None:
    with open(path, "w", newline="", encoding=encoding) as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(FIELDS)
        writer.writerows(rows)


def good_rows(folder: Path, count: int) -> list[list[str]]:
    """`count` rows of real images in folder/pics, relative to `folder`."""
    return [[f"pics/{n}", f"photo {i}", "2015"] for i, n in enumerate(make_images(folder / "pics", count))]


def make(capsys, manifest: Path, out: Path, *extra: str) -> tuple[int, str, str, dict]:
    """One in-process run; (exit code, stdout, stderr, manifest.json or {})."""
    code, stdout, err = run(capsys, "--manifest", manifest, "--out", out, "--eval-frac", "0", "--workers", "1", *extra)
    written = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return code, stdout, err, written


def captions(out: Path) -> set[str]:
    return {m["txt"].decode() for year in dataset(out)["train"].values() for m in year.values()}


@pytest.mark.timeout(60)
def test_csv_field_over_the_limit_is_a_counted_bad_row_and_long_captions_are_kept(tmp_path, capsys):
    rows = good_rows(tmp_path, 6)
    long_caption = "word " * 40_000  # 200 KB: over the csv module's default 128 KiB field limit
    rows[1][1] = long_caption
    rows[3][1] = "x" * (16 * 2**20 + 1)  # over any sensible caption: a runaway quote, say
    write_csv(tmp_path / "m.csv", rows)
    code, stdout, err, written = make(capsys, tmp_path / "m.csv", tmp_path / "out", "--max-bad-frac", "0.5")
    assert (code, err) == (0, ""), err
    assert written["skipped"] == {"field_too_large": 1} and "field_too_large 1" in stdout
    assert long_caption.strip() in captions(tmp_path / "out")
    # Over --max-bad-frac: one line, exit 2, and no staging folder left behind.
    code, _, err, _ = make(capsys, tmp_path / "m.csv", tmp_path / "out2", "--max-bad-frac", "0")
    assert code == 2 and "field_too_large 1" in _one_line_error(err)
    assert not (tmp_path / "out2").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_utf8_bom_before_the_header_is_ignored(tmp_path, capsys, kind):
    rows = good_rows(tmp_path, 4)
    path = tmp_path / f"m.{kind}"
    if kind == "jsonl":
        text = "".join(json.dumps(dict(zip(FIELDS, row))) + "\n" for row in rows)
        path.write_text(text, encoding="utf-8-sig")
    else:
        write_csv(path, rows, encoding="utf-8-sig", delimiter="\t" if kind == "tsv" else ",")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    code, _, err, written = make(capsys, path, tmp_path / "out")
    assert (code, err) == (0, ""), err
    assert written["skipped"] == {} and written["options"]["image_col"] == "image"
    assert written["splits"]["train"] == {"2015": 4}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_non_utf8_byte_is_a_counted_bad_row_and_the_job_goes_on(tmp_path, capsys, kind):
    rows = good_rows(tmp_path, 6)
    path = tmp_path / f"m.{kind}"
    if kind == "jsonl":
        lines = [json.dumps({"image": r[0], "caption": r[1], "year": r[2], "note": "n"}).encode() for r in rows]
    else:
        lines = [b"image,caption,year,note"] + [",".join([*r, "n"]).encode() for r in rows]
    lines[2] = lines[2].replace(b"photo", b"caf\xe9")  # Latin-1 in a caption: that row is unusable
    lines[4] = lines[4].replace(b'"n"' if kind == "jsonl" else b",n", b'"\xe9"' if kind == "jsonl" else b",\xe9")
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, stdout, err, written = make(capsys, path, tmp_path / "out", "--max-bad-frac", "0.5")
    assert (code, err) == (0, ""), err
    # The byte in a column make_shards does not read (note) does not spoil its row.
    assert written["skipped"] == {"bad_encoding": 1} and "bad_encoding 1" in stdout
    assert written["seen"] == 6 and written["splits"]["train"] == {"2015": 5}


@pytest.mark.timeout(60)
def test_image_paths_must_stay_inside_the_manifest_folder_or_image_root(tmp_path, capsys):
    folder = tmp_path / "set"
    rows = good_rows(folder, 4)
    outside = make_images(tmp_path / "elsewhere", 1)[0]
    escape = tmp_path / "elsewhere" / outside
    bad = [
        f"../elsewhere/{outside}",  # a relative path climbing out
        str(escape),  # an absolute path outside
        "/etc/passwd",
        f"file://{escape}",  # a local URL is a path too
        f"pics/../../elsewhere/{outside}",
    ]
    rows += [[ref, f"outside {i}", "2015"] for i, ref in enumerate(bad)]
    rows.append(["pics/../pics/im000.png", "inside after all", "2015"])
    rows.append([str(folder / "pics" / "im001.jpg"), "absolute but inside", "2015"])
    write_csv(folder / "m.csv", rows)
    code, stdout, err, written = make(capsys, folder / "m.csv", tmp_path / "out", "--max-bad-frac", "0.9")
    assert (code, err) == (0, ""), err
    assert written["skipped"] == {"image_outside_root": 5} and "image_outside_root 5" in stdout
    assert captions(tmp_path / "out") == {f"photo {i}" for i in range(4)} | {"inside after all", "absolute but inside"}

    # --image-root: relative paths resolve against it, and every path must lie inside it.
    inside_set = [[str(folder / "pics" / "im000.png"), "x0", "2015"], ["../set/pics/im001.jpg", "x1", "2015"]]
    write_csv(tmp_path / "m2.csv", [[str(escape), "absolute", "2015"], [outside, "relative", "2015"], *inside_set])
    code, _, err, written = make(
        capsys, tmp_path / "m2.csv", tmp_path / "out2", "--image-root", tmp_path / "elsewhere", "--max-bad-frac", "0.6"
    )
    assert (code, err) == (0, ""), err
    assert written["skipped"] == {"image_outside_root": 2} and written["options"]["image_root"] == str(
        tmp_path / "elsewhere"
    )
    assert captions(tmp_path / "out2") == {"absolute", "relative"}
    code, _, err, _ = make(capsys, tmp_path / "m2.csv", tmp_path / "out3", "--image-root", tmp_path / "nowhere")
    assert code == 2 and "--image-root" in _one_line_error(err) and not (tmp_path / "out3").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("image_size", [None, 16])
def test_image_over_the_pixel_limit_is_skipped_undecoded(tmp_path, capsys, monkeypatch, image_size):
    rows = good_rows(tmp_path, 4)
    width = 10_000
    (tmp_path / "pics" / "bomb.png").write_bytes(bomb_png(width, layout.MAX_IMAGE_PIXELS // width + 1))
    rows.append(["pics/bomb.png", "a bomb", "2015"])
    write_csv(tmp_path / "m.csv", rows)
    loaded = spy_loads(monkeypatch)
    size = ["--image-size", str(image_size)] if image_size else []
    code, stdout, err, written = make(capsys, tmp_path / "m.csv", tmp_path / "out", "--max-bad-frac", "0.5", *size)
    assert (code, err) == (0, ""), err
    assert written["skipped"] == {"image_too_large": 1} and "image_too_large 1" in stdout
    assert loaded and max(w * h for w, h in loaded) <= layout.MAX_IMAGE_PIXELS


@pytest.mark.timeout(60)
def test_oversized_tar_member_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    uids = [f"{i:032x}" for i in range(8)]
    write_input_shards(tmp_path / "in", uids, 4, {u: {"year": 2015} for u in uids})
    # Replace one sample's JPEG by a ~12 KB PNG; the others are ~1 KB. Real limit: hundreds of MB.
    shard = tmp_path / "in" / "00000.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    big = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(big, "PNG")
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name == "000000001.jpg":
                info.name, data = "000000001.png", big.getvalue()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(ingest, "MAX_MEMBER_BYTES", 4096, raising=False)
    read_sizes: list[int] = []
    original = tarfile.TarFile.extractfile

    def extractfile(self, member):
        read_sizes.append(member.size)
        return original(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "--shards", tmp_path / "in", "--out", out, "--eval-frac", "0", "--workers", "1", "--max-bad-frac", "0.5"
    )
    assert (code, err) == (0, ""), err
    written = json.loads((out / "manifest.json").read_text())
    # write_input_shards also cuts sample 4's JPEG short and drops sample 6's caption.
    assert written["skipped"] == {"corrupt_image": 1, "member_too_large": 1, "missing_caption": 1}
    assert "member_too_large 1" in stdout and read_sizes and max(read_sizes) <= 4096
