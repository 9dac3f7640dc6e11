"""trainer.model / trainer.attention against real open_clip models (tiny configs, CPU)."""

from __future__ import annotations

import copy
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainer.attention as attention
import trainer.model
from tests.conftest import TINY_MODEL
from trainer.attention import FusedAttention
from trainer.config import ModelConfig
from trainer.model import (
    ModelError,
    create_model,
    make_zero_safe,
    open_clip_state_dict,
    resolve_backend,
    swap_attention,
)

LAYERS = TINY_MODEL["vision_cfg"]["layers"] + TINY_MODEL["text_cfg"]["layers"]
CTX = TINY_MODEL["text_cfg"]["context_length"]
ATOL = 1e-5
HALF = {"atol": 3e-2, "rtol": 3e-2}  # fp16/bf16 kernels against each other


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = 0.0, msg=None):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg)


def _build(path, **overrides) -> nn.Module:
    model, _, _, _ = create_model(ModelConfig(name=str(path), **overrides))
    return model


def _vanilla_like(model: nn.Module, stem: str = "tiny-vit") -> nn.Module:
    """A vanilla open_clip model from the same (registered) config with `model`'s weights."""
    vanilla = open_clip.create_model(stem, pretrained=None)
    vanilla.load_state_dict(model.state_dict())
    return vanilla


def _inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (batch, CTX), generator=g)
    text[:, -3:] = 0  # padding after the argmax-pooled end token, like real tokens
    text[torch.arange(batch), CTX - 4 - torch.arange(batch)] = 49407
    return images, text


def _fused(model: nn.Module) -> list[FusedAttention]:
    return [m for m in model.modules() if isinstance(m, FusedAttention)]


