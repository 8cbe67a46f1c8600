"""Graph-constrained Recall@K and mean Recall@K, as OpenPSG defines them (DESIGN.md 3).

Every ordered pair of segments is one candidate triplet carrying its best non-background
predicate (the graph constraint); candidates are ranked by that predicate's score, times the
subject's and object's class scores in SGCls. A ground-truth triplet is recalled at K when a
top-K candidate has its subject, object and predicate, and (SGCls) both predicted labels are
right. R@K averages each image's recall over images with ground-truth relations; mR@K averages,
per predicate, the recall over the images containing it, then over **all** predicate classes.

OpenPSG's conventions, which the reported `mR@K` follows: exact duplicate ground-truth triplets
of an image are removed before matching (its test-split loader does so), and mR divides by every
predicate class, a class absent from the evaluated split counting 0. `mR-present@K` divides by
the predicates that occur instead; it differs from `mR@K` whenever a class is missing (49 of the
56 PSG predicates occurred in the seed-0 5% test split of the FL-PSG images, so it read about
1.14x higher there), and is kept for per-client splits that cannot contain every class.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fedpsg.psg.data import SceneBatch
from fedpsg.psg.models.base import RelationOutput, check_mode

KS = (20, 50, 100)


def rank_triplets(
    predicate_scores: torch.Tensor,
    subject_scores: torch.Tensor | None = None,
    object_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Graph-constrained ranking of one image's pairs.

    `predicate_scores` is [m, P + 1] (column 0 background). Returns the pair order, best
    first, and each pair's best non-background predicate (0-based).
    """
    best_score, best = predicate_scores[:, 1:].max(dim=1)
    if subject_scores is not None and object_scores is not None:
        best_score = best_score * subject_scores * object_scores
    order = torch.argsort(best_score, descending=True, stable=True)
    return order, best


class RecallAccumulator:
    """Collects per-image hits; `compute()` gives R@K, mR@K and mR-present@K for every K in
    `ks`, the mean over `num_predicates` classes (background not counted)."""

    def __init__(self, num_predicates: int, ks: tuple[int, ...] = KS) -> None:
        if num_predicates < 1:
            raise ValueError(f"num_predicates must be >= 1, got {num_predicates}")
        self.num_predicates = num_predicates
        self.ks = ks
        self.recalls: dict[int, list[float]] = {k: [] for k in ks}
        self.per_predicate: dict[int, dict[int, list[float]]] = {k: defaultdict(list) for k in ks}

    def add_image(
        self,
        pairs: torch.Tensor,
        predicate_scores: torch.Tensor,
        relations: torch.Tensor,
        label_correct: torch.Tensor | None = None,
        object_scores: torch.Tensor | None = None,
    ) -> None:
        """One image. `pairs` [m, 2] and `relations` [r, 3] (subject, object, predicate) use
        the same segment indices. SGCls passes `label_correct` [n] (predicted label == ground
        truth) and `object_scores` [n] (score of the predicted label); PredCls passes neither.
        Exact duplicate ground-truth triplets count once; images without any do not count.
        """
        if relations.shape[0] == 0:
            return
        sgcls = object_scores is not None
        order, best = rank_triplets(
            predicate_scores,
            object_scores[pairs[:, 0]] if sgcls else None,
            object_scores[pairs[:, 1]] if sgcls else None,
        )
        pairs, best = pairs.tolist(), best.tolist()
        rank = {}  # (subject, object, predicate) -> its candidate's position in the ranking
        for position, index in enumerate(order[: max(self.ks)].tolist()):
            subject, obj = pairs[index]
            if label_correct is None or (label_correct[subject] and label_correct[obj]):
                rank[(subject, obj, best[index])] = position
        gt = list(dict.fromkeys(map(tuple, relations.tolist())))
        if any(not 0 <= predicate < self.num_predicates for *_, predicate in gt):
            raise ValueError(f"ground-truth predicate outside [0, {self.num_predicates})")
        counts = defaultdict(int)
        for *_, predicate in gt:
            counts[predicate] += 1
        for k in self.ks:
            hits = [rank.get(triplet, k) < k for triplet in gt]
            self.recalls[k].append(sum(hits) / len(gt))
            predicate_hits = defaultdict(int)
            for hit, (*_, predicate) in zip(hits, gt, strict=True):
                predicate_hits[predicate] += hit
            for predicate, count in counts.items():
                self.per_predicate[k][predicate].append(predicate_hits[predicate] / count)

    def add_batch(self, batch: SceneBatch, output: RelationOutput, mode: str = "predcls") -> None:
        """Every image of a model's output on `batch`."""
        scores = output.predicate_logits.detach().softmax(dim=1)
        if scores.shape[1] != self.num_predicates + 1:
            raise ValueError(
                f"predicate logits have {scores.shape[1]} columns, expected "
                f"{self.num_predicates + 1} (background + {self.num_predicates} predicates)"
            )
        label_correct = object_scores = None
        if check_mode(mode) == "sgcls":
            object_probs = output.object_logits.detach().softmax(dim=1)
            object_scores, predicted = object_probs.max(dim=1)
            label_correct = predicted == batch.labels
        relation_image = batch.segment_image[batch.relations[:, 0]]
        for image in range(batch.num_images):
            pair_mask = batch.pair_image == image
            self.add_image(
                batch.pairs[pair_mask],
                scores[pair_mask],
                batch.relations[relation_image == image],
                label_correct,
                object_scores,
            )

    @property
    def num_images(self) -> int:
        """Images with ground-truth relations seen so far."""
        return len(self.recalls[self.ks[0]])

    def compute(self) -> dict[str, float]:
        """{"R@K", "mR@K", "mR-present@K"} in [0, 1]; 0.0 when no image had relations."""
        metrics = {}
        for k in self.ks:
            recalls = self.recalls[k]
            means = [sum(v) / len(v) for v in self.per_predicate[k].values()]
            metrics[f"R@{k}"] = sum(recalls) / len(recalls) if recalls else 0.0
            metrics[f"mR@{k}"] = sum(means) / self.num_predicates
            metrics[f"mR-present@{k}"] = sum(means) / len(means) if means else 0.0
        return metrics
