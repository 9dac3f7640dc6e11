"""DeepSpeed engine: config, weight-decay groups, LR schedule, 0-dim logit_scale on every stage."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine, clamp_logit_scale, deepspeed_config, logit_scale_bound, lr_factor, param_groups
from trainer.loop import accumulate_features, accumulate_gradients
from trainer.model import create_model
from trainer.objectives import build_objective
from trainer.objectives.clip import ContrastiveLoss


@pytest.fixture(scope="module")
def dist():
    return init_distributed("gloo")


def _cfg(tiny_model_json: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.name={tiny_model_json}",
            "data.root=/unused",
            "train.global_batch=4",
            "train.micro_batch=4",
            *overrides,
        ],
    )


def test_param_groups_follow_open_clip_train(tiny_model_json: Path) -> None:
    cfg = _cfg(tiny_model_json)
    model = create_model(cfg.model)[0]
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in kept and "visual.class_embedding" in kept
    assert "token_embedding.weight" in decayed and "positional_embedding" in decayed
    assert not any(".ln_" in n or n.endswith(".bias") for n in decayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert decayed | kept == set(names.values())


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, "const", 0.0) == 1.0


def test_deepspeed_config_from_ours(tiny_model_json: Path) -> None:
    cfg = _cfg(
        tiny_model_json,
        "train.global_batch=32",
        "train.micro_batch=4",
        "optim.grad_clip=1.0",
        "deepspeed.zero_stage=3",
        "deepspeed.offload_optimizer=cpu",
        "deepspeed.offload_param=cpu",
        "deepspeed.extra={zero_optimization: {overlap_comm: true}}",
    )
    ds = deepspeed_config(cfg, world_size=2, accum_steps=4, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload needs DeepSpeed's CPU Adam
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    plain = deepspeed_config(_cfg(tiny_model_json), 1, 1, torch.device("cpu"))
    assert plain["optimizer"]["params"]["torch_adam"] is True and plain["optimizer"]["params"]["fused"] is True
    assert plain["gradient_clipping"] == 0.0  # absent, DeepSpeed would clip at 1.0
    assert plain["optimizer"]["params"]["betas"] == [0.9, 0.98]
    cuda = deepspeed_config(_cfg(tiny_model_json), 1, 1, torch.device("cuda"))
    assert cuda["bf16"]["enabled"] and "torch_adam" not in cuda["optimizer"]["params"]


def _train(engine, steps: int, loss_fn: ContrastiveLoss, push_scale: bool = False) -> list[float]:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 32, 32, generator=g)
    text = torch.randint(1, 400, (4, 16), generator=g)
    scales = []
    for _ in range(steps):
        out = engine(image=image, text=text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        if push_scale:  # an uncapped term that always raises the raw parameter
            loss = loss - out["logit_scale"].sum()
        engine.backward(loss)
        engine.step()
        assert math.isfinite(loss.item())
        scales.append(loss_fn.scale(out["logit_scale"]).item())
    return scales


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_dim_logit_scale_trains_on_every_stage_with_clipping(dist, tiny_model_json: Path, stage: int) -> None:
    """DeepSpeed trips on open_clip's 0-dim logit_scale (init broadcast, ZeRO-0 clipping)."""
    cfg = _cfg(tiny_model_json, f"deepspeed.zero_stage={stage}", "optim.grad_clip=1.0")
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=3, warmup=0)
    _train(engine, 3, ContrastiveLoss(0, 1))
    assert engine.module.state_dict()["logit_scale"].shape == torch.Size([]) or stage == 3


def _capped_run(dist, tiny_model_json: Path, stage: int, precision: str) -> tuple[list[float], list[float], float]:
    """Six steps with the raw parameter pushed past ln(100): scales seen by the loss, the
    gradients reaching logit_scale, and the parameter the engine holds afterwards."""
    cfg = _cfg(
        tiny_model_json,
        f"deepspeed.zero_stage={stage}",
        f"model.precision={precision}",
        "optim.lr=0.02",
        "optim.weight_decay=0",
        "optim.schedule=const",
    )
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0) - 0.05)
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=6, warmup=0)
    loss_fn = ContrastiveLoss(0, 1, max_logit_scale=100.0)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 400, (4, 16), generator=g)
    scales, grads = [], []
    for _ in range(6):
        out = engine(image=image, text=text)
        scale = out["logit_scale"]
        scale.retain_grad()
        capped = loss_fn.scale(scale)
        # The contrastive loss plus a term that always asks for a larger scale.
        loss = loss_fn(out["image_features"], out["text_features"], scale) - capped
        engine.backward(loss)
        grads.append(float(scale.grad.float().sum()))
        engine.step()
        clamp_logit_scale(engine, 100.0)
        scales.append(capped.item())
    param = safe_get_full_fp32_param(engine.module.logit_scale)
    held = param if param is not None else engine.module.logit_scale.detach()
    return scales, grads, float(held.float().reshape(()))


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (2, "bf16")]
)
def test_logit_scale_is_clamped_like_open_clip_under_every_stage(
    dist, tiny_model_json: Path, stage: int, precision: str
) -> None:
    """The parameter stays at ln(100) (rounded up to its dtype), the loss sees exactly 100 at the
    cap, and the gradient still reaches the parameter there (a clamp after exp would give 0)."""
    scales, grads, param = _capped_run(dist, tiny_model_json, stage, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert param <= logit_scale_bound(100.0, dtype) + 1e-6
    assert param >= math.log(100.0) - 1e-6  # pushed up all the time: it sits at the cap
    assert max(scales) <= 100.0 + 1e-4 and scales[-1] == pytest.approx(100.0, abs=1e-3)
    assert all(g < 0 for g in grads[2:]), grads  # at the cap, the loss still asks for more


def test_logit_scale_bound_reaches_the_cap_in_every_dtype() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bound = logit_scale_bound(100.0, dtype)
        assert torch.tensor(bound).to(dtype).float() == bound
        assert bound >= math.log(100.0) and math.exp(bound) < 103.0
    assert logit_scale_bound(100.0, torch.bfloat16) == 4.625


def _accumulation_run(dist, tiny_model_json: Path, micro: int, mode: str) -> tuple[list[float], dict]:
    cfg = _cfg(tiny_model_json, "train.global_batch=8", f"train.micro_batch={micro}", f"train.accumulation={mode}")
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    accum = 8 // micro
    engine = build_engine(model, cfg, dist, accum_steps=accum, total_steps=3, warmup=0)
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 400, (8, 16), generator=g)
    batches = [{"image": image[i : i + micro], "text": text[i : i + micro]} for i in range(0, 8, micro)]
    step = accumulate_features if mode == "features" else accumulate_gradients
    objective = build_objective(cfg, dist)
    losses = [step(engine, batches, objective, torch.device("cpu"))[0] for _ in range(3)]
    return losses, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.timeout(240)
