"""FLOPs: torch's counter under SDPA's math kernel agrees with the formula, attention included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from trainer.config import ModelConfig
from trainer.flops import analytic_flops, forward_flops, train_flops
from trainer.model import create_model


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_counter_under_math_equals_the_formula(tiny_model_json: Path, attention: str) -> None:
    model = create_model(ModelConfig(name=str(tiny_model_json), attention=attention))[0]
    counted = forward_flops(model)
    formula = analytic_flops(model)
    assert counted == pytest.approx(formula.total, rel=1e-3)
    assert train_flops(model) == 3 * counted
    # A trimmed text batch (model.trim_text): both count the shorter text tower, and it is less.
    short = forward_flops(model, text_length=5)
    assert short == pytest.approx(analytic_flops(model, text_length=5).total, rel=1e-3)
    assert short < counted


@pytest.mark.timeout(60)
def test_attention_flops_are_counted_and_match_the_shapes(tiny_model_json: Path) -> None:
    model = create_model(ModelConfig(name=str(tiny_model_json), attention="sdpa"))[0]
    flops = analytic_flops(model)
    vision, text = TINY_MODEL["vision_cfg"], TINY_MODEL["text_cfg"]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    expected = 4 * (
        vision["layers"] * image_tokens**2 * vision["width"]
        + text["layers"] * text["context_length"] ** 2 * text["width"]
    )
    assert flops.attention == expected > 0
    # What the counter sees beyond the dense matmuls is the attention, so it is not lost as 0.
    assert forward_flops(model) - flops.matmul == pytest.approx(flops.attention, rel=1e-2)
