"""Exemplar memories: herding and k-means by definition, the same memory on 1 and 2 ranks, and a
CLI run that replays exactly the chosen exemplars and chooses them again after a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_year
from tests.dist_helpers import deepspeed_train, run_ranks
from tests.run_helpers import demo_args
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.exemplars import herding, kmeans, largest_buffers, memory_file, select_memories
from trainer.model import create_model
from trainer.plan import make_plan


def test_herding_keeps_the_running_mean_closest_to_the_mean() -> None:
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [4.0, 0.0], [6.0, 1.0], [5.0, -1.0]])  # mean (5, 0)
    order = herding(x, 5)
    assert order[0] == 2  # (4, 0): nearest the mean; (5, -1) and (6, 1) are farther
    # then the one that brings (4, 0) + x over 2 closest to (5, 0): (6, 1) gives (5, 0.5), (5, -1) (4.5, -0.5)
    assert order[1] == 3
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert herding(x, 2) == order[:2]  # every prefix is the smaller memory


def test_kmeans_keeps_one_sample_per_cluster_largest_first() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    counts = [30, 10, 20]
    x = torch.cat([c + 0.5 * torch.randn(n, 2, generator=g) for c, n in zip(centres, counts)])
    chosen = kmeans(x, 3, seed=1)
    cluster = [0 if i < 30 else 1 if i < 40 else 2 for i in chosen]
    assert cluster == [0, 2, 1]  # by cluster size: 30, 20, 10
    for i, c in zip(chosen, cluster):  # the sample nearest its centroid, which is the cluster's mean
        members = x[[j for j in range(60) if (0 if j < 30 else 1 if j < 40 else 2) == c]]
        assert torch.allclose(x[i], members[((members - members.mean(0)) ** 2).sum(1).argmin()])
    assert kmeans(x, 3, seed=1) == chosen


def _cfg(root: Path, model_json: str, how: str):
    return load_config(
        None,
        [
            f"model.name={model_json}",
            f"data.root={root}",
            "plan.strategy=cumulative-exp",
            f"plan.buffer_select={how}",
            "plan.memory_pool=60",
            "train.global_batch=8",
            "train.micro_batch=8",
        ],
    )


def _select(rank: int, world: int, root: str, model_json: str, out: str) -> None:
    dist = init_distributed("gloo")
    for how in ("herding", "kmeans"):
        cfg = _cfg(Path(root), model_json, how)
        plan = make_plan(cfg, {"2014": 60, "2015": 40, "2016": 30})
        torch.manual_seed(0)
        model = create_model(cfg.model)[0]
        model.output_dict = True
        select_memories(cfg, dist, model, plan, 0, Path(out) / f"w{world}-{how}")


@pytest.mark.timeout(300)
def test_the_memory_does_not_depend_on_the_world_size(tmp_path: Path, tiny_model_json: Path) -> None:
    root = tmp_path / "data"
    write_year(root, "2014", n=60, per_shard=14, corrupt=(3,))  # a bad candidate is never chosen
    cfg = _cfg(root, str(tiny_model_json), "herding")
    plan = make_plan(cfg, {"2014": 60, "2015": 40, "2016": 30})
    assert largest_buffers(plan, 0) == {"2014": 20}  # cumulative-exp: half of 2015's 40 after 2015
    for world in (1, 2):
        run_ranks(_select, world, str(root), str(tiny_model_json), str(tmp_path))
    for how in ("herding", "kmeans"):
        one = json.loads(memory_file(tmp_path / f"w1-{how}", "2014").read_text())
        two = json.loads(memory_file(tmp_path / f"w2-{how}", "2014").read_text())
        assert one == two
        assert one["candidates"] == 59 and len(one["exemplars"]) == 20
        assert ["000000.tar", 3] not in one["exemplars"]
        assert len({tuple(e) for e in one["exemplars"]}) == 20


def _settings(root: Path, runs: Path, model: Path) -> list[str]:
    return demo_args(
        root,
        runs,
        model,
        "memory",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.samples=96",
        "data.workers=1",
        "plan.years=[2014,2015,2016]",
        "plan.strategy=cumulative-exp",
        "plan.buffer_select=herding",
        "plan.memory_pool=40",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=10",
        "logging.record_keys=true",
        "methods=[{name: distill}]",  # iCaRL: herding exemplars + distillation
    )


@pytest.mark.reliability  # two whole runs: make reliability, not make test
@pytest.mark.timeout(600)
def test_a_run_replays_its_exemplars_and_chooses_them_again_after_a_kill(tmp_path: Path, tiny_model_json: Path) -> None:
    root = tmp_path / "data"
    write_year(root, "2014", n=48, per_shard=16)
    write_year(root, "2015", n=32, per_shard=16)
    write_year(root, "2016", n=40, per_shard=8)
    deepspeed_train(_settings(root, tmp_path / "runs", tiny_model_json), tmp_path / "train.log")
    run = tmp_path / "runs" / "memory"
    memory = json.loads(memory_file(run, "2014").read_text())
    # cumulative-exp: 2014's buffer is 16 (half of 2015's 32) in 2015, 10 in 2016 (a quarter of
    # 2016's 40); each step draws
    # 96 samples, 2014's share of them (32 of 48 in 2015) passing over its buffer at least twice.
    assert memory["select"] == "herding" and len(memory["exemplars"]) == 16
    keys = {e[0] + "/" + str(e[1]) for e in memory["exemplars"]}
    index = {f"{2014}{i:07d}": f"{i // 16:06d}.tar/{i % 16}" for i in range(48)}
    seen: dict[int, set[str]] = {1: set(), 2: set()}
    for rank in (0, 1):
        for line in (run / "keys" / f"rank-{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            step = (r["global_step"] - 1) // 12
            if step in seen:
                seen[step] |= {index[k] for k in r["keys"] if k.startswith("2014")}
    assert seen[1] == keys  # 2015's step replays exactly the 16 exemplars
    ordered = [e[0] + "/" + str(e[1]) for e in memory["exemplars"]]
    assert seen[2] == set(ordered[:10])  # 2016's step: the first 10 in herding order
    # A kill during 2014's selection: the year checkpoint and the memory never got written.
    copy = tmp_path / "again" / "memory"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("year-*", "memory", "keys"))
    for later in (copy / "checkpoints").glob("step-*"):
        if later.name != "step-4":
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").write_text("step-4\n")
    deepspeed_train([*_settings(root, tmp_path / "again", tiny_model_json), "--resume", "auto"], tmp_path / "again.log")
    assert json.loads(memory_file(copy, "2014").read_text()) == memory
    assert json.loads(memory_file(copy, "2015").read_text()) == json.loads(memory_file(run, "2015").read_text())
