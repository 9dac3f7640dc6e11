"""TiC evaluation math by hand: strict and caption-matched recall, zero-shot accuracy, rank blocks,
the checkpoint x year matrix with ID/BWT/FWT, and its figures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.eval.data import rank_block
from trainer.eval.evaluator import log_record
from trainer.eval.matrix import CheckpointRef, Matrix, relation, transfer_summary
from trainer.eval.metrics import first_hit_rank, recall, retrieval_hits, zeroshot_counts, zeroshot_metrics
from trainer.eval.plots import compare_figure, heatmap

# ---------------------------------------------------------------- metrics by hand

# Queries x candidates. Items 0 and 2 share a caption (group 0); ties are broken by candidate index.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.9, 0.0],  # own pair 0 ties with 2 and wins (lower index): strict rank 0, caption rank 0
        [0.5, 0.2, 0.1, 0.7],  # own pair 1 behind 0 and 3: rank 2 either way
        [0.9, 0.3, 0.9, 0.2],  # own pair 2 ties with 0, which goes first: strict rank 1; 0 has its caption: rank 0
        [0.4, 0.4, 0.8, 0.4],  # own pair 3 behind 2 and the tied 0, 1: rank 3 either way
    ]
)
GROUPS = torch.tensor([0, 1, 0, 2])


@pytest.mark.timeout(10)
def test_recall_strict_and_caption_match_by_hand():
    own = torch.arange(4)
    assert first_hit_rank(SCORES, own[:, None] == own[None, :]).tolist() == [0, 2, 1, 3]
    assert first_hit_rank(SCORES, GROUPS[:, None] == GROUPS[None, :]).tolist() == [0, 2, 0, 3]
    # One-hot queries make queries @ candidates.T equal SCORES.
    queries, candidates = torch.eye(4), SCORES.T.contiguous()
    assert retrieval_hits(queries, candidates, own, own, ks=(1, 2, 3)).tolist() == [1, 2, 3]
    assert retrieval_hits(queries, candidates, GROUPS, GROUPS, ks=(1, 2, 3)).tolist() == [2, 2, 3]
    assert retrieval_hits(queries, candidates, GROUPS, GROUPS, ks=(1, 2, 3), chunk=1).tolist() == [2, 2, 3]


@pytest.mark.timeout(10)
def test_recall_both_directions_with_duplicate_captions():
    # Texts 0 and 1 are the same caption (same embedding); image 1 looks most like it.
    texts = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    images = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.1], [0.2, 1.0]]), dim=-1)
    strict = recall(images, texts, torch.arange(3), ks=(1, 2))
    matched = recall(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0 -> text 2 first, then its own text 0: a miss at 1 either way, a hit at 2.
    # image 1 -> texts 0 and 1 tie, 0 goes first: a strict miss, a caption hit. image 2 -> text 2: a hit.
    assert strict["i2t_R1"] == pytest.approx(1 / 3) and matched["i2t_R1"] == pytest.approx(2 / 3)
    assert strict["i2t_R2"] == 1.0 and matched["i2t_R2"] == 1.0
    # text 0 -> image 1 first: a strict miss, but image 1's caption is text 0's. text 1 -> image 1: a hit.
    # text 2 -> image 0 (cos 1) before its image 2 (cos 0.98): a miss either way.
    assert strict["t2i_R1"] == pytest.approx(1 / 3) and matched["t2i_R1"] == pytest.approx(2 / 3)
    assert strict["t2i_R2"] == pytest.approx(2 / 3) and matched["t2i_R2"] == 1.0


@pytest.mark.timeout(10)
def test_zeroshot_top1_top5_balanced_by_hand():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0: right
            [0.2, 0.2, 0.1],  # label 0: tied with 1, the lower index wins: right
            [0.5, 0.5, 0.0],  # label 1: tied with 0, which wins: wrong at top-1
            [0.1, 0.3, 0.2],  # label 2: wrong at top-1
            [0.0, 0.0, 0.6],  # label 2: right
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 2])
    m = zeroshot_metrics(zeroshot_counts(logits, labels, 3), 3)
    assert m == pytest.approx({"zs_top1": 3 / 5, "zs_top5": 1.0, "zs_balanced": (2 / 2 + 0 / 1 + 1 / 2) / 3})
    # Only classes 0 and 2 are candidates: label 1 can never be right; sample 3 now is.
    m = zeroshot_metrics(zeroshot_counts(logits, labels, 3, torch.tensor([0, 2])), 3)
    assert m == pytest.approx({"zs_top1": 4 / 5, "zs_top5": 4 / 5, "zs_balanced": (1 + 0 + 1) / 3})
    assert zeroshot_metrics(zeroshot_counts(logits[:0], labels[:0], 3), 3) == {}


@pytest.mark.timeout(10)
def test_rank_blocks_are_whole_batches_covering_every_position_once():
    for n in (1, 7, 8, 21, 100):
        for world in (1, 2, 3, 4):
            blocks = [rank_block(n, world, r, batch=4) for r in range(world)]
            assert len({b.per for b in blocks}) == 1 and blocks[0].per % 4 == 0
            assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(n))
            # Every block starts at a multiple of the batch: a batch is the same positions on any world size.
            assert all(b.start % 4 == 0 or b.start == n for b in blocks)
            assert all(b.start == min(r * b.per, n) for r, b in enumerate(blocks))


# ---------------------------------------------------------------- summaries by hand


def _hand_matrix() -> Matrix:
    """First step trained on 2014-2016, then one year per step; cell value = row + column / 10."""
    refs = [
        CheckpointRef("2016", ("2014", "2015", "2016"), "a", "pt"),
        CheckpointRef("2017", ("2017",), "b", "pt"),
        CheckpointRef("2018", ("2018",), "c", "pt"),
    ]
    years = ["2014", "2015", "2016", "2017", "2018"]
    results = {r.name: {y: {"mean_R1": i + j / 10} for j, y in enumerate(years)} for i, r in enumerate(refs)}
    results["2018"]["2015"] = {}  # not measured: left out of every mean
    return Matrix(refs, years, results, {"run": "hand"})


@pytest.mark.timeout(10)
def test_in_domain_backward_forward_by_hand():
    m = _hand_matrix()
    s = m.summary("mean_R1")
    # Row 2016 (years 2014-16): ID 0.0 0.1 0.2, FWT 0.3 0.4. Row 2017: BWT 1.0 1.1 1.2, ID 1.3, FWT 1.4.
    # Row 2018: BWT 2.0 2.2 2.3 (2015 missing), ID 2.4.
    assert s["in_domain"] == pytest.approx((0.0 + 0.1 + 0.2 + 1.3 + 2.4) / 5)
    assert s["backward"] == pytest.approx((1.0 + 1.1 + 1.2 + 2.0 + 2.2 + 2.3) / 6)
    assert s["forward"] == pytest.approx((0.3 + 0.4 + 1.4) / 3)
    assert s["mean"] == pytest.approx(
        (0 + 0.1 + 0.2 + 0.3 + 0.4 + 1 + 1.1 + 1.2 + 1.3 + 1.4 + 2 + 2.2 + 2.3 + 2.4) / 14
    )
    assert s["checkpoints"]["2016"] == pytest.approx({"in_domain": 0.1, "backward": None, "forward": 0.35, "mean": 0.2})
    assert s["checkpoints"]["2018"]["backward"] == pytest.approx((2.0 + 2.2 + 2.3) / 3)
    assert relation("2015", ("2014", "2016")) is None and relation("all", ("2016",)) is None
    assert relation("201603", ("201602",)) == "forward" and relation("2016", ()) is None
    assert transfer_summary({"2014": 0.5, "2015": 0.25}, ["2015"]) == {
        "in_domain": 0.25,
        "backward": 0.5,
        "forward": None,
        "mean": 0.375,
    }
    record = log_record({"2014": {"mean_R1": 0.5}, "2015": {"mean_R1": 0.25}}, ["2015"])
    assert record == {
        "2014/mean_R1": 0.5,
        "2015/mean_R1": 0.25,
        "in_domain/mean_R1": 0.25,
        "backward/mean_R1": 0.5,
        "mean/mean_R1": 0.375,
    }


# ---------------------------------------------------------------- figures


@pytest.mark.timeout(30)
def test_heatmap_has_year_ticks_colour_bar_and_a_value_per_cell(tmp_path):
    m = _hand_matrix()
    fig = heatmap(m, "mean_R1", "hand")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == m.years
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2016", "2017", "2018"]
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "mean_R1 (%)"  # the colour bar
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 15
    assert texts[:5] == ["0.0", "10.0", "20.0", "30.0", "40.0"] and texts[11] == "-"
    assert len(ax.patches) == 5  # in-domain cells outlined: three of the first step, then one per step
    fig.savefig(tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 5000
    other = Matrix(m.checkpoints, m.years, {k: {y: {"mean_R1": 0.5} for y in m.years} for k in m.results})
    fig = compare_figure({"a": m, "b": other}, "mean_R1")
    assert len(fig.axes) == 4 and all(len(ax.lines) == 2 for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a", "b"]
