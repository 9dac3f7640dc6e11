"""Exact retrieval recall and zero-shot accuracy from embeddings, with deterministic tie-breaking.

Rankings sort candidates by score, highest first; equal scores are ordered by candidate index
(lower first), so every number here is reproducible and independent of how the work was split.
Functions return counts, not fractions, so ranks can sum their share of the queries exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KS = (1, 5, 10)
TOPK = (1, 5)

# Metric name -> what it means; retrieval names without "strict_" use caption matching.
METRICS: dict[str, str] = {
    **{
        f"{d}_R{k}": f"{label} Recall@{k}; any item whose caption text equals the query's own caption is a match"
        for d, label in (("i2t", "image->text"), ("t2i", "text->image"))
        for k in KS
    },
    **{f"mean_R{k}": f"mean of image->text and text->image Recall@{k} (caption match)" for k in KS},
    **{
        f"strict_{d}_R{k}": f"{label} Recall@{k}; only the query's own pair is a match (position-based, "
        "as clip_benchmark / open_clip)"
        for d, label in (("i2t", "image->text"), ("t2i", "text->image"))
        for k in KS
    },
    **{f"strict_mean_R{k}": f"mean of strict image->text and text->image Recall@{k}" for k in KS},
    "zs_top1": "zero-shot classification top-1 accuracy (class names x templates from the manifest)",
    "zs_top5": "zero-shot classification top-5 accuracy",
    "zs_balanced": "zero-shot balanced accuracy: mean over classes present of per-class top-1 recall",
}
HEADLINE = "mean_R1"


def first_hit_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row, how many candidates rank above the first correct one (0 = a correct one is top)."""
    best = torch.where(correct, scores, torch.full_like(scores, float("-inf"))).amax(1, keepdim=True)
    # argmax returns the first maximal index: the lowest-index correct candidate among the best.
    first = (correct & (scores == best)).to(torch.uint8).argmax(1, keepdim=True)
    index = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > best) | ((scores == best) & (index < first))
    return ahead.sum(1)


def retrieval_hits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_groups: torch.Tensor,
    candidate_groups: torch.Tensor,
    ks: Sequence[int] = KS,
    chunk: int = 1024,
) -> torch.Tensor:
    """Count of queries whose first match is within the top k, per k; a match shares the query's group."""
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    bounds = torch.tensor(list(ks), device=queries.device)
    for i in range(0, len(queries), chunk):
        scores = queries[i : i + chunk] @ candidates.T
        correct = query_groups[i : i + chunk, None] == candidate_groups[None, :]
        rank = first_hit_rank(scores, correct)
        hits += (rank[:, None] < bounds[None, :]).sum(0)
    return hits


def recall(images: torch.Tensor, texts: torch.Tensor, groups: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Single-process image->text and text->image Recall@k over paired rows (groups: caption ids)."""
    n = len(images)
    out: dict[str, float] = {}
    for direction, q, c in (("i2t", images, texts), ("t2i", texts, images)):
        hits = retrieval_hits(q, c, groups, groups, ks)
        out.update({f"{direction}_R{k}": h / n for k, h in zip(ks, hits.tolist())})
    return out


def class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, how many classes rank above the true one (ties: the lower class index ranks first)."""
    true = logits.gather(1, labels[:, None])
    index = torch.arange(logits.shape[1], device=logits.device)
    return ((logits > true) | ((logits == true) & (index < labels[:, None]))).sum(1)


def zeroshot_counts(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """[top-1 hits, top-5 hits, per-class top-1 hits (C), per-class counts (C)] as one float64 vector.

    `labels` index the `num_classes` classes; `allowed` (class indices) restricts the candidates,
    and a label outside it is never predicted.
    """
    top1 = labels.new_zeros(num_classes, dtype=torch.float64)
    count = labels.new_zeros(num_classes, dtype=torch.float64)
    hits = torch.zeros(len(TOPK), dtype=torch.float64, device=logits.device)
    if len(labels):
        if allowed is not None:
            inside = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
            inside[allowed] = True
            logits = logits.masked_fill(~inside[None, :], float("-inf"))
            rank = class_ranks(logits, labels)
            rank = torch.where(inside[labels], rank, torch.iinfo(rank.dtype).max)
        else:
            rank = class_ranks(logits, labels)
        hits = torch.stack([(rank < k).sum() for k in TOPK]).to(torch.float64)
        count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        top1.index_add_(0, labels, (rank == 0).to(torch.float64))
    return torch.cat([hits, top1, count])


def zeroshot_metrics(counts: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracies from (summed) zeroshot_counts; empty when no sample carried a class."""
    hits, top1, count = counts[: len(TOPK)], counts[len(TOPK) : len(TOPK) + num_classes], counts[-num_classes:]
    total = float(count.sum())
    if total == 0:
        return {}
    present = count > 0
    return {
        "zs_top1": float(hits[0]) / total,
        "zs_top5": float(hits[1]) / total,
        "zs_balanced": float((top1[present] / count[present]).mean()),
    }
