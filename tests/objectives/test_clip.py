"""Distributed contrastive loss: 2 gloo ranks equal one process on the concatenated batch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_ranks
from trainer.objectives.clip import ContrastiveLoss


def _batch(n: int = 8, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return img, txt


def _reference(scale: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    img, txt = _batch()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    loss = ContrastiveLoss(0, 1)(img, txt, torch.tensor([scale]))
    loss.backward()
    return loss.item(), img.grad, txt.grad


def _rank_loss(rank: int, world: int, out: Path) -> None:
    for local_loss in (False, True):
        _one_rank_loss(rank, world, out, local_loss)


def _one_rank_loss(rank: int, world: int, out: Path, local_loss: bool) -> None:
    img, txt = _batch()
    rows = slice(rank * 4, rank * 4 + 4)
    mine_i = img[rows].clone().requires_grad_(True)
    mine_t = txt[rows].clone().requires_grad_(True)
    loss = ContrastiveLoss(rank, world, local_loss=local_loss)(mine_i, mine_t, torch.tensor([10.0]))
    loss.backward()
    torch.save({"loss": loss.item(), "gi": mine_i.grad, "gt": mine_t.grad}, out / f"rank{rank}-{local_loss}.pt")


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    run_ranks(_rank_loss, 2, tmp_path)
    for local_loss in (False, True):
        _check(tmp_path, local_loss)


def _check(tmp_path: Path, local_loss: bool) -> None:
    ref_loss, ref_gi, ref_gt = _reference(10.0)
    parts = [torch.load(tmp_path / f"rank{r}-{local_loss}.pt") for r in range(2)]
    mean_loss = sum(p["loss"] for p in parts) / 2
    assert mean_loss == pytest.approx(ref_loss, abs=1e-6)
    if not local_loss:
        assert all(p["loss"] == pytest.approx(ref_loss, abs=1e-6) for p in parts)
    # Every rank backpropagates its own loss through the gather, whose backward sums over ranks,
    # so a local row's gradient is world x that of the mean loss; DeepSpeed's gradient averaging
    # over ranks divides it back.
    gi = torch.cat([p["gi"] for p in parts]) / 2
    gt = torch.cat([p["gt"] for p in parts]) / 2
    assert torch.allclose(gi, ref_gi, atol=1e-6)
    assert torch.allclose(gt, ref_gt, atol=1e-6)


def test_logit_scale_is_capped_with_the_gradient_at_the_cap() -> None:
    """Above the cap the loss sees 100 and the parameter gets the gradient the loss has at 100,
    so a parameter clamped a bf16 step above ln(100) is still pulled back by the loss."""
    loss_fn = ContrastiveLoss(0, 1, max_logit_scale=100.0)
    raw = torch.tensor([math.log(150.0)], requires_grad=True)
    assert loss_fn.scale(raw.exp()).item() == pytest.approx(100.0)
    img, txt = _batch()
    loss_fn(img, txt, raw.exp()).backward()
    at_cap = torch.tensor([100.0], requires_grad=True)
    loss_fn(img, txt, at_cap).backward()
    assert at_cap.grad.abs().item() > 0
    assert raw.grad.item() == pytest.approx(at_cap.grad.item() * 150.0, rel=1e-5)
    below = torch.tensor([math.log(50.0)], requires_grad=True)
    assert loss_fn.scale(below.exp()).item() == pytest.approx(50.0)
    loss_fn(img, txt, below.exp()).backward()
    assert below.grad.abs().item() > 0


def test_half_precision_features_give_an_fp32_loss() -> None:
    """bf16 engines hand over bf16 features; logits up to 100 need fp32 for a precise loss."""
    img, txt = (t.to(torch.bfloat16) for t in _batch())
    scale = torch.tensor([50.0], dtype=torch.bfloat16)
    loss = ContrastiveLoss(0, 1)(img, txt, scale)
    assert loss.dtype == torch.float32
    assert loss.item() == ContrastiveLoss(0, 1)(img.float(), txt.float(), scale.float()).item()
