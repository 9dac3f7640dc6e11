"""The CUDA paths for real: bf16 ZeRO-2, fused Adam, pinned batches, xformers attention, NCCL.

Every test here is `gpu`-marked, so tests/conftest.py skips it on a machine without CUDA.
Engines are built in spawned NCCL ranks (tests/dist_helpers.py), never in the pytest process,
so no process group is shared with the CPU tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F

import trainer.attention as attention
from tests.conftest import TINY_MODEL, write_year
from tests.dist_helpers import run_ranks
from trainer.attention import FusedAttention
from trainer.config import Config, ModelConfig, load_config
from trainer.data.pipeline import StreamDataset, build_loader
from trainer.data.rehearsal import RehearsalSampler
from trainer.data.shards import find_years
from trainer.distributed import DistInfo, all_reduce_sum, broadcast_object, init_distributed, sum_counts
from trainer.engine import build_engine
from trainer.loop import accumulate_gradients
from trainer.model import create_model
from trainer.objectives import build_objective
from trainer.objectives.clip import ContrastiveLoss

pytestmark = pytest.mark.gpu

VISION_LAYERS = TINY_MODEL["vision_cfg"]["layers"]
TEXT_LAYERS = TINY_MODEL["text_cfg"]["layers"]
CTX = TINY_MODEL["text_cfg"]["context_length"]
GLOBAL = 16  # samples per optimizer step, split over the ranks
STEPS = 5
# bf16 keeps 8 mantissa bits: a few steps of bf16 training stay within a few % of fp32.
BF16 = {"rel": 3e-2, "abs": 2e-2}
# DeepSpeed's optimizer for our config: fused on the GPU, its CPU Adam when states are offloaded.
OPTIMIZERS = {
    "zero0-fp32": (("deepspeed.zero_stage=0", "model.precision=fp32"), "FusedAdam"),
    "zero0-bf16": (("deepspeed.zero_stage=0", "model.precision=bf16"), "FusedAdam"),
    "zero2-bf16": (("deepspeed.zero_stage=2", "model.precision=bf16"), "FusedAdam"),
    "zero3-bf16": (("deepspeed.zero_stage=3", "model.precision=bf16"), "FusedAdam"),
    "zero2-fp16": (("deepspeed.zero_stage=2", "model.precision=fp16"), "FusedAdam"),
    "zero2-offload": (("deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"), "DeepSpeedCPUAdam"),
}


def _cfg(model_json: str, world: int, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"model.name={model_json}",
            "data.root=/unused",
            f"train.global_batch={GLOBAL}",
            f"train.micro_batch={GLOBAL // world}",
            "optim.lr=5e-4",
            "optim.schedule=const",
            *overrides,
        ],
    )


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """GLOBAL fp32 images and token rows (end token, then padding), made on the CPU."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL, 3, 32, 32, generator=g)
    text = torch.randint(1, 1000, (GLOBAL, CTX), generator=g)
    ends = torch.randint(4, CTX, (GLOBAL,), generator=g)
    text[torch.arange(CTX)[None, :] > ends[:, None]] = 0
    text[torch.arange(GLOBAL), ends] = 49407  # argmax pooling reads the end token
    return images, text


def _read(out: Path, world: int) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


# --- functions the spawned ranks run ---------------------------------------------------------


def _train_rank(rank: int, world: int, model_json: str, out: str, *overrides: str) -> None:
    """STEPS optimizer steps on this rank's rows of one fixed batch, fed as pinned CPU tensors."""
    info = init_distributed()
    cfg = _cfg(model_json, world, *overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model, info.device)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, info, accum_steps=1, total_steps=STEPS, warmup=0)
    images, text = _global_batch()
    rows = slice(rank * cfg.train.micro_batch, (rank + 1) * cfg.train.micro_batch)
    batch = {"image": images[rows].pin_memory(), "text": text[rows].pin_memory()}
    objective = build_objective(cfg, info)
    losses = [accumulate_gradients(engine, [batch], objective, info.device)[0] for _ in range(STEPS)]
    param = next(engine.module.parameters())
    facts = {
        "losses": losses,
        "optimizer": type(engine.basic_optimizer).__name__,
        "param_dtype": str(param.dtype),
        "param_device": param.device.type,
        # ZeRO-2 partitions the update; afterwards every rank must hold the same full weights.
        "checksum": sum(p.detach().double().sum().item() for p in engine.module.parameters()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))


