"""Memory planning: the activation formula against saved tensors measured on CPU, DeepSpeed states, the CLI."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.conftest import TINY_MODEL
from trainer.config import ModelConfig
from trainer.memory import activation_bytes, block_bytes, max_micro_batch, measure_saved_bytes, state_rows, towers
from trainer.model import create_model
from trainer.objectives.clip import ContrastiveLoss

REPO = Path(__file__).resolve().parents[1]
BATCH = 6

# Three tiny open_clip ViTs covering the branches of the formula: the shared tiny model; QuickGELU,
# a non-square image, other MLP ratios and head counts; CLIPA-style pooling (no ln_pre, avg pool
# with ln after pooling, text 'last' pool without causal mask) with LayerScale in both towers.
CONFIGS = {
    "tiny": TINY_MODEL,
    "quick": {
        "embed_dim": 48,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": [48, 32],
            "layers": 3,
            "width": 96,
            "patch_size": 16,
            "head_width": 16,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {"context_length": 20, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 3.0},
    },
    "clipa": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "patch_size": 8,
            "head_width": 32,
            "no_ln_pre": True,
            "pool_type": "avg",
            "final_ln_after_pool": True,
            "ls_init_value": 1e-4,
        },
        "text_cfg": {
            "context_length": 12,
            "vocab_size": 1000,
            "width": 64,
            "heads": 2,
            "layers": 2,
            "pool_type": "last",
            "no_causal_mask": True,
            "proj_bias": True,
            "ls_init_value": 1e-4,
        },
    },
}


def _model_and_batch(tmp_path: Path, key: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    path = tmp_path / f"memtest-{key}.json"  # distinct stems: open_clip registers configs by stem
    path.write_text(json.dumps(CONFIGS[key]))
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=str(path), attention="sdpa"))[0]  # the trainer's CPU attention
    model.output_dict = True
    size = CONFIGS[key]["vision_cfg"]["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(BATCH, 3, h, w)
    texts = torch.randint(0, 999, (BATCH, CONFIGS[key]["text_cfg"]["context_length"]))
    return model, images, texts


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_estimate_matches_saved_tensors(tmp_path: Path, key: str) -> None:
    model, images, texts = _model_and_batch(tmp_path, key)
    measured = {ckpt: measure_saved_bytes(model, images, texts, ContrastiveLoss(0, 1), ckpt) for ckpt in (False, True)}
    for ckpt, got in measured.items():
        est = activation_bytes(CONFIGS[key], BATCH, "fp32", ckpt)
        assert est == pytest.approx(got, rel=0.10), (key, ckpt, est, got)
    # Checkpointing must really drop the blocks' insides, and the formula must see the same saving.
    saving = activation_bytes(CONFIGS[key], BATCH, "fp32", False) - activation_bytes(CONFIGS[key], BATCH, "fp32", True)
    assert measured[True] < measured[False] / 2
    assert saving == pytest.approx(measured[False] - measured[True], rel=0.10)


def test_cpu_sdpa_saves_no_attention_matrix_and_math_kernel_does(tmp_path: Path) -> None:
    """CPU SDPA runs its flash kernel (q, k, v, out, log-sum-exp), like the GPU kernels; MATH keeps S x S."""
    model, images, texts = _model_and_batch(tmp_path, "tiny")
    cfg = CONFIGS["tiny"]
    default = measure_saved_bytes(model, images, texts, ContrastiveLoss(0, 1), False)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = measure_saved_bytes(model, images, texts, ContrastiveLoss(0, 1), False)
    assert activation_bytes(cfg, BATCH, "fp32", False, "efficient") == pytest.approx(default, rel=0.10)
    assert activation_bytes(cfg, BATCH, "fp32", False, "math") == pytest.approx(math_, rel=0.10)
    vision, text = towers(cfg)
    probs = sum(t.layers * BATCH * t.heads * t.tokens**2 * 4 for t in (vision, text))
    assert math_ - default == pytest.approx(probs, rel=0.10)  # the difference is the probabilities
    with pytest.raises(ValueError, match="attention kernel"):
        block_bytes(vision, 1, 4, False, "flash3")


def test_bf16_estimate_matches_saved_tensors(tmp_path: Path) -> None:
    """bf16 halves activations; statistics, int64 ids and the fp32 loss stay (CPU LayerNorm keeps
    mean/rstd in bf16 where CUDA keeps fp32, so the GPU formula sits a little above the CPU)."""
    model, images, texts = _model_and_batch(tmp_path, "quick")
    model.to(torch.bfloat16)
    for ckpt in (False, True):
        got = measure_saved_bytes(model, images.bfloat16(), texts, ContrastiveLoss(0, 1), ckpt)
        est = activation_bytes(CONFIGS["quick"], BATCH, "bf16", ckpt)
        assert est == pytest.approx(got, rel=0.10), (ckpt, est, got)
        assert est < 0.6 * activation_bytes(CONFIGS["quick"], BATCH, "fp32", ckpt)


def test_state_rows_follow_deepspeed_bytes_per_param() -> None:
    p, largest, gpn, nodes = 10**9, 10**7, 8, 2
    rows = {(r.stage, r.offload): r for r in state_rows(p, largest, gpn, nodes)}
    world = gpn * nodes
    assert rows[0, "none"].gpu_bytes == 20 * p  # nothing partitioned: 2 + 18 bytes per param
    assert rows[2, "none"].gpu_bytes == 2 * p + 18 * p // world
    assert rows[1, "none"].gpu_bytes == 4 * p + 16 * p // world
    assert rows[2, "cpu optimizer"].gpu_bytes == 2 * p
    assert rows[3, "none"].gpu_bytes == 4 * largest + 18 * p // world
    assert rows[3, "cpu optimizer+param"].gpu_bytes == 4 * largest
    order = [(0, "none"), (1, "none"), (2, "none"), (3, "none")]
    assert [rows[k].gpu_bytes for k in order] == sorted((rows[k].gpu_bytes for k in order), reverse=True)


def test_max_micro_batch_is_the_threshold() -> None:
    assert max_micro_batch(lambda b: b <= 1000) == 1000
    assert max_micro_batch(lambda b: b * b <= 10**6) == 1000
    assert max_micro_batch(lambda b: False) == 0
    assert max_micro_batch(lambda b: True, limit=300) == 300


def _plan_cli():
    spec = importlib.util.spec_from_file_location("plan_cli", REPO / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW = re.compile(
    r"^([* ])\s+([0-3]) (none|cpu optimizer\+param|cpu optimizer)"
    r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)$"
)


def test_memory_cli_table_and_max_micro_monotone_in_gpu_mem(capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan_cli()
    config = str(REPO / "configs" / "tic_debug.yaml")
    best = {}
    for mem in (16, 40, 80):
        assert (
            plan.main(["--config", config, "--memory", "--gpus-per-node", "8", "--nodes", "2", "--gpu-mem", str(mem)])
            == 0
        )
        out = capsys.readouterr().out
        assert out.startswith("tic_debug: ViT-B-32, 151.3M params") and "= 16 GPUs, " in out and "assumptions:" in out
        rows = [m.groups() for m in map(ROW.match, out.splitlines()) if m]
        assert [(int(r[1]), r[2]) for r in rows] == [
            (0, "none"),
            (1, "none"),
            (1, "cpu optimizer"),
            (2, "none"),
            (2, "cpu optimizer"),
            (3, "none"),
            (3, "cpu optimizer"),
            (3, "cpu optimizer+param"),
        ]
        assert [r[0] for r in rows].count("*") == 1 and rows[3][0] == "*"  # tic_debug: ZeRO-2, no offload
        best[mem] = [(int(r[7]), int(r[8])) for r in rows]
        for off, on in best[mem]:
            assert 0 < off < on  # checkpointing always fits a larger micro-batch
    for lo, hi in ((16, 40), (40, 80)):
        assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(best[lo], best[hi]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--memory", "--gpu-mem", "0"],
        ["--memory", "--nodes", "-1"],
        ["--memory", "--gpus-per-node", "two"],
        ["--gpu-mem", "80"],
        ["--memory", "--compare"],
    ],
)
def test_memory_cli_bad_arguments_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan_cli()
    with pytest.raises(SystemExit) as exc:
        plan.main(["--config", str(REPO / "configs" / "tic_debug.yaml"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("plan: error: "), err


def test_memory_cli_missing_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _plan_cli().main(["--config", str(tmp_path / "nope.yaml"), "--memory"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("plan: error: --config: no such file"), err


def test_presets_keep_tics_contrastive_batch_and_gradient_accumulation_is_warned(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = _plan_cli()
    assert plan.main(["--all-presets", "--memory", "--gpus-per-node", "8", "--nodes", "1"]) == 0
    out = capsys.readouterr().out
    found = re.findall(r"global batch (\d+) = .*; contrastive batch (\d+) \(features accumulation\)", out)
    assert len(found) == 4 and all(g == c for g, c in found), out
    assert "warning" not in out
    config = str(REPO / "configs" / "tic_medium.yaml")
    assert plan.main(["--config", config, "--memory", "train.accumulation=gradients"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("contrastive batch 2048 (gradients accumulation)")
    assert out[2].startswith("warning: train.accumulation=gradients: contrastive batch 2048 (micro-batch 256 x 8")
    # Enough GPUs for the global batch in one micro-batch each: nothing to warn about.
    assert plan.main(["--config", config, "--memory", "--nodes", "2", "train.accumulation=gradients"]) == 0
    assert "warning" not in capsys.readouterr().out
