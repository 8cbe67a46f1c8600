"""GPS-Net (Lin et al., CVPR 2020, "GPS-Net: Graph Property Sensing Network for Scene Graph
Generation"): direction-aware message passing, the node priority sensitive loss, and the
adaptive reasoning module's softened frequency prior.

- **DMP** (direction-aware message passing): for every ordered pair (i, j) a node-specific
  attention a_ij = w^T [(A x_i) * (B x_j) * (C u_ij)] over the triplet (subject, object, pair
  feature), normalised over the partners j of i. The paper fuses the triplet with a Tucker
  decomposition; the rank-R trilinear form used here is its low-rank (CP) special case. Each
  node gathers from the objects it points to with the attention (Sum_j a_ij W_so x_j) and from
  the subjects that point to it with the transposed attention (Sum_j a_ji W_os x_j); the
  separate W_so / W_os make the messages direction-aware. `num_steps` rounds, each residual.
- **NPS-loss** (`nps_loss`, the model's `object_loss` hook): focal loss on object
  classification whose focusing parameter depends on node priority theta_i = (relations node
  i takes part in) / (relations in its image): gamma_i = min(2, -(1 - theta_i)^mu log theta_i).
  Nodes in many relations keep gamma near 0 (plain cross-entropy), unrelated nodes get the
  strongest focusing. It only matters in SGCls (PredCls gives the classes).
- **ARM frequency softening**: the predicate distribution p of a class pair (softmax of a
  log-frequency table initialised from `freq_prior`) is softened as log_softmax(p / T), T a
  learnable temperature starting at 1 (the paper's fixed softening), and added with the
  paper's bias adaptation weight d_ij = sigmoid(w^T u_ij) per pair. The paper's table holds
  fixed dataset statistics; here it is a parameter, as in every model of this package, so a
  federation that starts from a uniform table (`frequency-prior = none`) still learns the
  statistics.

Simplifications: the pair feature u_ij is an MLP of the pair geometry (the paper pools a
union-box CNN feature; the data here has per-segment features only), the Tucker fusion is
low-rank as said, and the ARM's relation classifier is the MOTIFS-style product of subject,
object and pair projections, layer-normalised before the classifier: the triple product is
cubic in the weights, and without the norm one FedAvg round over single-cluster clients (the
`shard` partition, SGD momentum 0.9) grew the logits past 250 and the next round's local
training ran them to NaN.
"""

from __future__ import annotations

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


def segment_softmax(scores: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Softmax of `scores` within each group of equal `index` (groups 0..size-1)."""
    top = scores.new_full((size,), -torch.inf).scatter_reduce(
        0, index, scores.detach(), "amax", include_self=True
    )
    weights = (scores - top[index]).exp()
    return weights / scores.new_zeros(size).index_add(0, index, weights)[index]


def node_priority(batch: SceneBatch) -> torch.Tensor:
    """[N] share of its image's relations each segment takes part in (0 without relations)."""
    n = batch.segment_image.numel()
    subject, obj = batch.relations[:, 0], batch.relations[:, 1]
    ones = torch.ones(subject.numel(), device=subject.device)
    involved = ones.new_zeros(n).index_add(0, subject, ones).index_add(0, obj, ones)
    per_image = ones.new_zeros(batch.num_images).index_add(0, batch.segment_image[subject], ones)
    return involved / per_image[batch.segment_image].clamp_min(1.0)


def nps_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    priority: torch.Tensor,
    mu: float = 4.0,
    max_gamma: float = 2.0,
) -> torch.Tensor:
    """Node priority sensitive loss: mean of -(1 - p_t)^gamma(theta) log p_t over nodes.

    gamma(theta) = min(max_gamma, -(1 - theta)^mu log theta); theta = 0 gives max_gamma.
    """
    if target.numel() == 0:
        return logits.sum() * 0.0
    safe = priority.clamp_min(1e-12)
    gamma = torch.where(
        priority > 0, (-((1 - priority) ** mu) * safe.log()).clamp_max(max_gamma), max_gamma
    )
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