def _optimizer_rank(rank: int, world: int, model_json: str, out: str) -> None:
    """The optimizer class DeepSpeed builds for each case of OPTIMIZERS."""
    info = init_distributed()
    built = {}
    for name, (overrides, _) in OPTIMIZERS.items():
        cfg = _cfg(model_json, world, *overrides)
        engine = build_engine(create_model(cfg.model, info.device)[0], cfg, info, 1, 1, 0)
        built[name] = type(engine.basic_optimizer).__name__
        del engine
        torch.cuda.empty_cache()
    Path(out, f"rank{rank}.json").write_text(json.dumps(built))


def _collectives_rank(rank: int, world: int, out: str) -> None:
    """Our collective helpers and the contrastive gather under NCCL, on CUDA tensors."""
    info = init_distributed()
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1).cuda()
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1).cuda()
    scale = torch.tensor([10.0], device="cuda")
    rows = slice(rank * 4, rank * 4 + 4)
    mine_i, mine_t = img[rows].clone().requires_grad_(True), txt[rows].clone().requires_grad_(True)
    loss = ContrastiveLoss(rank, world)(mine_i, mine_t, scale)
    loss.backward()
    facts = {
        "backend": info.backend,
        "device": str(info.device),
        "current_device": torch.cuda.current_device(),
        "sum": all_reduce_sum([1.0, float(rank)]),
        "counts": sum_counts({"all": 1, f"rank{rank}": 1}),
        "broadcast": broadcast_object({"from": rank}),
        "loss": loss.item(),
        "full_batch_loss": ContrastiveLoss(0, 1)(img, txt, scale).item(),
        "grad_finite": bool(mine_i.grad.isfinite().all() and mine_t.grad.isfinite().all()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(facts))


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_bf16_zero2_step_learns_and_tracks_fp32(tmp_path: Path, tiny_model_json: Path) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        out.mkdir()
        overrides = (f"model.precision={precision}", "deepspeed.zero_stage=2")
        run_ranks(_train_rank, 1, str(tiny_model_json), str(out), *overrides, backend="nccl")
        runs[precision] = _read(out, 1)[0]
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16["param_dtype"] == "torch.bfloat16" and fp32["param_dtype"] == "torch.float32"
    assert bf16["param_device"] == "cuda" and bf16["optimizer"] == "FusedAdam"
    assert all(b < a for a, b in zip(bf16["losses"], bf16["losses"][1:])), bf16["losses"]
    assert bf16["losses"] == pytest.approx(fp32["losses"], **BF16)


@pytest.mark.timeout(900)
def test_deepspeed_builds_fused_adam_on_cuda(tmp_path: Path, tiny_model_json: Path) -> None:
    run_ranks(_optimizer_rank, 1, str(tiny_model_json), str(tmp_path), backend="nccl")
    assert _read(tmp_path, 1)[0] == {name: expected for name, (_, expected) in OPTIMIZERS.items()}


class _RecordingEngine:
    """Stands in for the DeepSpeed engine in the loop: keeps the inputs it was called with."""

    def __init__(self, device: torch.device) -> None:
        self.scale = torch.ones(1, device=device, requires_grad=True)
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append((image, text))
        return {
            "image_features": image.flatten(1)[:, :8] * self.scale,
            "text_features": text[:, :8].float() * self.scale,
            "logit_scale": self.scale.exp(),
        }

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


@pytest.mark.timeout(300)
def test_loader_pins_batches_and_the_loop_copies_them_to_the_gpu(tmp_path: Path) -> None:
    write_year(tmp_path, "2014", 16, per_shard=8)
    sampler = RehearsalSampler(find_years(str(tmp_path), years=["2014"]), {"2014": 16}, seed=0, world=1, workers=1)
    dataset = StreamDataset(
        sampler,
        rank=0,
        world=1,
        workers=1,
        micro_batch=4,
        preprocess=open_clip.image_transform(32, is_train=True),
        tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=CTX),
        seed=0,
    )
    loader = build_loader(dataset)
    assert loader.pin_memory
    batches = list(loader)
    assert len(batches) == 4
    assert all(b["image"].is_pinned() and b["text"].is_pinned() for b in batches)
    device = torch.device("cuda", torch.cuda.current_device())
    engine = _RecordingEngine(device)
    clip = build_objective(load_config(None, ["data.root=unused"]), DistInfo(0, 1, 0, device, "nccl"))
    accumulate_gradients(engine, batches, clip, device)
    assert [(i.device, t.device) for i, t in engine.inputs] == [(device, device)] * len(batches)
    for (image, text), batch in zip(engine.inputs, batches):  # the non_blocking copies landed whole
        assert torch.equal(image.cpu(), batch["image"]) and torch.equal(text.cpu(), batch["text"])


