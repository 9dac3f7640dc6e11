"""Export: ZeRO-3 checkpoints become files plain open_clip loads, with the same embeddings."""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import open_clip
import pytest
import torch

from tools.export import main as export_main
from trainer import checkpoint as ckpt
from trainer.config import load_config, save_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine
from trainer.model import ModelError, create_model
from trainer.weights.open_clip import check_fits, load_hint, read_open_clip_checkpoint


@pytest.fixture(scope="module")
def dist():
    return init_distributed("gloo")


@pytest.fixture(scope="module")
def trained_run(dist, tiny_model_json: Path, tmp_path_factory):
    """A run folder with a ZeRO-3 year-2014 checkpoint whose logit scale went past the cap."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_json}",
            "data.root=/unused",
            "train.global_batch=4",
            "train.micro_batch=4",
            "deepspeed.zero_stage=3",
            "logging.name=tiny",
            "optim.lr=0.05",
        ],
    )
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    with torch.no_grad():
        model.logit_scale.fill_(math.log(120.0))
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=3, warmup=0)
    for _ in range(3):
        out = engine(image=torch.randn(4, 3, 32, 32), text=torch.randint(1, 400, (4, 16)))
        engine.backward((out["image_features"] * out["text_features"]).sum())
        engine.step()
    ckpt.save(
        engine,
        run / "checkpoints",
        "year-2014",
        {"plan_step": 0, "year_complete": True, "global_step": 3},
        dist,
        min_free_gb=0,
        keep_last=2,
    )
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        reference = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return run, reference


def _embed(model) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image, text = torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 400, (3, 16), generator=g)
    model.eval()
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


@pytest.mark.timeout(240)
def test_export_pt_loads_in_plain_open_clip(trained_run, tiny_model_json: Path, tmp_path: Path) -> None:
    run, reference = trained_run
    out = tmp_path / "2014.pt"
    assert export_main(["--run", str(run), "--year", "2014", "--out", str(out)]) == 0
    blob = torch.load(out, weights_only=True)
    assert set(blob) == {"state_dict", "epoch", "name"} and blob["epoch"] == 1 and blob["name"] == "tiny"
    assert not any(k.startswith(("module.", "_")) for k in blob["state_dict"])
    open_clip.add_model_config(str(tiny_model_json))  # a user's JSON must be registered to load by name
    theirs, _, _ = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(out))
    ours = create_model(load_config(None, [f"model.name={tiny_model_json}", "data.root=/x"]).model)[0]
    ours.load_state_dict(reference)
    for a, b in zip(_embed(theirs), _embed(ours)):
        assert torch.allclose(a, b, atol=1e-5)
    assert theirs.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)  # capped as in training


@pytest.mark.timeout(240)
def test_export_pt_refuses_an_existing_file_unless_told(trained_run, tmp_path: Path, capsys) -> None:
    run, _ = trained_run
    out = tmp_path / "2014.pt"
    out.write_bytes(b"someone's file")
    args = ["--run", str(run), "--year", "2014", "--out", str(out)]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} exists; pass --overwrite to replace it" in err
    assert out.read_bytes() == b"someone's file"
    assert export_main([*args, "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}  (open_clip: open_clip.add_model_config(") and "QuickGELU" not in said
    assert set(torch.load(out, weights_only=True)) == {"state_dict", "epoch", "name"}
    assert [p.name for p in tmp_path.iterdir()] == ["2014.pt"]  # written beside, then renamed over


def test_pt_export_hint_names_quick_gelu(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=ViT-B-32", "model.force_quick_gelu=true", "data.root=/x"])
    hint = load_hint(cfg, tmp_path / "a.pt", "pt")
    assert hint == (
        f"open_clip: create_model_and_transforms('ViT-B-32', pretrained='{tmp_path / 'a.pt'}', "
        "force_quick_gelu=True); the model uses QuickGELU"
    )
    plain = load_config(None, ["model.name=ViT-B-32", "data.root=/x"])
    assert "QuickGELU" not in load_hint(plain, tmp_path / "a.pt", "pt")


@pytest.mark.timeout(240)
def test_export_local_dir_needs_no_registration(trained_run, tmp_path: Path) -> None:
    run, reference = trained_run
    out = tmp_path / "tiny-2014"
    assert export_main(["--run", str(run), "--year", "2014", "--out", str(out), "--format", "local-dir"]) == 0
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors"}
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert theirs.visual.image_size == (32, 32)
    sd = theirs.state_dict()
    assert all(
        torch.allclose(sd[k].float(), reference[k].float().reshape(sd[k].shape)) for k in sd if k != "logit_scale"
    )


@pytest.mark.timeout(60)
def test_export_errors_exit_2(trained_run, tmp_path: Path, capsys) -> None:
    run, _ = trained_run
    assert export_main(["--run", str(run), "--year", "2099", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "year-2099: no such checkpoint (have: year-2014)" in err
    assert not (tmp_path / "x.pt").exists()
    assert export_main(["--run", str(tmp_path), "--year", "2014", "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_local_dir_export_replaces_its_own_export_but_never_a_foreign_folder(trained_run, tmp_path: Path, capsys):
    run, _ = trained_run
    out = tmp_path / "export"
    args = ["--run", str(run), "--year", "2014", "--out", str(out), "--format", "local-dir"]
    assert export_main(args) == 0
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert export_main(args) == 2  # an earlier export is replaced only when asked
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier export; pass --overwrite to replace it" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert export_main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert export_main([*args[:-3], str(mine), "--format", "local-dir"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not an open_clip local-dir export" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_import_checks_keys_and_shapes(tiny_model_json: Path, tmp_path: Path) -> None:
    model = create_model(load_config(None, [f"model.name={tiny_model_json}", "data.root=/x"]).model)[0]
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3, "name": "r"}, good)
    state = read_open_clip_checkpoint(good)
    check_fits(state, model, str(good))
    model.load_state_dict(state)
    state["visual.proj"] = torch.zeros(3, 3)
    with pytest.raises(ModelError, match="good.pt: does not fit model.name .*shape differs: visual.proj"):
        check_fits(state, model, str(good))
    # As many numbers in another shape (a transposed projection) does not fit either.
    proj = model.state_dict()["visual.proj"]
    state["visual.proj"] = proj.reshape(-1)
    with pytest.raises(ModelError, match=r"shape differs: visual.proj \(.*\)$"):
        check_fits(state, model, str(good))
    state["visual.proj"] = proj
    state["logit_scale"] = state["logit_scale"].reshape(1)  # [1] and 0-dim are the same scalar
    check_fits(state, model, str(good))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="junk.pt: not a loadable open_clip checkpoint"):
        read_open_clip_checkpoint(tmp_path / "junk.pt")