def _loss(model: nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    image_features, text_features, scale = model(images, text)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _reference_bmhk(q, k, v, attn_bias, p):
    """Plain-PyTorch memory_efficient_attention in xformers' own [B, M, H, K] layout."""
    import xformers.ops

    assert p == 0.0
    batch, length, heads, dim = q.shape
    if isinstance(attn_bias, xformers.ops.LowerTriangularMask):
        bias = attn_bias.materialize((batch, heads, length, k.shape[1]), dtype=q.dtype)
    elif attn_bias is None:
        bias = torch.zeros(())
    else:
        # What the real kernel insists on: exact [B, H, M, Mk] shape and 8-aligned rows.
        assert attn_bias.shape == (batch, heads, length, k.shape[1])
        assert attn_bias.stride(-2) % 8 == 0 and attn_bias.stride(-1) == 1
        bias = attn_bias
    _reference_bmhk.biases.append(type(attn_bias).__name__)
    scores = torch.einsum("bmhk,bnhk->bhmn", q, k) / math.sqrt(dim) + bias
    return torch.einsum("bhmn,bnhk->bmhk", scores.softmax(-1), v)


@pytest.fixture
def reference_xformers(monkeypatch):
    """Stand in for xformers' CUDA kernel on CPU through trainer.attention's single call site."""
    pytest.importorskip("xformers.ops")
    _reference_bmhk.biases = []
    monkeypatch.setattr(attention, "_xformers_attention", _reference_bmhk)
    return _reference_bmhk


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sdpa_swap_replaces_all_blocks_and_keeps_state_dict(tiny_model_json):
    model = _build(tiny_model_json, attention="torch")
    vanilla = _vanilla_like(model)
    assert swap_attention(model, "sdpa") == LAYERS
    for tower in (model.visual, model.transformer):
        assert not any(isinstance(m, nn.MultiheadAttention) for m in tower.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in vanilla.state_dict().items()}
    assert swap_attention(model, "sdpa") == 0  # nothing left to swap


@pytest.mark.timeout(60)
def test_sdpa_matches_vanilla_outputs_and_gradients(tiny_model_json):
    model = _build(tiny_model_json, attention="sdpa")
    vanilla = _vanilla_like(model)
    images, text = _inputs()
    model.eval(), vanilla.eval()
    with torch.no_grad():
        _close(model.encode_image(images), vanilla.encode_image(images))
        _close(model.encode_text(text), vanilla.encode_text(text))
    assert all(m.calls == 1 for m in _fused(model)) and len(_fused(model)) == LAYERS

    model.train(), vanilla.train()
    _loss(model, images, text).backward()
    _loss(vanilla, images, text).backward()
    ours = dict(model.named_parameters())
    for name, param in vanilla.named_parameters():
        _close(ours[name].grad.reshape(param.shape), param.grad, msg=name)


@pytest.mark.timeout(60)
def test_text_tower_is_causal_only_when_its_mask_is(tiny_model_json):
    model = _build(tiny_model_json, attention="torch")
    vanilla = _vanilla_like(model)
    swap_attention(model, "sdpa")
    assert model.attn_mask is None  # dense mask dropped; the blocks are causal themselves
    assert all(m.causal for m in _fused(model.transformer))
    assert not any(m.causal for m in _fused(model.visual))
    _, text = _inputs()
    model.eval(), vanilla.eval()
    with torch.no_grad():
        _close(model.encode_text(text), vanilla.encode_text(text))

    # A text mask that is not the standard causal one is kept and passed through as is.
    odd = _build(tiny_model_json, attention="torch").eval()
    band = torch.full((CTX, CTX), float("-inf")).triu(1) + torch.full((CTX, CTX), float("-inf")).tril(-3)
    odd.attn_mask = band
    odd_vanilla = _vanilla_like(odd).eval()
    odd_vanilla.attn_mask = band
    swap_attention(odd, "sdpa")
    assert odd.attn_mask is band and not any(m.causal for m in _fused(odd))
    with torch.no_grad():
        _close(odd.encode_text(text), odd_vanilla.encode_text(text))


@pytest.mark.timeout(60)
def test_bidirectional_text_config(tmp_path):
    path = tmp_path / "tiny-bidir.json"
    text_cfg = {**TINY_MODEL["text_cfg"], "no_causal_mask": True}
    path.write_text(json.dumps({**TINY_MODEL, "text_cfg": text_cfg}))
    model = _build(path, attention="sdpa").eval()
    vanilla = _vanilla_like(model, "tiny-bidir").eval()
    assert not any(m.causal for m in _fused(model))
    _, text = _inputs()
    with torch.no_grad():
        _close(model.encode_text(text), vanilla.encode_text(text))


@pytest.mark.timeout(60)
def test_xformers_path_matches_sdpa_with_reference_kernel(tiny_model_json, reference_xformers):
    sdpa = _build(tiny_model_json, attention="sdpa").eval()
    xf = _build(tiny_model_json, attention="torch").eval()
    xf.load_state_dict(sdpa.state_dict())
    assert swap_attention(xf, "xformers") == LAYERS  # swap directly: resolve_backend would refuse CPU
    images, text = _inputs()
    with torch.no_grad():
        _close(xf.encode_image(images), sdpa.encode_image(images))
        _close(xf.encode_text(text), sdpa.encode_text(text))
    vision = TINY_MODEL["vision_cfg"]["layers"]
    assert reference_xformers.biases == ["NoneType"] * vision + ["LowerTriangularMask"] * (LAYERS - vision)
    assert all(m.calls == 1 for m in _fused(xf))


def _padding_masks(batch: int, heads: int, length: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([length, length - 3, 2])[:batch]
    pad = torch.arange(length)[None, :] >= lengths[:, None]  # [B, S], True = padding
    additive = torch.zeros(batch, length, length).masked_fill(pad[:, None, :], float("-inf"))
    return {
        "bool-2d": torch.ones(length, length, dtype=torch.bool).triu(1),
        "float-2d": torch.randn(length, length),
        "float-3d-padding": additive.repeat_interleave(heads, 0),  # [B*H, L, S] like open_clip builds it
        "bool-3d-padding": (additive == float("-inf")).repeat_interleave(heads, 0),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("causal", [False, True])
def test_explicit_masks_are_honoured_like_multihead_attention(backend, causal, reference_xformers):
    torch.manual_seed(0)
    batch, heads, length, width = 3, 2, 11, 16  # 11: bias rows need padding to stay aligned
    mha = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    fused = FusedAttention(copy.deepcopy(mha), backend, causal=causal).eval()
    x = torch.randn(batch, length, width)
    for name, mask in _padding_masks(batch, heads, length).items():
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        _close(fused(x, x, x, attn_mask=mask)[0], expected, msg=name)
    causal_mask = torch.full((length, length), float("-inf")).triu(1)
    expected = mha(x, x, x, need_weights=False, attn_mask=causal_mask if causal else None)[0]
    _close(fused(x, x, x)[0], expected)
    if backend == "xformers":
        assert "Tensor" in reference_xformers.biases


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_separate_query_key_value_tensors(backend, reference_xformers):
    """ZeRO-3 hands each module input over as its own tensor; gradients must reach all three."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    fused = FusedAttention(copy.deepcopy(mha), backend, causal=True).eval()
    x = torch.randn(2, 7, 16, requires_grad=True)
    out = fused(x, x * 1, x * 1)[0]  # same values, distinct tensors
    _close(out, fused(x, x, x)[0])
    out.sum().backward()
    grad, x.grad = x.grad, None
    causal_mask = torch.full((7, 7), float("-inf")).triu(1)
    mha(x, x, x, need_weights=False, attn_mask=causal_mask)[0].sum().backward()
    _close(grad, x.grad)
    memory = torch.randn(2, 5, 16)  # cross-attention shapes work too
    expected = mha(x, memory, memory, need_weights=False)[0]
    _close(fused(x, memory, memory, attn_mask=torch.zeros(7, 5))[0], expected)


@pytest.mark.timeout(30)
def test_dropout_only_in_training():
    mha = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True)
    fused = FusedAttention(mha, "sdpa")
    x = torch.randn(2, 5, 16)
    fused.eval()
    _close(fused(x, x, x)[0], fused(x, x, x)[0])
    fused.train()
    torch.manual_seed(0)
    first = fused(x, x, x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(first, fused(x, x, x)[0])


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_xformers_kernel_matches_sdpa_on_cuda(tiny_model_json, dtype):
    pytest.importorskip("xformers.ops")
    sdpa = _build(tiny_model_json, attention="sdpa").cuda().to(dtype).eval()
    xf = _build(tiny_model_json, attention="torch").cuda().to(dtype).eval()
    xf.load_state_dict(sdpa.state_dict())
    assert swap_attention(xf, "xformers") == LAYERS
    images, text = (t.cuda() for t in _inputs())
    images = images.to(dtype)
    with torch.no_grad():
        _close(xf.encode_image(images), sdpa.encode_image(images), **HALF)
        _close(xf.encode_text(text), sdpa.encode_text(text), **HALF)
    mha = nn.MultiheadAttention(64, 4, batch_first=True).cuda().to(dtype).eval()
    fused = FusedAttention(copy.deepcopy(mha), "xformers").eval()
    x = torch.randn(3, 11, 64, device="cuda", dtype=dtype)
    for name, mask in _padding_masks(3, 4, 11).items():
        mask = mask.cuda() if mask.dtype == torch.bool else mask.cuda().to(dtype)
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        _close(fused(x, x, x, attn_mask=mask)[0], expected, **HALF, msg=name)


@pytest.mark.timeout(30)
def test_resolve_backend(monkeypatch):
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", torch.device("cpu")) == "sdpa"
    assert resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ModelError, match="xformers has no kernels for cpu"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ModelError, match="'flash'"):
        resolve_backend("flash", "cpu")
    # Only device names: no GPU needed.
    monkeypatch.setattr(trainer.model, "xformers_problem", lambda device: "")
    assert resolve_backend("auto", "cuda") == "xformers"
    assert resolve_backend("xformers", "cuda:1") == "xformers"
    missing = "xformers is not installed (pip install xformers)"
    monkeypatch.setattr(trainer.model, "xformers_problem", lambda device: missing)
    assert resolve_backend("auto", "cuda") == "sdpa"
    with pytest.raises(ModelError, match="xformers is not installed.*; use sdpa"):
        resolve_backend("xformers", "cuda")
    with pytest.raises(ModelError, match="xformers"):
        create_model(ModelConfig(name="ViT-B-32", attention="xformers"))


@pytest.mark.timeout(30)
def test_xformers_probe_runs_the_kernel():
    """Importable is not enough: the probe calls the kernel, and xformers has none for the CPU."""
    pytest.importorskip("xformers.ops")
    assert attention.xformers_problem("cpu").startswith("xformers has no working kernel on cpu (")


@pytest.mark.timeout(60)
def test_torch_backend_leaves_open_clip_untouched(tiny_model_json):
    model = _build(tiny_model_json, attention="torch")
    assert swap_attention(model, "torch") == 0
    assert not _fused(model) and model.attn_mask is not None


@pytest.mark.timeout(60)
def test_grad_checkpointing_flag(tiny_model_json):
    plain = _build(tiny_model_json)
    ckpt = _build(tiny_model_json, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.visual.transformer.grad_checkpointing and ckpt.transformer.grad_checkpointing
    assert not plain.visual.transformer.grad_checkpointing
    images, text = _inputs()
    loss_plain, loss_ckpt = _loss(plain, images, text), _loss(ckpt, images, text)
    _close(loss_ckpt, loss_plain)
    loss_plain.backward(), loss_ckpt.backward()
    ours = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        _close(ours[name].grad, param.grad, msg=name)


# --- logit_scale and export ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_image_tower_takes_fp32_images_in_half_precision(tiny_model_json):
    model = _build(tiny_model_json).to(torch.bfloat16).eval()
    images, _ = _inputs()
    with torch.no_grad():
        _close(model.encode_image(images), model.encode_image(images.to(torch.bfloat16)), atol=0.0)


@pytest.mark.timeout(60)
def test_make_zero_safe_keeps_open_clip_state_dict(tiny_model_json):
    model = _build(tiny_model_json)
    vanilla = open_clip.create_model("tiny-vit", pretrained=None)
    assert model.logit_scale.shape == (1,)
    model.logit_scale.data.view(torch.uint8)  # what DeepSpeed's broadcast does; 0-dim fails here
    with pytest.raises(RuntimeError):
        vanilla.logit_scale.data.view(torch.uint8)
    state = model.state_dict()
    assert state["logit_scale"].shape == ()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in vanilla.state_dict().items()}
    assert isinstance(model.state_dict(keep_vars=True)["logit_scale"], nn.Parameter)

    with torch.no_grad():
        vanilla.logit_scale.fill_(2.5)
    model.load_state_dict(vanilla.state_dict())  # 0-dim in, [1] parameter
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 2.5
    model.load_state_dict({**vanilla.state_dict(), "logit_scale": torch.tensor([3.0])})
    assert model.logit_scale.item() == 3.0

    images, text = _inputs()
    _loss(model, images, text).backward()
    assert model.logit_scale.grad.shape == (1,)
    make_zero_safe(model)  # idempotent
    assert model.logit_scale.shape == (1,)


@pytest.mark.timeout(60)
def test_hooks_leave_zero3_placeholders_alone(tiny_model_json):
    model = _build(tiny_model_json)
    model.logit_scale.data = torch.empty(0)  # what a ZeRO-3 partitioned parameter looks like
    assert model.state_dict()["logit_scale"].shape == (0,)
    state = {k: v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert model.logit_scale.shape == (0,)


@pytest.mark.timeout(60)
def test_open_clip_state_dict_loads_into_vanilla_open_clip(tiny_model_json, tmp_path):
    model = _build(tiny_model_json)
    state = open_clip_state_dict(model)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    assert state["logit_scale"].shape == ()
    path = tmp_path / "export.pt"
    torch.save({"state_dict": state, "epoch": 1, "name": "tiny-vit"}, path)
    vanilla = open_clip.create_model("tiny-vit", pretrained=str(path)).eval()
    model.eval()
    images, text = _inputs()
    with torch.no_grad():
        for ours, theirs in zip(model(images, text), vanilla(images, text)):
            _close(ours.reshape(theirs.shape), theirs)
