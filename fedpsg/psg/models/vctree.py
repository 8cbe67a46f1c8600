"""VCTree (Tang et al., CVPR 2019, "Learning to Compose Dynamic Tree Structures for Visual
Contexts"): a task-dependent tree over each image's objects, bidirectional TreeLSTM context
over it, and a predicate classifier with a frequency bias.

Per image, a score s_ij = sigmoid(MLP([x_i, x_j, pair geometry])) (made symmetric) says how
much objects i and j belong together; Prim's algorithm takes the maximum spanning tree of
that score matrix, rooted at the object with the largest total score, and the multi-branch
tree becomes a binary one (left child = first child, right child = next sibling), as in the
paper. Two bidirectional binary TreeLSTMs (bottom-up and top-down) give object context (and,
in SGCls, refined object classes) and then edge context e; a pair's predicate logits are
W relu(W_s e_i + W_o e_j + g(pair geometry)) + frequency bias (a learnable table initialised
from `freq_prior`). The paper fuses by a product with a union-box CNN feature; the data here
has no union feature, and the sum trains much faster from scratch with SGD than a product
of three small projections does.

Simplification of the paper's hybrid learning: the tree is not sampled and trained with
REINFORCE. Instead the score matrix gets gradients on two differentiable paths, which keep
the paper's idea that the structure is learnt for the task: (1) every tree message is gated
by the score of the edge it travels along (the child-to-parent state in the bottom-up sweep
and the parent-to-child state in the top-down sweep are multiplied by s_ij), so the relation
loss reaches the scores; (2) the paper's supervised part, binary cross-entropy that s_ij
predicts "i and j are related (in either direction)", is what `auxiliary_loss` returns,
weighted by `tree_loss_weight`. The argmax (maximum spanning tree) itself is not differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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


@dataclass
class Forest:
    """One tree per image, in global segment indices, -1 for none.

    `parent` is the maximum spanning tree (multi-branch); `left` (first child) and `right`
    (next sibling) are its binary form, `up` each node's parent in the binary form and
    `depth` the depth there. The TreeLSTM sweeps it one depth at a time: `order` lists the
    nodes by depth, `sizes` counts each depth's nodes, and `left_at`, `right_at`, `up_at`
    give, for each node in `order`, the position of its binary child (parent) among the
    nodes one level down (up), or that level's size where there is none.
    """

    parent: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    up: torch.Tensor
    depth: torch.Tensor
    order: torch.Tensor
    left_at: torch.Tensor
    right_at: torch.Tensor
    up_at: torch.Tensor
    sizes: list[int]


@dataclass
class VCTreeOutput(RelationOutput):
    """Adds the tree scores: a symmetric logit per ordered pair (s_ij = sigmoid of it)."""

    pair_score_logits: torch.Tensor  # [M]


def prim_tree(score: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Prim's maximum spanning tree of a symmetric [n, n] score matrix.

    Rooted at the node with the largest total score; returns each node's parent (-1 at the
    root) and the order in which nodes joined the tree (parents always join first).
    """
    n = len(score)
    root = int(score.sum(axis=1).argmax())
    parent = np.full(n, -1)
    joined = np.zeros(n, dtype=bool)
    joined[root] = True
    best, best_from = score[root].copy(), np.full(n, root)
    order = [root]
    for _ in range(n - 1):
        v = int(np.where(joined, -np.inf, best).argmax())
        joined[v], parent[v] = True, best_from[v]
        order.append(v)
        closer = score[v] > best
        best, best_from = np.where(closer, score[v], best), np.where(closer, v, best_from)
    return parent, order


