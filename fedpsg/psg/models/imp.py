"""IMP: iterative message passing between object and relation states (Xu et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from fedpsg.psg.data import SceneBatch
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


def _mean_into(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Average rows of `values` into `size` slots by `index` (empty slots stay zero)."""
    total = values.new_zeros(size, values.shape[1]).index_add_(0, index, values)
    count = values.new_zeros(size).index_add_(0, index, values.new_ones(len(index)))
    return total / count.clamp_min(1).unsqueeze(1)


@register("imp")
class IMP(RelationModel):
    """Node and edge GRUs exchange gated messages for a few iterations (the primal graph and
    its dual, as in the paper); predicates are read from the final edge states.

    Edges start from pair geometry (the paper's union-box features are not available
    without pixels), nodes from segment geometry/appearance plus the class embedding (given
    labels in PredCls, the embedding of the encoder's guess in SGCls). Messages are averaged
    over a node's edges, so their scale does not grow with the number of segments.

    `use_bias` adds the (subject, object) frequency table to the predicate logits, as
    OpenPSG's IMP head allows (`use_bias`, off by default there and here, as in the paper);
    a prior needs it on, and a run with a frequency prior switches it on
    (`with_frequency_table`).
    """

    optional_frequency_bias = True

    def __init__(
        self,
        spec: ModelSpec,
        freq_prior: torch.Tensor | None = None,
        hidden_dim: int = 64,
        embed_dim: int = 32,
        iterations: int = 2,
        use_bias: bool = False,
        **hparams: object,
    ) -> None:
        super().__init__(spec, freq_prior, **hparams)
        if freq_prior is not None and not use_bias:
            raise ValueError("imp: a frequency prior needs the bias on (use_bias=True)")
        self.iterations = iterations
        self.objects = ObjectEncoder(spec, hidden_dim)
        self.embed = LabelEmbedding(spec.num_classes, embed_dim)
        self.node_in = nn.Sequential(nn.Linear(hidden_dim + embed_dim, hidden_dim), nn.ReLU())
        self.edge_in = pair_mlp(spec, hidden_dim)
        self.node_gru = nn.GRUCell(hidden_dim, hidden_dim)
        self.edge_gru = nn.GRUCell(hidden_dim, hidden_dim)
        # Gates: edge -> its subject, edge -> its object, subject -> edge, object -> edge.
        self.gates = nn.ModuleList(nn.Linear(2 * hidden_dim, 1) for _ in range(4))
        self.classify = nn.Linear(hidden_dim, spec.num_classes)
        self.predicate = nn.Linear(hidden_dim, spec.num_predicates + 1)
        self.bias = FrequencyBias(spec, freq_prior) if use_bias else None

    def _gated(self, gate: int, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gates[gate](torch.cat([target, source], dim=1))) * source

    def forward(self, batch: SceneBatch, mode: str = "predcls") -> RelationOutput:
        features = self.objects(batch)
        guess = self.objects.classify(features) if check_mode(mode) == "sgcls" else None
        node = self.node_in(torch.cat([features, self.embed.embed(batch, guess, mode)], dim=1))
        edge = self.edge_in(batch.pair_geometry)
        subject, obj = batch.pairs[:, 0], batch.pairs[:, 1]
        num_nodes = node.shape[0]
        for _ in range(self.iterations):
            node_message = _mean_into(
                self._gated(0, node[subject], edge), subject, num_nodes
            ) + _mean_into(self._gated(1, node[obj], edge), obj, num_nodes)
            edge_message = self._gated(2, edge, node[subject]) + self._gated(3, edge, node[obj])
            node, edge = self.node_gru(node_message, node), self.edge_gru(edge_message, edge)
        logits = self.classify(node) if mode == "sgcls" else None
        objects = self.object_output(batch, logits, mode)
        predicates = self.predicate(edge)
        if self.bias is not None:
            predicates = predicates + self.bias(*pair_labels(batch, objects, mode))
        return RelationOutput(predicates, objects)