class DirectionAwareMessagePassing(nn.Module):
    """One DMP round: triplet attention, messages along and against the pair direction."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.subject_key = nn.Linear(dim, rank)
        self.object_key = nn.Linear(dim, rank)
        self.pair_key = nn.Linear(dim, rank)
        self.attend = nn.Linear(rank, 1, bias=False)  # a bias cancels in the softmax
        self.subject_to_object = nn.Linear(dim, dim)
        self.object_to_subject = nn.Linear(dim, dim)
        self.update = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim), nn.ReLU())

    def forward(self, x: torch.Tensor, pairs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        subject, obj = pairs.unbind(1)
        triplet = self.subject_key(x)[subject] * self.object_key(x)[obj] * self.pair_key(u)
        alpha = segment_softmax(self.attend(triplet).squeeze(1), subject, n)[:, None]
        outgoing = x.new_zeros(n, x.size(1)).index_add(
            0, subject, alpha * self.subject_to_object(x)[obj]
        )
        incoming = x.new_zeros(n, x.size(1)).index_add(
            0, obj, alpha * self.object_to_subject(x)[subject]
        )
        return x + self.update(torch.cat([outgoing, incoming], dim=1))


@register("gpsnet")
class GPSNet(RelationModel):
    """GPS-Net relation head; see the module docstring for its parts and simplifications.

    Parameters
    ----------
    hidden_dim : int
        Width of node and pair features.
    embed_dim : int
        Width of the class embedding.
    rank : int
        Rank of the trilinear (low-rank Tucker) attention.
    num_steps : int
        Rounds of direction-aware message passing.
    nps_mu : float
        The NPS-loss exponent mu (how fast priority lowers the focusing parameter).
    """

    def __init__(
        self,
        spec: ModelSpec,
        freq_prior: torch.Tensor | None = None,
        hidden_dim: int = 128,
        embed_dim: int = 64,
        rank: int = 64,
        num_steps: int = 2,
        nps_mu: float = 4.0,
        **hparams: object,
    ) -> None:
        super().__init__(spec, freq_prior, **hparams)
        self.nps_mu = nps_mu
        self.encoder = ObjectEncoder(spec, hidden_dim)
        self.labels = LabelEmbedding(spec.num_classes, embed_dim)
        self.node_proj = nn.Sequential(nn.Linear(hidden_dim + embed_dim, hidden_dim), nn.ReLU())
        self.pair_encoder = pair_mlp(spec, hidden_dim)
        self.steps = nn.ModuleList(
            DirectionAwareMessagePassing(hidden_dim, rank) for _ in range(num_steps)
        )
        self.object_classify = nn.Linear(hidden_dim, spec.num_classes)
        self.subject_proj = nn.Linear(hidden_dim, hidden_dim)
        self.object_proj = nn.Linear(hidden_dim, hidden_dim)
        self.pair_proj = nn.Linear(hidden_dim, hidden_dim)
        self.fuse_norm = nn.LayerNorm(hidden_dim)
        self.classify = nn.Linear(hidden_dim, spec.num_predicates + 1)
        self.adapt = nn.Linear(hidden_dim, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.frequency = FrequencyBias(spec, freq_prior)

    def forward(self, batch: SceneBatch, mode: str = "predcls") -> RelationOutput:
        sgcls = check_mode(mode) == "sgcls"
        features = self.encoder(batch)
        guess = self.encoder.classify(features) if sgcls else None
        x = self.node_proj(torch.cat([features, self.labels.embed(batch, guess, mode)], dim=1))
        u = self.pair_encoder(batch.pair_geometry)
        for step in self.steps:
            x = step(x, batch.pairs, u)
        object_logits = self.object_output(batch, self.object_classify(x) if sgcls else None, mode)
        subject, obj = batch.pairs.unbind(1)
        pair = self.subject_proj(x)[subject] * self.object_proj(x)[obj] * self.pair_proj(u)
        pair = self.fuse_norm(pair)
        prior = self.frequency(*pair_labels(batch, object_logits, mode)).softmax(dim=1)
        softened = F.log_softmax(prior / self.log_temperature.exp(), dim=1)
        predicate_logits = self.classify(pair) + self.adapt(u).sigmoid() * softened
        return RelationOutput(predicate_logits, object_logits)

    def object_loss(self, object_logits: torch.Tensor, batch: SceneBatch) -> torch.Tensor:
        """The NPS-loss of the object classification (what replaces its cross-entropy)."""
        return nps_loss(object_logits, batch.labels, node_priority(batch), mu=self.nps_mu)