def build_forest(score: torch.Tensor, segment_image: torch.Tensor, num_images: int) -> Forest:
    """The maximum spanning tree of every image and its left-child/right-sibling binary form.

    `score` is the symmetric [N, N] score matrix of the batch; only entries within an image
    are read.
    """
    n = segment_image.numel()
    dense = score.detach().cpu().double().numpy()
    parent, left, right, up, depth = (np.full(n, -1) for _ in range(5))
    image = segment_image.cpu().numpy()
    for b in range(num_images):
        nodes = np.flatnonzero(image == b)
        if nodes.size == 0:
            continue
        local_parent, order = prim_tree(dense[np.ix_(nodes, nodes)])
        depth[nodes[order[0]]] = 0
        last_child: dict[int, int] = {}
        for v in order[1:]:
            node, p = nodes[v], nodes[local_parent[v]]
            parent[node] = p
            if p in last_child:
                right[last_child[p]] = node
                up[node] = last_child[p]
            else:
                left[p] = node
                up[node] = p
            last_child[p] = node
            depth[node] = depth[up[node]] + 1
    order = np.argsort(depth, kind="stable")
    sizes = np.bincount(depth, minlength=1)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    at = np.empty(n, dtype=np.int64)
    at[order] = np.arange(n) - start[depth[order]]
    below = np.append(sizes[1:], 0)[depth]  # a missing child points past the level below
    above = np.where(depth > 0, sizes[np.maximum(depth - 1, 0)], 0)
    left_at, right_at = (np.where(t >= 0, at[t], below)[order] for t in (left, right))
    up_at = np.where(up >= 0, at[up], above)[order]
    arrays = (parent, left, right, up, depth, order, left_at, right_at, up_at)
    return Forest(*(torch.from_numpy(a).to(segment_image.device) for a in arrays), sizes.tolist())


def pair_index(batch: SceneBatch) -> torch.Tensor:
    """[N, N] position of pair (i, j) in `batch.pairs`, -1 where there is none."""
    n = batch.segment_image.numel()
    index = torch.full((n, n), -1, dtype=torch.long, device=batch.pairs.device)
    index[batch.pairs[:, 0], batch.pairs[:, 1]] = torch.arange(
        batch.pairs.size(0), device=batch.pairs.device
    )
    return index


