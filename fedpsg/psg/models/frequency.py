"""The frequency baseline (Zellers et al. 2018): a predicate prior per class pair, nothing else."""

from __future__ import annotations

import torch

from fedpsg.psg.data import SceneBatch
from fedpsg.psg.models.base import (
    FrequencyBias,
    ModelSpec,
    ObjectEncoder,
    RelationModel,
    RelationOutput,
    check_mode,
    pair_labels,
    register,
)


@register("frequency")
class FrequencyModel(RelationModel):
    """Scores a pair by the log-frequency of each predicate for its (subject, object) classes.

    Built from a prior it needs no training (PredCls); its table is still a parameter, so a
    federation that starts from a uniform table learns the pooled frequencies by SGD. SGCls has
    no given labels: a small classifier on segment geometry (and visual features) guesses them,
    trained with the object cross-entropy, and the table is read at the guessed classes.
    """

    def __init__(
        self,
        spec: ModelSpec,
        freq_prior: torch.Tensor | None = None,
        hidden_dim: int = 64,
        **hparams: object,
    ) -> None:
        super().__init__(spec, freq_prior, **hparams)
        self.bias = FrequencyBias(spec, freq_prior)
        self.objects = ObjectEncoder(spec, hidden_dim)

    def forward(self, batch: SceneBatch, mode: str = "predcls") -> RelationOutput:
        logits = None
        if check_mode(mode) == "sgcls":
            logits = self.objects.classify(self.objects(batch))
        objects = self.object_output(batch, logits, mode)
        subject_labels, object_labels = pair_labels(batch, objects, mode)
        return RelationOutput(self.bias(subject_labels, object_labels), objects)
