"""tools/make_shards.py end to end on inputs made here: manifests, image folders, shards, uid tables, synthetic."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.prep.helpers import dataset, make_images, tree, truncate, uid_pairs, write_input_shards
from tools.make_shards import main as make_shards_main
from trainer.prep import synthetic
from trainer.prep.manifests import parse_when
from trainer.prep.records import eval_draw

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_shards.py"


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    code = make_shards_main([str(a) for a in args] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.timeout(60)
def test_parquet_manifest_resizes_filters_years_and_splits_by_uid(tmp_path, capsys):
    names = make_images(tmp_path / "pics", 30)
    uids = [f"{i:032x}" for i in range(30)]
    years = [2014 + i % 3 for i in range(30)]
    table = pa.table(
        {
            "filepath": [f"pics/{n}" for n in names],
            "text": [f"picture number {i}" for i in range(30)],
            "date": [datetime(y, 1 + i % 12, 3, 12, tzinfo=timezone.utc) for i, y in enumerate(years)],
            "uid": uids,
            "label": [i % 4 for i in range(30)],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        "--manifest",
        tmp_path / "m.parquet",
        "--out",
        out,
        "--years",
        "2014-2015",
        "--eval-frac",
        "0.3",
        "--class-col",
        "label",
        "--image-size",
        "16",
        "--image-format",
        "png",
        "--workers",
        "2",
    )
    assert (code, err) == (0, ""), err
    data = dataset(out)
    kept = [i for i in range(30) if years[i] != 2016]
    for i in kept:
        split = "eval" if eval_draw(uids[i]) < 0.3 else "train"
        members = data[split][str(years[i])][uids[i]]
        meta = json.loads(members["json"])
        assert (meta["uid"], meta["year"], meta["timestamp"][:4]) == (uids[i], years[i], str(years[i]))
        assert members["txt"].decode() == f"picture number {i}"
        assert members["cls"] == str(i % 4).encode()
        assert Image.open(io.BytesIO(members["png"])).size == (16, 16)
    assert sum(len(keys) for split in data.values() for keys in split.values()) == len(kept)
    assert {"train", "eval"} <= set(data) and set(data["train"]) == {"2014", "2015"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["years"] == ["2014", "2015"]
    assert manifest["skipped"] == {"year_not_selected": 10}
    assert manifest["options"]["image_col"] == "filepath" and manifest["options"]["time_col"] == "date"
    assert manifest["format"] == "tic-trainer-shards/1" and manifest["created_by"] == "tools/make_shards.py"
    assert "2015" in stdout and "year_not_selected 10" in stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_image_folder_manifest_skips_and_counts_bad_rows(tmp_path, capsys, kind):
    names = make_images(tmp_path / "pics", 14)
    truncate(tmp_path / "pics" / names[3])  # a JPEG cut in half: only a full decode notices
    times = ["2014-03-01", "1420070400", "2016-07-04T10:00:00+02:00", "2014"] * 4
    rows = [{"image": f"pics/{n}", "caption": f"photo {i}", "timestamp": times[i]} for i, n in enumerate(names)]
    rows[5]["caption"] = " "
    rows[7]["timestamp"] = "yesterday"
    rows[9]["image"] = "pics/not-there.jpg"
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, ["image", "caption", "timestamp"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, _, err = run(capsys, "--manifest", path, "--out", out, "--eval-frac", "0", "--max-bad-frac", "0.3")
    assert (code, err) == (0, ""), err
    data = dataset(out)
    assert set(data) == {"train"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_timestamp": 1, "corrupt_image": 1, "missing_caption": 1, "missing_image": 1}
    assert manifest["seen"] == 14 and manifest["splits"]["eval"] == {}
    good = [i for i in range(14) if i not in (3, 5, 7, 9)]
    assert manifest["splits"]["train"] == dict(Counter(str(parse_when(times[i])[0]) for i in good))
    by_caption = {m["txt"].decode(): m for year in data["train"].values() for m in year.values()}
    for i in good:
        members = by_caption[f"photo {i}"]
        ext = names[i].rsplit(".", 1)[1]
        assert members[ext] == (tmp_path / "pics" / names[i]).read_bytes()  # kept as is, not re-encoded
        assert json.loads(members["json"])["year"] == parse_when(times[i])[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("years_from", ["uid-years", "uid-lists", "year-field"])
def test_existing_shards_get_years_from_table_lists_or_json(tmp_path, capsys, years_from):
    uids = [f"{(i * 7919) % 2**32:08x}" * 4 for i in range(24)]
    year_of = {u: 2014 + i % 2 for i, u in enumerate(uids[:21])}  # the last three uids are in no table
    meta = {u: {"timestamp": f"{y}-06-01T00:00:00Z"} for u, y in year_of.items()} if years_from == "year-field" else {}
    write_input_shards(tmp_path / "in", uids, 10, meta)
    args = ["--shards", tmp_path / "in", "--out", tmp_path / "out", "--eval-frac", "0.25", "--max-bad-frac", "0.25"]
    if years_from == "uid-years":
        pq.write_table(pa.table({"uid": list(year_of), "year": list(year_of.values())}), tmp_path / "years.parquet")
        args += ["--uid-years", tmp_path / "years.parquet"]
    elif years_from == "uid-lists":
        (tmp_path / "lists").mkdir()
        for year in (2014, 2015):
            listed = sorted(u for u, y in year_of.items() if y == year)
            np.save(tmp_path / "lists" / f"{year}.npy", np.sort(uid_pairs(listed)))
        # Listed twice: the earlier year wins.
        np.save(tmp_path / "lists" / "uids_2016.npy", np.array([uids[0], uids[1]]))
        args += ["--uid-lists", tmp_path / "lists"]
    else:
        args += ["--year-field", "timestamp"]
    code, _, err = run(capsys, *args)
    assert (code, err) == (0, ""), err
    data = dataset(tmp_path / "out")
    unlisted = "missing_year" if years_from == "year-field" else "uid_not_listed"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == {"corrupt_image": 1, "missing_caption": 1, unlisted: 3}
    assert manifest["seen"] == 24 and manifest["years"] == ["2014", "2015"]
    written = {key: (split, int(year)) for split, years in data.items() for year, keys in years.items() for key in keys}
    expected = {
        u: ("eval" if eval_draw(u) < 0.25 else "train", y) for u, y in year_of.items() if u not in (uids[4], uids[6])
    }
    assert written == expected
    some = data["train"]["2014"][next(iter(data["train"]["2014"]))]
    assert set(some) == {"jpg", "txt", "json"} and json.loads(some["json"])["key"].startswith("0000")


def synthetic_args(out: Path, *extra: str) -> list[str]:
    return [
        "--synthetic",
        "--out",
        str(out),
        "--years",
        "2014-2016",
        "--samples-per-year",
        "600",
        "--eval-samples",
        "100",
        "--shard-size",
        "100",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted synthetic run in this process with one worker."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert make_shards_main(synthetic_args(out, "--workers", "1", "--no-progress")) == 0
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stage", ["ingest", "pack"])
def test_killed_run_resumes_to_identical_bytes(tmp_path, reference_run, stage):
    out = tmp_path / "out"
    command = [sys.executable, str(TOOL), *synthetic_args(out, "--workers", "2", "--no-progress")]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            units = list((out / ".make_shards" / "units").glob("*.json"))
            if (stage == "ingest" and units) or (stage == "pack" and list((out / "train").glob("*/*.tar"))):
                break
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    time.sleep(0.2)  # workers die with their parent (PR_SET_PDEATHSIG); let them go
    assert not (out / "manifest.json").exists() and (out / ".make_shards" / "options.json").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert tree(out) == tree(reference_run)


@pytest.mark.timeout(60)
def test_concept_schedule_drifts_year_by_year(tmp_path, capsys):
    years = [2014, 2015, 2016, 2017]
    code, _, err = run(
        capsys,
        "--synthetic",
        "--out",
        tmp_path / "out",
        "--years",
        "2014-2017",
        "--samples-per-year",
        "320",
        "--eval-samples",
        "0",
        "--workers",
        "1",
    )
    assert (code, err) == (0, ""), err
    data = dataset(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    classes = manifest["classes"]
    assert manifest["templates"] and all("{}" in t for t in manifest["templates"])
    histograms = {}
    for year in years:
        samples = data["train"][str(year)].values()
        histograms[year] = Counter(int(m["cls"]) for m in samples)
        assert sorted(histograms[year]) == manifest["classes_by_year"][str(year)]
        assert min(histograms[year].values()) >= 5  # every active class really shows up
        for members in samples:
            colour, shape = classes[int(members["cls"])].split()
            caption = members["txt"].decode()
            assert colour in caption and shape in caption
    for year in years[1:]:
        new = set(histograms[year]) - set().union(*(histograms[y] for y in years if y < year))
        assert len(new) >= len(histograms[year]) // 2  # most of each year's classes are new
    assert not set(histograms[2014]) & (set(histograms[2016]) | set(histograms[2017]))  # retired for good
    assert not set(histograms[2015]) & set(histograms[2017])
    vocabulary = {y: {w for m in data["train"][str(y)].values() for w in m["txt"].decode().split()} for y in years}
    assert "circle" in vocabulary[2014] and "circle" not in vocabulary[2016]


@pytest.mark.timeout(30)
def test_synthetic_years_differ_in_words_and_seed_changes_pixels():
    first, second = synthetic.year_concepts(0), synthetic.year_concepts(2)
    assert not set(first.shapes) & set(second.shapes) and not set(first.colours) & set(second.colours)
    a = synthetic.draw_sample(0, np.random.default_rng([0, 1]), 32)
    b = synthetic.draw_sample(0, np.random.default_rng([0, 1]), 32)
    c = synthetic.draw_sample(0, np.random.default_rng([1, 1]), 32)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:] and not np.array_equal(a[0], c[0])
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_shards: error: "), err
    return lines[0]


@pytest.mark.timeout(60)
def test_user_errors_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    names = make_images(tmp_path / "pics", 4)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption,year\n" + "".join(f"pics/{n},cap {i},2015\n" for i, n in enumerate(names)))
    out = tmp_path / "out"

    code, _, err = run(capsys, "--manifest", tmp_path / "missing.csv", "--out", out)
    assert code == 2 and "missing.csv" in _one_line_error(err) and not out.exists()

    code, _, err = run(capsys, "--manifest", manifest, "--out", manifest / "sub")
    assert code == 2 and "cannot write output" in _one_line_error(err)

    truncate(tmp_path / "pics" / names[1])
    code, _, err = run(capsys, "--manifest", manifest, "--out", out, "--max-bad-frac", "0.2")
    assert code == 2 and "--max-bad-frac" in _one_line_error(err) and not out.exists()

    code, _, err = run(capsys, "--manifest", manifest, "--out", out, "--max-bad-frac", "0.3", "--eval-frac", "0")
    assert (code, err) == (0, "")
    before = tree(out)
    code, _, err = run(capsys, "--manifest", manifest, "--out", out, "--max-bad-frac", "0.3", "--seed", "5")
    assert code == 2 and "--overwrite" in _one_line_error(err) and tree(out) == before

    code, stdout, err = run(capsys, "--manifest", manifest, "--out", out, "--max-bad-frac", "0.3", "--eval-frac", "0")
    assert (code, err) == (0, "") and "already complete" in stdout and tree(out) == before
    code, _, err = run(
        capsys, "--manifest", manifest, "--out", out, "--max-bad-frac", "0.3", "--seed", "5", "--overwrite"
    )
    assert (code, err) == (0, "") and json.loads((out / "manifest.json").read_text())["options"]["seed"] == 5

    code, _, err = run(capsys, "--manifest", manifest, "--out", tmp_path / "o2", "--shard-size", "0")
    assert code == 2 and "--shard-size" in _one_line_error(err) and not (tmp_path / "o2").exists()
    code, _, err = run(capsys, "--synthetic", "--manifest", manifest, "--out", tmp_path / "o2")
    assert code == 2 and "not allowed" in _one_line_error(err)


@pytest.mark.timeout(60)
def test_cli_subprocess_reports_error_on_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "no .tar shards" in _one_line_error(result.stderr) and not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_memory_output_through_fsspec(capsys):
    url = "memory://make-shards-test/out"
    fs = fsspec.filesystem("memory")
    try:
        args = [
            "--synthetic",
            "--out",
            url,
            "--years",
            "2020-2021",
            "--samples-per-year",
            "60",
            "--eval-samples",
            "20",
            "--shard-size",
            "25",
            "--workers",
            "2",
        ]
        code, _, err = run(capsys, *args)
        assert (code, err) == (0, ""), err
        sizes = json.loads(fs.cat_file("/make-shards-test/out/train/2021/sizes.json"))
        assert sizes == {"000000.tar": 20, "000001.tar": 20, "000002.tar": 20}
        with fs.open("/make-shards-test/out/train/2021/000001.tar", "rb") as file, tarfile.open(fileobj=file) as tar:
            assert len(tar.getnames()) == 20 * 4
        assert not fs.exists("/make-shards-test/out/.make_shards")
        manifest = json.loads(fs.cat_file("/make-shards-test/out/manifest.json"))
        assert manifest["splits"] == {"train": {"2020": 60, "2021": 60}, "eval": {"2020": 20, "2021": 20}}
        code, stdout, _ = run(capsys, *args)
        assert code == 0 and "already complete" in stdout
    finally:
        fs.rm("/make-shards-test", recursive=True)


@pytest.mark.timeout(30)
def test_synthetic_shards_shuffle_and_read_back_with_webdataset(reference_run):
    import webdataset as wds

    keys = [
        s["__key__"]
        for s in wds.WebDataset(str(reference_run / "train/2015/000000.tar"), shardshuffle=False).decode("pil")
    ]
    assert len(keys) == 100 and keys != sorted(keys)
    sample = next(iter(wds.WebDataset(str(reference_run / "eval/2015/000000.tar"), shardshuffle=False).decode("pil")))
    assert sample["png"].size == (32, 32) and sample["json"]["year"] == 2015 and isinstance(sample["cls"], int)
    assert sample["txt"] == sample["json"]["caption"]
