"""Local training and evaluation of relation models, algorithm-agnostic.

Training goes through `strategies.base.train_local`, so FedAvg, FedProx, FedSAM and SCAFFOLD
all train the same loss on the same batches; the loss is deterministic given the batch (the
shuffle is drawn by the loader), as SAM's second pass requires.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedpsg.psg.data import Scene, SceneBatch, collate
from fedpsg.psg.models.base import RelationModel, check_mode
from fedpsg.psg.recall import RecallAccumulator
from strategies.base import ArrayDict, ClientHalf, train_local


def pair_counts(scenes: Sequence[Scene], num_classes: int, num_predicates: int) -> torch.Tensor:
    """[C, C, P + 1] float64 counts of predicates per (subject, object) class pair.

    Column 0 counts ordered pairs without any relation (background). Counts add up exactly
    (integers in float64), so the sum of the clients' tables is the pooled table: what the
    federated statistics round relies on.
    """
    counts = torch.zeros(num_classes, num_classes, num_predicates + 1, dtype=torch.float64)
    for scene in scenes:
        labels = scene.labels
        related = torch.zeros(len(labels), len(labels), dtype=torch.bool)
        rel = scene.relations
        if rel.numel():
            if int(rel[:, 2].max()) >= num_predicates:
                raise ValueError(f"image {scene.image_id!r}: predicate id >= {num_predicates}")
            related[rel[:, 0], rel[:, 1]] = True
            counts.index_put_(
                (labels[rel[:, 0]], labels[rel[:, 1]], rel[:, 2] + 1),
                torch.ones(len(rel), dtype=torch.float64),
                accumulate=True,
            )
        unrelated = ~related & ~torch.eye(len(labels), dtype=torch.bool)
        subject, obj = unrelated.nonzero(as_tuple=True)
        counts.index_put_(
            (labels[subject], labels[obj], torch.zeros_like(subject)),
            torch.ones(len(subject), dtype=torch.float64),
            accumulate=True,
        )
    return counts


def log_prior(counts: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The smoothed [C, C, P + 1] log-frequency table of `pair_counts`.

    Counts are smoothed towards the pooled predicate distribution with `strength` pseudo-pairs,
    so a class pair never seen falls back to the global distribution (mostly background), not
    to uniform.
    """
    counts = counts.to(torch.float64)
    pooled = counts.sum(dim=(0, 1))
    pooled = (pooled + 1.0) / (pooled + 1.0).sum()
    smoothed = counts + strength * pooled
    return (smoothed / smoothed.sum(dim=2, keepdim=True)).log().float()


def frequency_prior(
    scenes: Sequence[Scene], num_classes: int, num_predicates: int, strength: float = 1.0
) -> torch.Tensor:
    """[C, C, P + 1] log-frequency of predicates per class pair, counted on `scenes`."""
    return log_prior(pair_counts(scenes, num_classes, num_predicates), strength)


class SceneLoader:
    """Re-iterable batches of scenes; each pass draws a new seeded shuffle."""

    def __init__(
        self,
        scenes: Sequence[Scene],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.scenes = scenes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return -(-len(self.scenes) // self.batch_size)

    def __iter__(self) -> Iterator[SceneBatch]:
        if self.shuffle:
            order = torch.randperm(len(self.scenes), generator=self.generator).tolist()
        else:
            order = range(len(self.scenes))
        for start in range(0, len(self.scenes), self.batch_size):
            batch = collate([self.scenes[i] for i in order[start : start + self.batch_size]])
            yield batch.to(self.device)


@dataclass(frozen=True)
class RelationLoss:
    """Cross-entropy on pair labels with background down-weighted, plus object CE in SGCls.

    Background pairs outnumber related ones by ~50x; each background pair gets the weight
    that makes background carry `background_ratio` times the total weight of the
    relations in the batch (at most 1), as MOTIFS's 3:1 background sampling does in expectation,
    without randomness in the loss.
    """

    mode: str = "predcls"
    background_ratio: float = 3.0

    def __call__(self, model: RelationModel, batch: SceneBatch) -> torch.Tensor:
        """The training loss: predicates, the model's object term in SGCls, its own extras."""
        output = model(batch, self.mode)
        loss = self.predicate_loss(output.predicate_logits, batch)
        if check_mode(self.mode) == "sgcls" and batch.labels.numel():
            loss = loss + model.object_loss(output.object_logits, batch)
        extra = model.auxiliary_loss(output, batch, self.mode)
        return loss if extra is None else loss + extra

    def predicate_loss(self, predicate_logits: torch.Tensor, batch: SceneBatch) -> torch.Tensor:
        """Background-weighted cross-entropy over pair labels."""
        foreground = batch.pair_labels > 0
        num_fg, num_bg = int(foreground.sum()), int((~foreground).sum())
        bg_weight = min(1.0, self.background_ratio * max(num_fg, 1) / max(num_bg, 1))
        weights = torch.where(foreground, 1.0, bg_weight)
        per_pair = F.cross_entropy(predicate_logits, batch.pair_labels, reduction="none")
        return (weights * per_pair).sum() / weights.sum().clamp_min(1e-12)

    def loss(
        self, predicate_logits: torch.Tensor, object_logits: torch.Tensor, batch: SceneBatch
    ) -> torch.Tensor:
        """The model-independent relation loss (plain object cross-entropy in SGCls), what
        evaluation reports so that models compare on one scale."""
        loss = self.predicate_loss(predicate_logits, batch)
        if check_mode(self.mode) == "sgcls" and batch.labels.numel():
            loss = loss + F.cross_entropy(object_logits, batch.labels)
        return loss


def train(
    model: RelationModel,
    scenes: Sequence[Scene],
    half: ClientHalf,
    *,
    mode: str = "predcls",
    epochs: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    incoming: Mapping[str, ArrayDict] | None = None,
    state: dict[str, ArrayDict] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, dict[str, ArrayDict]]:
    """Local training of `model` on `scenes` with the client half `half` (seeded shuffle).

    Returns the mean training loss and the extra arrays the client half sends back.
    """
    loader = SceneLoader(scenes, batch_size, shuffle=True, seed=seed, device=device)
    return train_local(model, loader, RelationLoss(mode), half, incoming, state, epochs)


@torch.no_grad()
def evaluate(
    model: RelationModel,
    scenes: Sequence[Scene],
    *,
    mode: str = "predcls",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """R@K, mR@K, mR-present@K (K = 20, 50, 100) and the mean relation loss of `model` on
    `scenes`."""
    was_training = model.training
    model.eval()
    recall, loss_fn = RecallAccumulator(model.spec.num_predicates), RelationLoss(mode)
    total, count = 0.0, 0
    for batch in SceneLoader(scenes, batch_size, shuffle=False, device=device):
        output = model(batch, mode)
        recall.add_batch(batch, output, mode)
        total += float(loss_fn.loss(output.predicate_logits, output.object_logits, batch))
        count += 1
    model.train(was_training)
    return {**recall.compute(), "loss": total / max(count, 1)}
