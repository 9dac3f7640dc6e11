"""Exemplar memories chosen by the model: herding (iCaRL's mean-of-features) and k-means.

With plan.buffer_select herding or kmeans, a year's replay buffer is not a hash sample but
exemplars picked at the end of the step that trained the year: a candidate pool of the year
(plan.memory_pool samples of smallest key hash) is embedded by the year-end model, and

* herding keeps, one at a time, the candidate that brings the running mean of the kept features
  closest to the pool's mean feature (Welling 2009; iCaRL's exemplar selection, Rebuffi et al.
  2017), an ordered list whose every prefix is a herding memory;
* kmeans clusters the features (k-means++ seeded by (seed, year), Lloyd's iterations) into as
  many clusters as the largest buffer the year will have, keeps the candidate nearest each
  centroid, largest clusters first.

Features are `image`, `text` or `joint` (both L2-normalised embeddings side by side, so herding
matches both towers' means at once). Candidates are embedded in whole batches dealt to ranks in
turn, so each is encoded in the same batch on any number of ranks and every rank selects from the
same bits: the memory does not depend on the world size. A later, smaller buffer of the year is a
prefix of its list (iCaRL's reduction). The list goes to runs/<name>/memory/<year>.json before the
yearly checkpoint is marked complete, so a kill during selection redoes it from the last
checkpoint with the same result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.config import Config
from trainer.data.buffers import Listed
from trainer.data.order import stable_hash
from trainer.data.shards import DataError, YearShards
from trainer.distributed import DistInfo, all_gather_object
from trainer.files import write_text_atomic
from trainer.methods.models import full_weights
from trainer.methods.yeardata import PassSpec, positions, rank_batches, sample_shards
from trainer.model import create_model
from trainer.plan import Plan

log = logging.getLogger("tic")

SELECTORS = ("herding", "kmeans")
EMBED_BATCH = 64


def herding(features: torch.Tensor, m: int) -> list[int]:
    """Indices of `m` rows chosen one by one to keep their mean closest to the mean of all rows."""
    x = features.double()
    mean = x.mean(0)
    total = torch.zeros_like(mean)
    taken = torch.zeros(len(x), dtype=torch.bool)
    out: list[int] = []
    for k in range(1, min(m, len(x)) + 1):
        gap = ((mean[None, :] - (total[None, :] + x) / k) ** 2).sum(1)
        gap[taken] = float("inf")
        i = int(torch.argmin(gap))  # ties: the lowest index
        out.append(i)
        taken[i] = True
        total += x[i]
    return out


def kmeans(features: torch.Tensor, m: int, seed: int, iterations: int = 25) -> list[int]:
    """For m k-means clusters (k-means++ start), the row nearest each centroid, largest cluster first."""
    x = features.double()
    m = min(m, len(x))
    g = torch.Generator().manual_seed(seed % 2**63)
    centres = [int(torch.randint(len(x), (1,), generator=g))]
    nearest = ((x - x[centres[0]]) ** 2).sum(1)
    for _ in range(1, m):
        weights = nearest.clamp(min=0)
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=g)) if weights.sum() > 0 else 0
        centres.append(pick)
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    c = x[centres].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, c).argmin(1)
        moved = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(m)])
        if torch.equal(moved, c):
            break
        c = moved
    assign = torch.cdist(x, c).argmin(1)
    sizes = torch.bincount(assign, minlength=m)
    out: list[int] = []
    taken = torch.zeros(len(x), dtype=torch.bool)
    for j in sorted(range(m), key=lambda j: (-int(sizes[j]), j)):
        d = ((x - c[j]) ** 2).sum(1)
        d[taken] = float("inf")
        i = int(torch.argmin(d))
        out.append(i)
        taken[i] = True
    return out


def memory_file(run_path: Path, year: str) -> Path:
    return run_path / "memory" / f"{year}.json"


def largest_buffers(plan: Plan, index: int) -> dict[str, int]:
    """The new years of plan step `index` that later steps replay, with their largest buffer."""
    new = set(plan.steps[index].new_years)
    out: dict[str, int] = {}
    for s in plan.steps[index + 1 :]:
        for y in s.buffered:
            if y in new:
                out[y] = max(out.get(y, 0), s.pool[y])
    return out


def _embed(model: Any, batch: Mapping[str, Any], how: str, device: torch.device) -> torch.Tensor:
    out = model(image=batch["image"].to(device), text=batch["text"].to(device))
    image, text = F.normalize(out["image_features"].float(), dim=-1), F.normalize(out["text_features"].float(), dim=-1)
    return {"image": image, "text": text, "joint": torch.cat([image, text], 1)}[how].cpu()


@torch.no_grad()
def select_memories(
    cfg: Config, dist: DistInfo, module: torch.nn.Module, plan: Plan, index: int, run_path: Path
) -> None:
    """Choose and write the memories of step `index`'s new years (every rank calls it)."""
    wanted = largest_buffers(plan, index)
    if not wanted:
        return
    model, _, preprocess, tokenizer = create_model(cfg.model, dist.device)
    model.load_state_dict(full_weights(module))  # a collective under ZeRO-3
    model.output_dict = True
    model.eval()
    for year, m in sorted(wanted.items()):
        started = time.perf_counter()
        pool = max(cfg.plan.memory_pool, m)
        spec = PassSpec(cfg.data.root, [year], pool, EMBED_BATCH, cfg.train.seed)
        mine = [
            (b["index"], _embed(model, b, cfg.plan.memory_features, dist.device), b["position"], b["valid"])
            for b in rank_batches(spec, dist, preprocess, tokenizer, whole=True)
        ]
        parts = sorted((p for ranks in all_gather_object(mine) for p in ranks), key=lambda p: p[0])
        features = torch.cat([p[1] for p in parts])
        where = [pos for p in parts for pos in p[2]]
        valid = [v for p in parts for v in p[3]]
        keep = [i for i, ok in enumerate(valid) if ok]
        if len(keep) < m:
            raise DataError(f"year {year}: {len(keep)} readable candidates for a memory of {m}")
        chosen_rows = (
            herding(features[keep], m)
            if cfg.plan.buffer_select == "herding"
            else kmeans(features[keep], m, stable_hash(cfg.train.seed, year, "kmeans"))
        )
        places = positions(sample_shards(spec)[0])
        chosen = [places[where[keep[i]]] for i in chosen_rows]
        seconds = time.perf_counter() - started
        how = cfg.plan.buffer_select
        log.info("memory of %s: %d by %s from %d candidates in %.1f s", year, len(chosen), how, len(keep), seconds)
        if dist.is_main:
            record = {
                "year": year,
                "select": cfg.plan.buffer_select,
                "features": cfg.plan.memory_features,
                "candidates": len(keep),
                "exemplars": [[name, member] for name, member in chosen],
            }
            path = memory_file(run_path, year)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(record) + "\n")


def memory_shards(shards: YearShards, run_path: Path, year: str, samples: int) -> YearShards:
    """The first `samples` exemplars of the year's memory, as shards to read (members in file order)."""
    path = memory_file(run_path, year)
    try:
        exemplars = json.loads(path.read_text())["exemplars"][:samples]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: the memory of {year} cannot be read ({e})") from None
    if len(exemplars) < samples:
        raise DataError(f"{path}: {len(exemplars)} exemplars of {year}, the plan replays {samples}")
    by_shard: dict[str, list[int]] = {}
    for name, member in exemplars:
        by_shard.setdefault(str(name), []).append(int(member))
    index = {n: i for i, n in enumerate(shards.names)}
    unknown = [n for n in by_shard if n not in index]
    if unknown:
        raise DataError(f"{path}: shard {unknown[0]} of {year} is not in the data")
    names = sorted(by_shard, key=lambda n: index[n])
    members = [np.array(sorted(by_shard[n]), dtype=np.int64) for n in names]
    return YearShards(shards.prefix, names, np.array([len(m) for m in members]), Listed(members))
