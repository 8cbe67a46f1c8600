"""R@K / mR@K on hand-built predictions whose recall is worked out by hand below, and
against a transcription of OpenPSG's evaluation."""

import numpy as np
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
    acc = RecallAccumulator(3, ks)
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
    acc = RecallAccumulator(3, (1, 2, 6))
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
    acc = RecallAccumulator(3, (1, 2, 3))
    acc.add_batch(batch, output, "predcls")
    assert acc.compute() == pytest.approx(accumulate((1, 2, 3)).compute())


def test_no_relations_gives_zero_not_nan():
    acc = RecallAccumulator(3)
    acc.add_image(PAIRS_B, SCORES_B, torch.zeros(0, 3, dtype=torch.long))
    names = ("R", "mR", "mR-present")
    assert acc.compute() == {f"{m}@{k}": 0.0 for k in (20, 50, 100) for m in names}


def test_absent_predicates_count_zero_in_mr_not_in_mr_present():
    """OpenPSG divides mR by every predicate class: with 5 classes, of which the images hold
    p0..p2, mR@3 = (1 + 3/4 + 0 + 0 + 0) / 5; the present-only variant divides by 3."""
    acc = RecallAccumulator(5, (1, 2, 3))
    acc.add_image(PAIRS_A, pad(SCORES_A), GT_A)
    acc.add_image(PAIRS_B, pad(SCORES_B), GT_B)
    metrics = acc.compute()
    assert metrics["mR@3"] == pytest.approx((1 + 0.75 + 0) / 5)
    assert metrics["mR-present@3"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert metrics["R@3"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # R@K does not change


def pad(scores: torch.Tensor, extra: int = 2) -> torch.Tensor:
    """Scores with `extra` more predicate columns that never win."""
    return torch.cat([scores, torch.zeros(len(scores), extra)], dim=1)


def test_exact_duplicate_ground_truth_triplets_count_once():
    """Image A with (0,1,p0) annotated twice: OpenPSG's test loader drops the copy, so R@1
    stays 1/3 (not 2/4) and p0's recall stays 1; the same pair with another predicate is
    not a duplicate."""
    dup = torch.cat([GT_A, GT_A[:1]])
    acc = RecallAccumulator(3, (1, 3))
    acc.add_image(PAIRS_A, SCORES_A, dup)
    ref = RecallAccumulator(3, (1, 3))
    ref.add_image(PAIRS_A, SCORES_A, GT_A)
    assert acc.compute() == ref.compute()
    assert acc.compute()["R@1"] == pytest.approx(1 / 3)
    two_labels = torch.cat([GT_A, torch.tensor([[0, 1, 2]])])  # (0,1) also p2: kept
    other = RecallAccumulator(3, (1,))
    other.add_image(PAIRS_A, SCORES_A, two_labels)
    assert other.compute()["R@1"] == pytest.approx(1 / 4)


def openpsg_recall(images, num_rel: int, ks: tuple[int, ...]) -> dict[str, float]:
    """OpenPSG's PredCls R@K and mR@K, transcribed from `openpsg/evaluation/sgg_eval.py`
    (`SGRecall`, `SGMeanRecall`) and its test-split loader's duplicate filter, in NumPy:
    triplet score = max non-background predicate score (object scores are 1 in PredCls),
    sorted descending; a GT triplet is matched when a top-K prediction has its subject,
    object and predicate; mR sums per-predicate mean recalls over predicates 1..num_rel-1
    (an empty list counts 0) and divides by num_rel - 1."""
    recall = {k: [] for k in ks}
    collect = {k: [[] for _ in range(num_rel)] for k in ks}
    for pairs, scores, gt_rels in images:
        seen = []  # "filter the duplicate triplets, but allow multiple labels for each pair"
        for triplet in gt_rels.tolist():
            if tuple(triplet) not in seen:
                seen.append(tuple(triplet))
        gt_rels = np.array(seen)
        gt_rels[:, 2] += 1  # OpenPSG's predicate labels are 1-based (0 = background)
        scores = scores.numpy()
        pred_classes = scores[:, 1:].argmax(1) + 1
        order = np.argsort(-scores[:, 1:].max(1), kind="stable")
        pred = np.column_stack([pairs.numpy(), pred_classes])[order]
        for k in ks:
            top = pred[:k]
            match = [i for i, g in enumerate(gt_rels) if (top == g).all(axis=1).any()]
            recall[k].append(len(match) / len(gt_rels))
            hit, count = [0] * num_rel, [0] * num_rel
            for g in gt_rels:
                count[g[2]] += 1
            for i in match:
                hit[gt_rels[i][2]] += 1
            for n in range(num_rel):
                if count[n] > 0:
                    collect[k][n].append(hit[n] / count[n])
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(np.mean(recall[k]))
        per = [np.mean(v) if v else 0.0 for v in collect[k][1:]]
        out[f"mR@{k}"] = float(sum(per) / (num_rel - 1))
    return out


def test_matches_openpsg_evaluation_on_random_images():
    """Same scores in, same R@K and mR@K out as OpenPSG's evaluation (ties excluded:
    continuous random scores), with duplicates and absent predicates in the data."""
    gen = torch.Generator().manual_seed(0)
    num_predicates, images = 7, []
    for n in (2, 3, 5, 8, 4, 6):
        pairs = torch.tensor([[i, j] for i in range(n) for j in range(n) if i != j])
        scores = torch.rand(len(pairs), num_predicates + 1, generator=gen)
        r = int(torch.randint(1, 2 * n, (1,), generator=gen))
        picks = torch.randint(0, len(pairs), (r,), generator=gen)
        predicates = torch.randint(0, num_predicates - 2, (r,), generator=gen)  # 2 absent
        gt = torch.cat([pairs[picks], predicates[:, None]], dim=1)
        gt = torch.cat([gt, gt[:1]])  # one exact duplicate per image
        images.append((pairs, scores, gt))
    ks = (1, 3, 5, 20)
    acc = RecallAccumulator(num_predicates, ks)
    for pairs, scores, gt in images:
        acc.add_image(pairs, scores, gt)
    ours = acc.compute()
    ref = openpsg_recall(images, num_predicates + 1, ks)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["mR-present@20"] > ours["mR@20"]


def test_predicate_count_is_checked():
    acc = RecallAccumulator(2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        acc.add_image(PAIRS_A, SCORES_A[:, :3], GT_A)
