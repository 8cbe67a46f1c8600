"""R@K / mR@K on hand-built predictions whose recall is worked out by hand below."""

import pytest
import torch

from fedpsg.psg.data import Scene, collate
from fedpsg.psg.models.base import RelationOutput
from fedpsg.psg.recall import RecallAccumulator

# Image A: 3 segments, all 6 ordered pairs; columns = [background, p0, p1, p2].
PAIRS_A = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]])
SCORES_A = torch.tensor(
    [
        [0.10, 0.60, 0.20, 0.10],  # (0,1): best p0 .6
        [0.50, 0.10, 0.10, 0.30],  # (0,2): best p2 .3
        [0.80, 0.05, 0.10, 0.05],  # (1,0): background wins overall, still ranked by p1 .1
        [
            0.20,
            0.50,
            0.10,
            0.20,
        ],  # (1,2): best p0 .5, so its ground truth p2 is out (graph constraint)
        [0.30, 0.00, 0.40, 0.30],  # (2,0): best p1 .4
        [0.90, 0.03, 0.03, 0.04],  # (2,1): best p2 .04
    ]
)
GT_A = torch.tensor([[0, 1, 0], [1, 2, 2], [2, 0, 1]])
# Ranking: (0,1,p0) .6, (1,2,p0) .5, (2,0,p1) .4, (0,2,p2) .3, (1,0,p1) .1, (2,1,p2) .04
# Hits: (0,1,p0) at rank 1, (2,0,p1) at rank 3, (1,2,p2) never.

# Image B: 2 segments. (0,1): best p1 .9; (1,0): best p0 .8 (its ground truth p1 only .1).
PAIRS_B = torch.tensor([[0, 1], [1, 0]])
SCORES_B = torch.tensor([[0.05, 0.02, 0.90, 0.03], [0.05, 0.80, 0.10, 0.05]])
GT_B = torch.tensor([[0, 1, 1], [1, 0, 1]])


def accumulate(ks: tuple[int, ...]) -> RecallAccumulator:
    acc = RecallAccumulator(ks)
    acc.add_image(PAIRS_A, SCORES_A, GT_A)
    acc.add_image(PAIRS_B, SCORES_B, GT_B)
    acc.add_image(PAIRS_B, SCORES_B, torch.zeros(0, 3, dtype=torch.long))  # no relations: ignored
    return acc


def test_predcls_recall_and_mean_recall_by_hand():
    acc = accumulate((1, 2, 3))
    metrics = acc.compute()
    assert acc.num_images == 2
    # R@1: A 1/3, B 1/2; R@2 the same; R@3: A 2/3, B 1/2.
    assert metrics["R@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert metrics["R@2"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert metrics["R@3"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # mR@1: p0 {A: 1} -> 1; p1 {A: 0, B: 1/2} -> 1/4; p2 {A: 0} -> 0.
    assert metrics["mR@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    # mR@3: p0 -> 1; p1 {A: 1, B: 1/2} -> 3/4; p2 -> 0.
    assert metrics["mR@3"] == pytest.approx((1 + 0.75 + 0) / 3)


def test_sgcls_needs_both_labels_right_and_ranks_by_object_scores():
    acc = RecallAccumulator((1, 2, 6))
    label_correct = torch.tensor([True, True, False])
    object_scores = torch.tensor([1.0, 0.5, 1.0])
    acc.add_image(PAIRS_A, SCORES_A, GT_A, label_correct, object_scores)
    # Triplet scores: (2,0,p1) .4, (0,1,p0) .3, (0,2,p2) .3, (1,2,p0) .25, (1,0,p1) .05,
    # (2,1,p2) .02.
    # (2,0,p1) involves the mislabelled segment 2: never a hit; (0,1,p0) is second.
    metrics = acc.compute()
    assert metrics["R@1"] == 0.0
    assert metrics["R@2"] == pytest.approx(1 / 3)
    assert metrics["R@6"] == pytest.approx(1 / 3)
    assert metrics["mR@6"] == pytest.approx((1 + 0 + 0) / 3)


def test_batch_path_matches_per_image_path():
    """Through a collated batch (global indices, image offsets) the numbers are the same."""

    def scene(name, n, rel):
        return Scene(name, torch.zeros(n, dtype=torch.long), torch.rand(n, 13), None, rel)

    empty = torch.zeros(0, 3, dtype=torch.long)
    batch = collate([scene("a", 3, GT_A), scene("c", 2, empty), scene("b", 2, GT_B)])
    assert torch.equal(batch.pairs[:6], PAIRS_A) and torch.equal(batch.pairs[8:], PAIRS_B + 5)
    logits = torch.cat([SCORES_A, SCORES_B, SCORES_B]).log()
    output = RelationOutput(logits, torch.zeros(7, 1))
    acc = RecallAccumulator((1, 2, 3))
    acc.add_batch(batch, output, "predcls")
    assert acc.compute() == pytest.approx(accumulate((1, 2, 3)).compute())


def test_no_relations_gives_zero_not_nan():
    acc = RecallAccumulator()
    acc.add_image(PAIRS_B, SCORES_B, torch.zeros(0, 3, dtype=torch.long))
    assert acc.compute() == {f"{m}@{k}": 0.0 for k in (20, 50, 100) for m in ("R", "mR")}
