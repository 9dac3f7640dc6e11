"""TiC evaluation end to end: 2 ranks = 1 rank = brute force on real shards, the CLI on .pt files and
on a DeepSpeed run, classes from the manifest."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import trainer.eval.data
from tests.conftest import COLORS, write_year
from tests.dist_helpers import run_ranks
from tools.evaluate import main
from trainer.config import ModelConfig, load_config, save_config
from trainer.data.shards import iter_samples, open_shard
from trainer.distributed import init_distributed
from trainer.eval.data import load_classes
from trainer.eval.evaluator import EvalOptions, Evaluator
from trainer.eval.report import read_matrix
from trainer.model import create_model
from trainer.weights.open_clip import read_open_clip_checkpoint

TEMPLATES = ["a photo of something {}.", "{} things"]


# ---------------------------------------------------------------- real shards, ranks, brute force


def _eval_data(root: Path) -> Path:
    """Eval years 2014 and 2015: 21 samples in shards of 8; one corrupt image, one sample listed but missing."""
    write_year(root, "2014", n=21, per_shard=8, split="eval")
    write_year(root, "2015", n=21, per_shard=8, split="eval", corrupt=(5,))
    sizes = root / "eval" / "2014" / "sizes.json"
    sizes.write_text(json.dumps({**json.loads(sizes.read_text()), "000002.tar": 6}))
    manifest = {"classes": COLORS, "templates": TEMPLATES, "classes_by_year": {"2015": [0, 1, 2, 3, 4, 5]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _weights(model_json: Path, seed: int, path: Path) -> Path:
    torch.manual_seed(seed)
    model = create_model(ModelConfig(name=str(model_json)))[0]
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1, "name": "tiny"}, path
    )
    return path


def _rank_eval(rank: int, world: int, root: str, model_json: str, weights: str, out: str) -> None:
    evaluator = Evaluator(ModelConfig(name=model_json), root, None, EvalOptions(batch_size=4), init_distributed("gloo"))
    results = evaluator.evaluate(read_open_clip_checkpoint(Path(weights)))
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def _brute_force(root: Path, year: str, model_json: Path, weights: dict) -> dict[str, float]:
    """Every usable sample encoded one at a time; rankings by sorting (score desc, index asc)."""
    model, _, preprocess, tokenizer = create_model(ModelConfig(name=str(model_json)))
    model.load_state_dict(weights)
    model.eval()
    images, captions, labels = [], [], []
    for shard in sorted((root / "eval" / year).glob("*.tar")):
        with open_shard(str(shard)) as f:
            for s in iter_samples(str(shard), f):
                try:
                    image = Image.open(io.BytesIO(s["png"])).convert("RGB")
                except OSError:  # the corrupt sample
                    continue
                images.append(preprocess(image))
                captions.append(s["txt"].decode())
                labels.append(int(s["cls"]))
    with torch.inference_mode():
        img = torch.cat([F.normalize(model.encode_image(x[None]), dim=-1) for x in images])
        txt = torch.cat([F.normalize(model.encode_text(tokenizer([c])), dim=-1) for c in captions])
        prompts = torch.cat(
            [F.normalize(model.encode_text(tokenizer([t.replace("{}", c)])), dim=-1) for c in COLORS for t in TEMPLATES]
        )
    classes = F.normalize(prompts.view(len(COLORS), len(TEMPLATES), -1).mean(1), dim=-1)
    n = len(images)
    out = {}
    for name, q, c in (("i2t", img, txt), ("t2i", txt, img)):
        scores = (q @ c.T).numpy()
        for prefix, match in (("", lambda i, j: captions[i] == captions[j]), ("strict_", lambda i, j: i == j)):
            ranks = [
                next(p for p, j in enumerate(sorted(range(n), key=lambda j: (-scores[i, j], j))) if match(i, j))
                for i in range(n)
            ]
            for k in (1, 5, 10):
                out[f"{prefix}{name}_R{k}"] = sum(r < k for r in ranks) / n
    logits = (img @ classes.T).numpy()
    allowed = [0, 1, 2, 3, 4, 5] if year == "2015" else list(range(len(COLORS)))
    logits[:, [c for c in range(len(COLORS)) if c not in allowed]] = -np.inf
    order = [sorted(range(len(COLORS)), key=lambda c: (-logits[i, c], c)) for i in range(n)]
    hit1 = [order[i][0] == labels[i] for i in range(n)]
    out["zs_top1"] = sum(hit1) / n
    out["zs_top5"] = sum(labels[i] in order[i][:5] for i in range(n)) / n
    per_class = [np.mean([h for h, y in zip(hit1, labels) if y == c]) for c in sorted(set(labels))]
    out["zs_balanced"] = float(np.mean(per_class))
    return out


@pytest.mark.timeout(150)
def test_two_ranks_equal_one_rank_equal_brute_force(tmp_path, tiny_model_json, monkeypatch):
    root = _eval_data(tmp_path / "data")
    weights_path = _weights(tiny_model_json, 3, tmp_path / "w.pt")
    run_ranks(_rank_eval, 2, str(root), str(tiny_model_json), str(weights_path), str(tmp_path))
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert two[0] == two[1]

    opened = []
    real_open = trainer.eval.data.open_shard
    monkeypatch.setattr(trainer.eval.data, "open_shard", lambda url: opened.append(url) or real_open(url))
    weights = read_open_clip_checkpoint(weights_path)
    evaluator = Evaluator(
        ModelConfig(name=str(tiny_model_json)), str(root), None, EvalOptions(batch_size=4), init_distributed("gloo")
    )
    one = evaluator.evaluate(weights)
    assert one == two[0]
    assert one["2014"]["samples"] == 21 and one["2014"]["skipped"] == 1  # listed in sizes.json, not in the tar
    assert one["2015"]["samples"] == 20 and one["2015"]["skipped"] == 1  # corrupt image
    for year in ("2014", "2015"):
        expected = _brute_force(root, year, tiny_model_json, weights)
        assert {k: one[year][k] for k in expected} == pytest.approx(expected, abs=1e-12)
        assert one[year]["mean_R1"] == pytest.approx((one[year]["i2t_R1"] + one[year]["t2i_R1"]) / 2)
    # Decoded images are cached: a second checkpoint reads no shard; without a cache it re-reads them.
    assert len(opened) == 6
    assert evaluator.evaluate(weights) == one and len(opened) == 6
    uncached = Evaluator(
        ModelConfig(name=str(tiny_model_json)),
        str(root),
        ["2015"],
        EvalOptions(batch_size=4, cache_mb=0, tasks=("retrieval",)),
        init_distributed("gloo"),
    )
    first = uncached.evaluate(weights)
    assert uncached.evaluate(weights) == first and len(opened) == 12
    assert set(first["2015"]) == {k for k in one["2015"] if not k.startswith("zs_")}
    # What the training loop does: an Evaluator from the run config, given the live (non-ZeRO-3) module.
    cfg = load_config(None, [f"model.name={tiny_model_json}", f"data.root={root}", "eval.batch_size=4"])
    model = create_model(cfg.model)[0]
    model.load_state_dict(weights)
    assert Evaluator.from_config(cfg, init_distributed("gloo")).evaluate(model) == one


# ---------------------------------------------------------------- the CLI and the matrix


def _three_years(root: Path) -> Path:
    for year in ("2014", "2015", "2016"):
        write_year(root, year, n=12, per_shard=5, split="eval")
    (root / "manifest.json").write_text(json.dumps({"classes": COLORS, "templates": TEMPLATES}))
    return root


@pytest.mark.timeout(120)
def test_cli_builds_the_matrix_of_three_pt_checkpoints(tmp_path, tiny_model_json, capsys):
    root = _three_years(tmp_path / "data")
    files = [
        str(_weights(tiny_model_json, seed, tmp_path / f"ckpt_{year}.pt"))
        for seed, year in enumerate(("2014", "2015", "2016"))
    ]
    out = tmp_path / "eval"
    argv = [
        "--checkpoints",
        *files,
        "--model",
        str(tiny_model_json),
        "--data",
        str(root),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--heatmaps",
        "mean_R1",
        "zs_top1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ID    BWT    FWT   mean" in printed and "mean_R1 (%)" in printed and "zs_top1 (%)" in printed
    m = read_matrix(out / "matrix.json")
    assert [c.name for c in m.checkpoints] == ["2014", "2015", "2016"] and m.years == ["2014", "2015", "2016"]
    g = m.grid("mean_R1")
    s = json.loads((out / "matrix.json").read_text())["summary"]["mean_R1"]
    assert s["in_domain"] == pytest.approx((g[0][0] + g[1][1] + g[2][2]) / 3)
    assert s["backward"] == pytest.approx((g[1][0] + g[2][0] + g[2][1]) / 3)
    assert s["forward"] == pytest.approx((g[0][1] + g[0][2] + g[1][2]) / 3)
    assert s["mean"] == pytest.approx(sum(map(sum, g)) / 9)
    assert s["checkpoints"]["2015"] == pytest.approx(
        {"in_domain": g[1][1], "backward": g[1][0], "forward": g[1][2], "mean": sum(g[1]) / 3}
    )
    assert len({tuple(row) for row in g}) == 3  # three different models
    meta = json.loads((out / "matrix.json").read_text())
    assert "position-based" in meta["metrics"]["strict_i2t_R1"] and "caption" in meta["metrics"]["i2t_R1"]
    with open(out / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and rows[1]["relation"] == "forward" and rows[3]["relation"] == "backward"
    assert float(rows[4]["mean_R1"]) == pytest.approx(g[1][1], abs=1e-6)
    assert sorted(p.name for p in out.glob("*.png")) == ["heatmap_mean_R1.png", "heatmap_zs_top1.png"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--run", "{tmp}/nope"], "not a run folder"),
        (["--checkpoints", "{tmp}/bad.pt", "--data", "{tmp}"], "--model: needed"),
        (
            ["--checkpoints", "{tmp}/bad.pt", "--model", "{model}", "--data", "{tmp}"],
            "not a loadable open_clip checkpoint",
        ),
        (["--checkpoints", "{tmp}/bad.pt", "--model", "{model}", "--data", "{tmp}", "--years", "1999"], "no year 1999"),
        (["--compare", "{tmp}/a", "--run", "{tmp}/b"], "--compare takes run folders only"),
        (["--run", "{tmp}/r", "--heatmaps", "R1"], "--heatmaps: unknown metric R1"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, tiny_model_json, capsys, argv, message):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    write_year(tmp_path, "2014", n=2, per_shard=2, split="eval")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_model_json)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error: ") and message in err[0]


def _deepspeed_run(run: Path, data: Path, model_json: Path) -> None:
    """A run folder whose first step trained on 2014-2015 and second on 2016, saved by DeepSpeed."""
    from trainer import checkpoint as ckpt
    from trainer.engine import build_engine

    dist = init_distributed("gloo")
    cfg = load_config(
        None,
        [
            f"model.name={model_json}",
            f"data.root={data}",
            "train.global_batch=2",
            "train.micro_batch=2",
            "deepspeed.zero_stage=0",
            f"logging.name={run.name}",
        ],
    )
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    steps = [{"tag": "2015", "new_years": ["2014", "2015"]}, {"tag": "2016", "new_years": ["2016"]}]
    (run / "plan.json").write_text(json.dumps({"strategy": "sequential", "steps": steps}))
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=10, warmup=0)
    for tag in ("2015", "2016"):
        out = engine(image=torch.randn(2, 3, 32, 32), text=torch.randint(1, 300, (2, 16)))
        engine.backward((out["image_features"] * out["text_features"]).sum())
        engine.step()
        ckpt.save(engine, run / "checkpoints", f"year-{tag}", {"global_step": 1}, dist, min_free_gb=0, keep_last=2)
    (run / "checkpoints" / "year-2017").mkdir()  # a save that never completed: left out


@pytest.mark.timeout(180)
def test_cli_on_a_deepspeed_run_and_compare(tmp_path, tiny_model_json, capsys):
    data = _three_years(tmp_path / "data")
    run = tmp_path / "runs" / "seq"
    _deepspeed_run(run, data, tiny_model_json)
    assert main(["--run", str(run), "--samples", "10", "--tasks", "retrieval", "--heatmaps", "mean_R1"]) == 0
    m = read_matrix(run / "eval" / "matrix.json")
    assert [(c.name, c.train_years) for c in m.checkpoints] == [("2015", ("2014", "2015")), ("2016", ("2016",))]
    assert all(m.results[c][y]["samples"] == 10 for c in m.results for y in m.years)
    g = m.grid("mean_R1")
    s = m.summary("mean_R1")
    assert s["in_domain"] == pytest.approx((g[0][0] + g[0][1] + g[1][2]) / 3)
    assert s["backward"] == pytest.approx((g[1][0] + g[1][1]) / 2)
    assert s["forward"] == pytest.approx(g[0][2])
    assert "zs_top1" not in m.metrics()
    # Compare with a copy: the first run's matrix is current and reused, the copy is evaluated.
    shutil.copytree(run, tmp_path / "runs" / "copy", ignore=shutil.ignore_patterns("eval"))
    before = (run / "eval" / "matrix.json").stat().st_mtime_ns
    capsys.readouterr()
    assert (
        main(
            [
                "--compare",
                str(run),
                str(tmp_path / "runs" / "copy"),
                "--samples",
                "10",
                "--tasks",
                "retrieval",
                "--heatmaps",
                "mean_R1",
            ]
        )
        == 0
    )
    assert (run / "eval" / "matrix.json").stat().st_mtime_ns == before
    copy = read_matrix(tmp_path / "runs" / "copy" / "eval" / "matrix.json")
    assert copy.results == m.results  # same weights, same numbers
    assert (tmp_path / "runs" / "compare" / "compare_mean_R1.png").is_file()
    printed = capsys.readouterr().out
    assert "seq" in printed and "copy" in printed and "ID    BWT    FWT   mean" in printed
    assert printed.count("== ") == 2 and printed.count("checkpoint   2014   2015   2016") == 2  # both matrices


@pytest.mark.timeout(10)
def test_classes_come_from_the_manifest_or_a_file(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"years": ["2014"]}))
    assert load_classes(str(tmp_path)) is None
    (tmp_path / "zs.json").write_text(json.dumps({"classes": ["cat", "dog"], "templates": ["a {}"]}))
    spec = load_classes(str(tmp_path), str(tmp_path / "zs.json"))
    assert spec.prompts() == ["a cat", "a dog"]
    (tmp_path / "zs.json").write_text(json.dumps({"classes": ["cat"], "templates": ["no placeholder"]}))
    with pytest.raises(ValueError, match="placeholder"):
        load_classes(str(tmp_path), str(tmp_path / "zs.json"))
