"""EWC's Fisher pass: the same global batches and the same estimate on any number of ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import write_year
from tests.dist_helpers import run_ranks
from trainer.config import load_config
from trainer.distributed import DistInfo, init_distributed
from trainer.methods.ewc import estimate_fisher
from trainer.methods.yeardata import PassSpec, rank_batches
from trainer.model import create_model


def _model(model_json: str):
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.name={model_json}", "data.root=/unused"])
    model, _, preprocess, tokenizer = create_model(cfg.model)
    model.output_dict = True
    return model, preprocess, tokenizer


def _fisher_on_ranks(rank: int, world: int, model_json: str, root: str, out: str) -> None:
    dist = init_distributed("gloo")
    model, preprocess, tokenizer = _model(model_json)
    spec = PassSpec(root, ["2014", "2015"], samples=48, batch=8, seed=0)
    keys = [b["key"] for b in rank_batches(spec, dist, preprocess, tokenizer)]
    fisher = estimate_fisher(model, rank_batches(spec, dist, preprocess, tokenizer), rank, world, 100.0)
    torch.save({"fisher": fisher, "keys": keys}, Path(out) / f"w{world}-r{rank}.pt")


@pytest.mark.timeout(300)
def test_fisher_does_not_depend_on_the_world_size(tmp_path: Path, tiny_model_json: Path) -> None:
    root = tmp_path / "data"
    write_year(root, "2014", n=40, per_shard=12)  # unequal years and shards: a hash-chosen sample of each
    write_year(root, "2015", n=64, per_shard=10)
    for world in (1, 2):
        run_ranks(_fisher_on_ranks, world, str(tiny_model_json), str(root), str(tmp_path))
    one = torch.load(tmp_path / "w1-r0.pt")
    two = [torch.load(tmp_path / f"w2-r{r}.pt") for r in range(2)]
    # 48 samples, 24 per year, in 6 global batches of 8; rank r reads rows 4r..4r+3 of each.
    assert len(one["keys"]) == 6 and all(len(b) == 8 for b in one["keys"])
    for b, batch in enumerate(one["keys"]):
        assert two[0]["keys"][b] + two[1]["keys"][b] == batch
    flat = [k for b in one["keys"] for k in b]
    assert len(set(flat)) == 48 and sum(k.startswith("2014") for k in flat) == 24
    assert two[0]["fisher"].keys() == one["fisher"].keys()
    for name, f in one["fisher"].items():
        assert torch.all(f >= 0)
        for r in range(2):
            torch.testing.assert_close(two[r]["fisher"][name], f, rtol=1e-4, atol=1e-6 * float(f.max()))
    assert any(float(f.max()) > 0 for f in one["fisher"].values())


def test_the_pass_refuses_a_batch_the_ranks_cannot_split(shard_root: Path, tiny_model_json: Path) -> None:
    from trainer.data.shards import DataError

    _, preprocess, tokenizer = _model(str(tiny_model_json))
    dist = DistInfo(0, 3, 0, torch.device("cpu"), "gloo")
    with pytest.raises(DataError, match="batch of 8 does not split over 3 ranks"):
        next(rank_batches(PassSpec(str(shard_root), ["2014"], 16, 8, 0), dist, preprocess, tokenizer))
    one = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
    with pytest.raises(DataError, match="fewer than one year-end pass batch of 64"):
        next(rank_batches(PassSpec(str(shard_root), ["2014"], 16, 64, 0), one, preprocess, tokenizer))