def test_feature_cache_accumulation_equals_the_full_batch(dist, tiny_model_json: Path) -> None:
    """accum 2 x micro B with open_clip's feature cache = one micro-batch of 2B (contrastive batch 2B)."""
    full_losses, full = _accumulation_run(dist, tiny_model_json, micro=8, mode="gradients")
    cached_losses, cached = _accumulation_run(dist, tiny_model_json, micro=4, mode="features")
    assert cached_losses == pytest.approx(full_losses, abs=1e-4)
    assert all(torch.allclose(full[k], cached[k], atol=1e-4) for k in full)
    # DeepSpeed's own accumulation averages two separate 4-sample contrastive problems instead.
    separate_losses, _ = _accumulation_run(dist, tiny_model_json, micro=4, mode="gradients")
    assert abs(separate_losses[0] - full_losses[0]) > 1e-2


def _boundary_gradients(dist, tiny_model_json: Path, micro: int, mode: str) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as DeepSpeed (ZeRO-0) holds it when it takes the optimizer step."""
    cfg = _cfg(
        tiny_model_json,
        "train.global_batch=8",
        f"train.micro_batch={micro}",
        f"train.accumulation={mode}",
        "deepspeed.zero_stage=0",
    )
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=8 // micro, total_steps=1, warmup=0)
    grads: dict[str, torch.Tensor] = {}
    take_step = engine.step

    def step() -> None:
        if engine.is_gradient_accumulation_boundary():
            grads.update({n: p.grad.detach().clone() for n, p in engine.module.named_parameters()})
        take_step()

    engine.step = step
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(8, 3, 32, 32, generator=g), torch.randint(1, 400, (8, 16), generator=g)
    batches = [{"image": image[i : i + micro], "text": text[i : i + micro]} for i in range(0, 8, micro)]
    step_fn = accumulate_features if mode == "features" else accumulate_gradients
    step_fn(engine, batches, build_objective(cfg, dist), torch.device("cpu"))
    return grads


@pytest.mark.timeout(240)
def test_feature_cache_gradients_equal_the_full_batch_logit_scale_included(dist, tiny_model_json: Path) -> None:
    """Compared before Adam, which is blind to a gradient's scale: 4 x 2 cached = one batch of 8."""
    full = _boundary_gradients(dist, tiny_model_json, micro=8, mode="gradients")
    cached = _boundary_gradients(dist, tiny_model_json, micro=2, mode="features")
    assert full.keys() == cached.keys() and "logit_scale" in full
    for name in full:
        torch.testing.assert_close(cached[name], full[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_engine_trains_on_fp32_batches(dist, tiny_model_json: Path, stage: int) -> None:
    """DeepSpeed casts the module to bf16 but no inputs; the loader's fp32 images must still go in."""
    cfg = _cfg(tiny_model_json, "model.precision=bf16", f"deepspeed.zero_stage={stage}")
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=2, warmup=0)
    assert engine.module.visual.conv1.weight.dtype == torch.bfloat16
    batch = {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 400, (4, 16))}
    objective = build_objective(cfg, dist)
    losses = [accumulate_gradients(engine, [batch], objective, torch.device("cpu"))[0] for _ in range(2)]
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 1])
def test_cpu_engine_takes_torch_adamw_steps(dist, tiny_model_json: Path, stage: int) -> None:
    """DeepSpeed's steps are torch's default AdamW steps: no hidden clipping, same update.

    The fused kernel orders its float operations differently, and Adam amplifies that where a
    gradient is near eps, so parameters agree to a small fraction of one step (lr), not bitwise.
    """
    cfg = _cfg(tiny_model_json, f"deepspeed.zero_stage={stage}", "optim.schedule=const")
    torch.manual_seed(0)
    model = create_model(cfg.model)[0]
    model.output_dict = True
    reference = copy.deepcopy(model)
    engine = build_engine(model, cfg, dist, accum_steps=1, total_steps=3, warmup=0)
    assert engine.basic_optimizer.defaults["fused"] is True
    o = cfg.optim
    torch_adamw = torch.optim.AdamW(param_groups(reference, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    loss_fn = ContrastiveLoss(0, 1)
    _train(engine, 3, loss_fn)
    g = torch.Generator().manual_seed(0)  # _train's batch
    image, text = torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 400, (4, 16), generator=g)
    for _ in range(3):
        out = reference(image=image, text=text)
        torch_adamw.zero_grad()
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        torch_adamw.step()
    ours = engine.module.state_dict()
    for name, value in reference.state_dict().items():
        assert (ours[name] - value).abs().max() < 0.1 * o.lr, name