class BiTreeLSTM(nn.Module):
    """Bidirectional binary TreeLSTM over a `Forest`, all images at once, one depth at a time.

    Bottom-up: an N-ary (N = 2) TreeLSTM cell (Tai et al. 2015) with a forget gate per child;
    top-down: an LSTM cell fed by the parent. Every message is multiplied by the `gate` of the
    edge it crosses (`gate[v]` belongs to the edge between v and its binary parent).
    Returns [N, 2 * hidden_dim]: bottom-up and top-down hidden states.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.up_input = nn.Linear(input_dim, 5 * hidden_dim)
        self.up_hidden = nn.Linear(2 * hidden_dim, 5 * hidden_dim, bias=False)
        self.down = nn.LSTMCell(input_dim, hidden_dim)

    def forward(self, x: torch.Tensor, forest: Forest, gate: torch.Tensor) -> torch.Tensor:
        # Each level's states live in their own tensor, with a zero row appended for a missing
        # child or parent, so a sweep step gathers from one level rather than from all nodes.
        sizes = forest.sizes
        x = x[forest.order]
        xs, projected = x.split(sizes), self.up_input(x).split(sizes)
        gates = gate[forest.order][:, None].split(sizes)
        lefts, rights, ups = (
            t.split(sizes) for t in (forest.left_at, forest.right_at, forest.up_at)
        )
        empty = x.new_zeros(1, 2 * self.hidden_dim)
        below, bottom_up = empty, []
        for d in reversed(range(len(sizes))):
            hl, cl = below[lefts[d]].chunk(2, 1)
            hr, cr = below[rights[d]].chunk(2, 1)
            i, fl, fr, o, u = (projected[d] + self.up_hidden(torch.cat([hl, hr], 1))).chunk(5, 1)
            c = i.sigmoid() * u.tanh() + fl.sigmoid() * cl + fr.sigmoid() * cr
            h = o.sigmoid() * c.tanh()
            bottom_up.append(h)
            below = torch.cat([torch.cat([h, c], 1) * gates[d], empty])
        above, top_down = empty, []
        for d in range(len(sizes)):
            h_parent, c_parent = (above[ups[d]] * gates[d]).chunk(2, 1)
            h, c = self.down(xs[d], (h_parent, c_parent))
            top_down.append(h)
            above = torch.cat([torch.cat([h, c], 1), empty])
        states = torch.cat([torch.cat(bottom_up[::-1]), torch.cat(top_down)], dim=1)
        return states.new_empty(states.shape).index_copy(0, forest.order, states)


@register("vctree")
class VCTree(RelationModel):
    """VCTree relation head; see the module docstring for the tree and its training.

    Parameters
    ----------
    hidden_dim : int
        Width of segment features, TreeLSTM states and the pair representation.
    embed_dim : int
        Width of the class embedding.
    tree_loss_weight : float
        Weight of the binary cross-entropy that trains the tree scores to find related pairs.
    """

    def __init__(
        self,
        spec: ModelSpec,
        freq_prior: torch.Tensor | None = None,
        hidden_dim: int = 128,
        embed_dim: int = 64,
        tree_loss_weight: float = 1.0,
        **hparams: object,
    ) -> None:
        super().__init__(spec, freq_prior, **hparams)
        self.tree_loss_weight = tree_loss_weight
        node_dim = hidden_dim + embed_dim
        self.encoder = ObjectEncoder(spec, hidden_dim)
        self.labels = LabelEmbedding(spec.num_classes, embed_dim)
        self.score = nn.Sequential(
            nn.Linear(2 * node_dim + spec.pair_geometry_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, 1),
        )
        self.object_tree = BiTreeLSTM(node_dim, hidden_dim)
        self.object_classify = nn.Linear(2 * hidden_dim, spec.num_classes)
        self.edge_tree = BiTreeLSTM(2 * hidden_dim + embed_dim, hidden_dim)
        # TreeLSTM states are small (|h| < 1); normalised, they drive the pair layer from step one.
        self.edge_norm = nn.LayerNorm(2 * hidden_dim)
        self.subject_proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.object_proj = nn.Linear(2 * hidden_dim, hidden_dim)
        self.pair_proj = pair_mlp(spec, hidden_dim, final_relu=False)
        self.classify = nn.Linear(hidden_dim, spec.num_predicates + 1)
        self.frequency = FrequencyBias(spec, freq_prior)

    def forward(self, batch: SceneBatch, mode: str = "predcls") -> VCTreeOutput:
        sgcls = check_mode(mode) == "sgcls"
        features = self.encoder(batch)
        guess = self.encoder.classify(features) if sgcls else None
        nodes = torch.cat([features, self.labels.embed(batch, guess, mode)], dim=1)
        subject, obj = batch.pairs.unbind(1)
        index = pair_index(batch)
        raw = self.pair_score(nodes, subject, obj, batch.pair_geometry)
        score_logits = (raw + raw[index[obj, subject]]) / 2
        score = score_logits.sigmoid()
        n = nodes.size(0)
        dense = score.new_zeros(n, n).index_put((subject, obj), score)
        forest = build_forest(dense, batch.segment_image, batch.num_images)
        child = torch.nonzero(forest.up >= 0).squeeze(1)
        gate = score.new_ones(n).index_put((child,), score[index[forest.up[child], child]])

        context = self.object_tree(nodes, forest, gate)
        object_logits = self.object_output(
            batch, self.object_classify(context) if sgcls else None, mode
        )
        edges = self.edge_norm(
            self.edge_tree(
                torch.cat([context, self.labels.embed(batch, object_logits, mode)], dim=1),
                forest,
                gate,
            )
        )
        pair = F.relu(
            self.subject_proj(edges)[subject]
            + self.object_proj(edges)[obj]
            + self.pair_proj(batch.pair_geometry)
        )
        predicate_logits = self.classify(pair) + self.frequency(
            *pair_labels(batch, object_logits, mode)
        )
        return VCTreeOutput(predicate_logits, object_logits, score_logits)

    def pair_score(
        self, nodes: torch.Tensor, subject: torch.Tensor, obj: torch.Tensor, geometry: torch.Tensor
    ) -> torch.Tensor:
        """`score` of [subject node, object node, pair geometry] for every pair, its first layer
        split by input: the node parts are projected once per node and gathered per pair, which
        is the same sum at a fraction of the cost (pairs outnumber nodes about 17 to 1)."""
        first, width = self.score[0], nodes.size(1)
        subject_part, object_part, geometry_part = first.weight.split(
            [width, width, geometry.size(1)], dim=1
        )
        hidden = (
            F.linear(nodes, subject_part)[subject]
            + F.linear(nodes, object_part)[obj]
            + F.linear(geometry, geometry_part, first.bias)
        )
        return self.score[1:](hidden).squeeze(1)

    def auxiliary_loss(
        self, output: VCTreeOutput, batch: SceneBatch, mode: str = "predcls"
    ) -> torch.Tensor:
        """Weighted binary cross-entropy of the tree scores against "related in either
        direction": the supervised half of the paper's hybrid learning, added to the task loss."""
        if output.pair_score_logits.numel() == 0:
            return output.pair_score_logits.sum()
        related = batch.pair_labels > 0
        reverse = pair_index(batch)[batch.pairs[:, 1], batch.pairs[:, 0]]
        target = (related | related[reverse]).float()
        bce = F.binary_cross_entropy_with_logits(output.pair_score_logits, target)
        return self.tree_loss_weight * bce