@pytest.mark.timeout(300)
def test_swapped_model_calls_xformers_on_cuda_and_matches_sdpa_in_bf16(
    tiny_model_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xformers.ops")
    problem = attention.xformers_problem("cuda")
    assert not problem, problem  # installed but without a kernel for this torch: auto falls back to sdpa
    torch.manual_seed(0)
    xf = create_model(ModelConfig(name=str(tiny_model_json), attention="auto"), "cuda")[0]
    sdpa = create_model(ModelConfig(name=str(tiny_model_json), attention="sdpa"), "cuda")[0]
    sdpa.load_state_dict(xf.state_dict())
    fused = [m for m in xf.modules() if isinstance(m, FusedAttention)]
    assert len(fused) == VISION_LAYERS + TEXT_LAYERS and {m.backend for m in fused} == {"xformers"}
    kernel, calls = attention._xformers_attention, []

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any, p: float) -> torch.Tensor:
        calls.append((type(attn_bias).__name__, q.dtype, tuple(q.shape)))
        return kernel(q, k, v, attn_bias, p)

    monkeypatch.setattr(attention, "_xformers_attention", counting)
    images, text = (t.cuda() for t in _global_batch())
    features, grads = {}, {}
    for name, model in (("xformers", xf), ("sdpa", sdpa)):
        model.to(torch.bfloat16).train()
        image_features, text_features, scale = model(images, text)  # fp32 images: the tower casts them
        ContrastiveLoss(0, 1)(image_features, text_features, scale).backward()
        features[name] = (image_features.detach(), text_features.detach())
        grads[name] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    # xformers' [B, M, H, K] layout; the text tower is causal through the lazy mask, not a dense one.
    vision, text_cfg = TINY_MODEL["vision_cfg"], TINY_MODEL["text_cfg"]
    tokens = 1 + (vision["image_size"] // vision["patch_size"]) ** 2  # class token + patches
    vision_shape = (GLOBAL, tokens, vision["width"] // vision["head_width"], vision["head_width"])
    text_shape = (GLOBAL, CTX, text_cfg["heads"], text_cfg["width"] // text_cfg["heads"])
    vision_call = ("NoneType", torch.bfloat16, vision_shape)
    text_call = ("LowerTriangularMask", torch.bfloat16, text_shape)
    assert calls == [vision_call] * VISION_LAYERS + [text_call] * TEXT_LAYERS
    assert all(m.calls == 1 for m in fused)
    for ours, reference in zip(features["xformers"], features["sdpa"]):
        torch.testing.assert_close(ours, reference, atol=3e-2, rtol=3e-2)
    error = (grads["xformers"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
    assert error.item() < 3e-2


@pytest.mark.timeout(900)
def test_two_nccl_ranks_equal_one(tmp_path: Path, tiny_model_json: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    run_ranks(_collectives_rank, 2, str(tmp_path), backend="nccl")
    for rank, facts in enumerate(_read(tmp_path, 2)):
        assert facts["backend"] == "nccl" and facts["device"] == f"cuda:{rank}" == f"cuda:{facts['current_device']}"
        assert facts["sum"] == [2.0, 1.0] and facts["counts"] == {"all": 2, "rank0": 1, "rank1": 1}
        assert facts["broadcast"] == {"from": 0}
        assert facts["loss"] == pytest.approx(facts["full_batch_loss"], abs=1e-5) and facts["grad_finite"]
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        out.mkdir()
        run_ranks(
            _train_rank,
            world,
            str(tiny_model_json),
            str(out),
            "model.precision=bf16",
            "deepspeed.zero_stage=2",
            backend="nccl",
        )
        runs[world] = _read(out, world)
    first, second = runs[2]
    assert first["losses"] == pytest.approx(second["losses"], rel=1e-6)  # every rank sees the whole batch
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-9)
    assert first["losses"] == pytest.approx(runs[1][0]["losses"], **BF16)
