"""Model configs: zoo lookup, user JSON files, unsupported families, and what create_model returns."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_MODEL
from trainer.config import ModelConfig
from trainer.model import ModelError, check_supported, create_model, model_config

CTX = TINY_MODEL["text_cfg"]["context_length"]


def _build(path, **overrides) -> torch.nn.Module:
    model, _, _, _ = create_model(ModelConfig(name=str(path), **overrides))
    return model


@pytest.mark.timeout(30)
def test_zoo_config_lookup():
    cfg = model_config("ViT-B-32")
    assert cfg["embed_dim"] == 512 and cfg["vision_cfg"]["patch_size"] == 32
    check_supported("ViT-B-32", cfg)
    check_supported("ViT-B-16-quickgelu", model_config("ViT-B-16-quickgelu"))


@pytest.mark.timeout(30)
def test_unknown_zoo_name_suggests_valid_ones():
    with pytest.raises(ModelError, match=r"'ViT-B-33'.*ViT-B-32"):
        model_config("ViT-B-33")
    with pytest.raises(ModelError, match="hf-hub:"):
        model_config("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "name, reason",
    [
        ("ViT-B-16-SigLIP", "SigLIP"),
        ("coca_ViT-B-32", "CoCa"),
        ("RN50", "ResNet"),
        ("EVA02-B-16", "timm"),
        ("mt5-base-ViT-B-32", "Hugging Face text"),
    ],
)
def test_unsupported_zoo_families(name, reason):
    with pytest.raises(ModelError, match=rf"^{name}: {reason}.*not supported.*ViT-B-32"):
        check_supported(name, model_config(name))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "change, reason",
    [
        ({"custom_text": True}, "CustomTextCLIP"),
        ({"init_logit_bias": -10.0}, "SigLIP"),
        ({"text_cfg": {**TINY_MODEL["text_cfg"], "embed_cls": True}}, "embed_cls"),
        ({"text_cfg": {**TINY_MODEL["text_cfg"], "qk_norm": True}}, "text_cfg.qk_norm"),
        ({"vision_cfg": {**TINY_MODEL["vision_cfg"], "block_type": "custom"}}, "vision_cfg.block_type"),
    ],
)
def test_unsupported_user_configs(change, reason):
    with pytest.raises(ModelError, match=f"^my.json: .*{reason}"):
        check_supported("my.json", {**TINY_MODEL, **change})


@pytest.mark.timeout(30)
def test_bad_json_files_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ModelError, match="nope.json"):
        model_config(str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelError, match="broken.json: not a readable JSON"):
        model_config(str(broken))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    with pytest.raises(ModelError, match="partial.json: .*text_cfg"):
        model_config(str(partial))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**TINY_MODEL, "vision_cfg": {**TINY_MODEL["vision_cfg"], "layer": 2}}))
    with pytest.raises(ModelError, match="typo.json: vision_cfg.layer is not"):
        model_config(str(typo))
    siglip = tmp_path / "my-siglip.json"
    siglip.write_text(json.dumps(TINY_MODEL))
    with pytest.raises(ModelError, match="SigLIP"):
        create_model(ModelConfig(name=str(siglip)))


@pytest.mark.timeout(30)
def test_json_shadowing_a_zoo_name_is_an_error(tmp_path):
    shadow = tmp_path / "ViT-B-32.json"
    shadow.write_text(json.dumps(TINY_MODEL))
    with pytest.raises(ModelError, match="ViT-B-32.json: .*zoo model.*rename"):
        create_model(ModelConfig(name=str(shadow)))
    assert model_config("ViT-B-32")["embed_dim"] == 512


@pytest.mark.timeout(60)
def test_same_stem_latest_file_wins(tmp_path):
    a, b = tmp_path / "a" / "same.json", tmp_path / "b" / "same.json"
    for path, dim in ((a, 16), (b, 24)):
        path.parent.mkdir()
        path.write_text(json.dumps({**TINY_MODEL, "embed_dim": dim}))
    assert _build(a).text_projection.shape[1] == 16
    assert _build(b).text_projection.shape[1] == 24
    assert _build(a).text_projection.shape[1] == 16


@pytest.mark.timeout(60)
def test_create_model_returns_transforms_and_tokenizer(tiny_model_json):
    model, preprocess_train, preprocess_val, tokenizer = create_model(ModelConfig(name=str(tiny_model_json)))
    from PIL import Image

    image = Image.new("RGB", (50, 40), "red")
    assert preprocess_train(image).shape == preprocess_val(image).shape == (3, 32, 32)
    # Cut after the end-of-text token (model.trim_text): start, 3 words, end; the context is unchanged.
    assert tokenizer(["a red photo"]).shape == (1, 5) and tokenizer.context_length == CTX
    assert next(model.parameters()).dtype == torch.float32


# --- attention swap ------------------------------------------------------------------------------
