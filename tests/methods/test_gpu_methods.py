"""The methods on CUDA: bf16 ZeRO-3 on NCCL ranks, teachers and momentum encoder in bf16.

`gpu`-marked: tests/conftest.py skips it without CUDA.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.dist_helpers import run_ranks
from trainer.config import MethodConfig, load_config
from trainer.distributed import init_distributed
from trainer.engine import build_engine
from trainer.loop import accumulate_gradients
from trainer.methods import build_methods
from trainer.methods.base import YearContext
from trainer.methods.ewc import fisher_file
from trainer.model import create_model
from trainer.objectives import build_objective
from trainer.plan import YearStep
from trainer.rundir import RunDir

pytestmark = pytest.mark.gpu
GLOBAL = 16


def _ranks(rank: int, world: int, model_json: str, run: str, out: str) -> None:
    dist = init_distributed("nccl")
    cfg = load_config(
        None,
        [
            f"model.name={model_json}",
            "data.root=/unused",
            f"train.global_batch={GLOBAL}",
            f"train.micro_batch={GLOBAL // world}",
            "deepspeed.zero_stage=3",
            "model.precision=bf16",
        ],
    )
    cfg.methods = [
        MethodConfig(name="distill"),
        MethodConfig(name="ewc", options={"weight": 10.0}),
        MethodConfig(name="ctp", options={"queue": 32}),
        MethodConfig(name="merge", options={"mode": "ema", "ema_decay": 0.9}),
    ]
    torch.manual_seed(1)
    previous = {k: v.float() for k, v in create_model(cfg.model)[0].state_dict().items()}
    torch.manual_seed(0)
    model = create_model(cfg.model, dist.device)[0]
    model.output_dict = True
    engine = build_engine(model, cfg, dist, 1, 4, 0)
    objective, methods = build_objective(cfg, dist), build_methods(cfg, dist)
    step = YearStep(1, "2015", ["2015"], {}, [], {}, GLOBAL, 4, 0, cfg.optim.lr, "previous")
    ctx = YearContext(cfg, dist, RunDir(Path(run)), step, engine.module, objective, lambda: previous, "2014")
    for m in methods:
        m.year_start(ctx)
    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(GLOBAL, 3, 32, 32, generator=g), torch.randint(1, 400, (GLOBAL, 16), generator=g)
    rows = slice(rank * GLOBAL // world, (rank + 1) * GLOBAL // world)
    batch = {
        "image": image[rows].to(dist.device),
        "text": text[rows].to(dist.device),
        "year": (["2014", "2015"] * GLOBAL)[rows],
    }
    losses = []
    for _ in range(3):
        loss, terms, _ = accumulate_gradients(engine, [batch], objective, dist.device, methods)
        for m in methods:
            m.after_step(ctx)
        losses.append((loss, terms))
    ctp = methods[2]
    dtypes = {
        "teacher": str(methods[0].teacher.visual.conv1.weight.dtype),
        "momentum": str(ctp.momentum.model.visual.conv1.weight.dtype),
        "master": str(next(iter(ctp.momentum.master.values())).dtype),
    }
    torch.save(
        {"losses": losses, "dtypes": dtypes, "handed": methods[3].handed_on(ctx) is not None}, Path(out) / f"r{rank}.pt"
    )


@pytest.mark.timeout(600)
def test_methods_train_in_bf16_under_zero3_on_nccl(tmp_path: Path, tiny_model_json: Path) -> None:
    world = min(2, torch.cuda.device_count())
    run = tmp_path / "run"
    torch.manual_seed(2)
    model = create_model(load_config(None, [f"model.name={tiny_model_json}", "data.root=/x"]).model)[0]
    path = fisher_file(run, "2014")
    path.parent.mkdir(parents=True)
    save_file({n: 1e-3 * torch.rand(p.shape) for n, p in model.named_parameters()}, str(path))
    run_ranks(_ranks, world, str(tiny_model_json), str(run), str(tmp_path), backend="nccl")
    out = torch.load(tmp_path / "r0.pt")
    assert out["dtypes"] == {"teacher": "torch.bfloat16", "momentum": "torch.bfloat16", "master": "torch.float32"}
    assert out["handed"]
    for loss, terms in out["losses"]:
        assert math.isfinite(loss)
        assert {"0:Distillation/kl", "1:Ewc/penalty", "2:Ctp/moco", "2:Ctp/topology"} <= set(terms)
        assert all(math.isfinite(v) for v in terms.values())
