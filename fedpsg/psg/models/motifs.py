"""MOTIFS: object and edge context by BiLSTMs over objects in x order, plus a frequency bias
(Zellers et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from fedpsg.psg.data import GEOMETRY_FEATURES, SceneBatch
from fedpsg.psg.models.base import (
    FrequencyBias,
    LabelEmbedding,
    ModelSpec,
    ObjectEncoder,
    RelationModel,
    RelationOutput,
    check_mode,
    pair_labels,
    pair_mlp,
    register,
)

_CENTRE_X = GEOMETRY_FEATURES.index("centre_x")


def sequence_context(lstm: nn.LSTM, features: torch.Tensor, batch: SceneBatch) -> torch.Tensor:
    """Run `lstm` over each image's segments sorted left to right; rows in the input order."""
    if features.shape[0] == 0:
        return features.new_zeros(0, 2 * lstm.hidden_size)
    order = torch.argsort(batch.segment_image * 2.0 + batch.geometry[:, _CENTRE_X], stable=True)
    lengths = torch.bincount(batch.segment_image, minlength=batch.num_images)
    present = lengths > 0
    sequences = torch.split(features[order], lengths[present].tolist())
    packed = pack_padded_sequence(
        pad_sequence(sequences, batch_first=True),
        lengths[present].cpu(),
        batch_first=True,
        enforce_sorted=False,
    )
    padded, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True)
    mask = torch.arange(padded.shape[1], device=features.device) < lengths[present, None]
    output = torch.empty(features.shape[0], padded.shape[2], device=features.device)
    output[order] = padded[mask]
    return output


@register("motifs")
class Motifs(RelationModel):
    """Object context -> labels (SGCls) -> edge context -> head/tail product -> predicates,
    plus the (subject, object) frequency bias initialised from the prior.

    The pair representation is the elementwise product of the subject's head and the
    object's tail projection, times an embedding of the pair geometry (MOTIFS multiplies by
    union-box visual features; without pixels, geometry stands in for them).
    """

    def __init__(
        self,
        spec: ModelSpec,
        freq_prior: torch.Tensor | None = None,
        hidden_dim: int = 64,
        embed_dim: int = 32,
        **hparams: object,
    ) -> None:
        super().__init__(spec, freq_prior, **hparams)
        self.objects = ObjectEncoder(spec, hidden_dim)
        self.embed = LabelEmbedding(spec.num_classes, embed_dim)
        self.edge_embed = LabelEmbedding(spec.num_classes, embed_dim)
        self.object_context = nn.LSTM(
            hidden_dim + embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True
        )
        self.classify = nn.Linear(hidden_dim, spec.num_classes)
        self.edge_context = nn.LSTM(
            hidden_dim + embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True
        )
        self.head_tail = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.post_cat = nn.Linear(2 * hidden_dim, hidden_dim)
        self.pair_in = pair_mlp(spec, hidden_dim, final_relu=False)
        self.predicate = nn.Linear(hidden_dim, spec.num_predicates + 1)
        # Zero-initialised: an untrained MOTIFS scores exactly as its frequency bias does.
        nn.init.zeros_(self.predicate.weight)
        nn.init.zeros_(self.predicate.bias)
        self.bias = FrequencyBias(spec, freq_prior)

    def forward(self, batch: SceneBatch, mode: str = "predcls") -> RelationOutput:
        features = self.objects(batch)
        guess = self.objects.classify(features) if check_mode(mode) == "sgcls" else None
        context = sequence_context(
            self.object_context,
            torch.cat([features, self.embed.embed(batch, guess, mode)], dim=1),
            batch,
        )
        objects = self.object_output(
            batch, self.classify(context) if mode == "sgcls" else None, mode
        )
        edge = sequence_context(
            self.edge_context,
            torch.cat([context, self.edge_embed.embed(batch, objects, mode)], dim=1),
            batch,
        )
        head, tail = self.head_tail(edge).chunk(2, dim=1)
        pair = torch.relu(
            self.post_cat(torch.cat([head[batch.pairs[:, 0]], tail[batch.pairs[:, 1]]], dim=1))
            + self.pair_in(batch.pair_geometry)
        )
        subject_labels, object_labels = pair_labels(batch, objects, mode)
        logits = self.predicate(pair) + self.bias(subject_labels, object_labels)
        return RelationOutput(logits, objects)
