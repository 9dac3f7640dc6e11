"""Trimmed text batches: cut after the last EOT token, the same features and gradients as full ones."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL
from trainer.config import ModelConfig
from trainer.model import create_model
from trainer.text_trim import TrimmedTokenizer, trim_tokens

SOT, EOT = 49406, 49407
CAPTIONS = ["a red square", "a small blue circle at the top left on a striped background", ""]


def test_trim_tokens_keeps_through_the_last_eot() -> None:
    tokens = torch.tensor([[SOT, 5, 6, EOT, 0, 0, 0], [SOT, EOT, 0, 0, 0, 0, 0]])
    assert trim_tokens(tokens).tolist() == [[SOT, 5, 6, EOT], [SOT, EOT, 0, 0]]
    full = torch.tensor([[SOT, 5, 6, 7, 8, 9, EOT]])  # a truncated caption ends in EOT at the last slot
    assert trim_tokens(full).shape == (1, 7)


def _pair(name: str, attention: str) -> tuple:
    """A trimming and a plain model with the same weights, and their tokenizers."""
    torch.manual_seed(0)
    trimmed, _, _, tok = create_model(ModelConfig(name=name, attention=attention))
    plain, _, _, plain_tok = create_model(ModelConfig(name=name, attention=attention, trim_text=False))
    plain.load_state_dict(trimmed.state_dict())
    return trimmed, tok, plain, plain_tok


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attention", ["sdpa", "torch"])
def test_trimmed_batches_give_the_same_features_and_gradients(tiny_model_json: Path, attention: str) -> None:
    trimmed, tok, plain, plain_tok = _pair(str(tiny_model_json), attention)
    assert isinstance(tok, TrimmedTokenizer) and not isinstance(plain_tok, TrimmedTokenizer)
    short, full = tok(CAPTIONS), plain_tok(CAPTIONS)
    ctx = TINY_MODEL["text_cfg"]["context_length"]
    assert full.shape == (3, ctx) and short.shape[1] < ctx
    assert torch.equal(short, full[:, : short.shape[1]])
    images = torch.randn(3, 3, 32, 32)
    a, b = trimmed(images, short), plain(images, full)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-5)
    (a[0] @ a[1].T).sum().backward()
    (b[0] @ b[1].T).sum().backward()
    for (name, p), q in zip(trimmed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    # Full-length batches (eval, other callers) still work on the trimming model.
    torch.testing.assert_close(trimmed.encode_text(full), plain.encode_text(full), atol=1e-6, rtol=1e-5)


@pytest.mark.timeout(60)
def test_tokenizer_wrapper_pickles_and_delegates(tiny_model_json: Path) -> None:
    _, _, _, tok = create_model(ModelConfig(name=str(tiny_model_json)))
    assert tok.context_length == TINY_MODEL["text_cfg"]["context_length"]
    again = pickle.loads(pickle.dumps(tok))  # DataLoader workers under spawn receive it pickled
    assert torch.equal(again(CAPTIONS), tok(CAPTIONS))


@pytest.mark.timeout(60)
def test_no_trim_where_it_would_not_be_exact(tmp_path: Path) -> None:
    """Last-token pooling reads the padding: the tokenizer stays as it is and batches stay full."""
    config = json.loads(json.dumps(TINY_MODEL))
    config["text_cfg"]["pool_type"] = "last"
    path = tmp_path / "last-pool.json"
    path.write_text(json.dumps(config))
    model, _, _, tok = create_model(ModelConfig(name=str(path)))
    assert not isinstance(tok, TrimmedTokenizer)
    assert tok(CAPTIONS).shape[1] == TINY_MODEL["text_cfg"]["context_length"]
    assert "encode_text" not in vars(model)
