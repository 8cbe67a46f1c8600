"""Heterogeneity indices of a partition (DESIGN.md section 3).

Inputs are count matrices, one row per client: ``cluster_counts[i, c]`` images of client ``i`` in
cluster ``c`` and ``predicate_counts[i, p]`` relations of client ``i`` with predicate ``p``. The
global distribution is the pooled one (column sums), so the index measures how far clients are
from the federation they form.

- ``cluster_jsd`` / ``predicate_jsd``: size-weighted (images per client) mean Jensen-Shannon
  divergence, base 2, between each client's distribution and the global one; in [0, 1].
- ``cluster_jsd_max``: the largest ``cluster_jsd`` any partition of the same pooled data can reach
  (every client drawn from one cluster). JSD is convex in its first argument, so a client mixing
  clusters never exceeds the mixture of pure clients; this bound is ``sum_c g_c JSD(e_c, g)``.
- ``mean_largest_cluster_share`` and ``mean_cluster_entropy`` (bits): plain means over clients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy


def jsd(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two count or probability vectors."""
    return float(jensenshannon(p, q, base=2) ** 2)


def _weighted_jsd(counts: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """Per-row JSD against the pooled rows and its ``weights``-weighted mean (non-empty rows)."""
    pooled = counts.sum(axis=0)
    per_row = np.array([jsd(row, pooled) if row.sum() > 0 else np.nan for row in counts])
    valid = ~np.isnan(per_row) & (weights > 0)
    if not valid.any():
        return 0.0, per_row
    return float(np.average(per_row[valid], weights=weights[valid])), per_row


@dataclass
class Heterogeneity:
    """Overall indices plus one dict per client (see the module docstring)."""

    cluster_jsd: float
    predicate_jsd: float
    cluster_jsd_max: float
    mean_largest_cluster_share: float
    mean_cluster_entropy: float
    clients: list[dict]

    def summary(self) -> dict:
        """The overall indices only (the manifest's ``heterogeneity`` block)."""
        out = asdict(self)
        out.pop("clients")
        return out


def heterogeneity(cluster_counts: np.ndarray, predicate_counts: np.ndarray) -> Heterogeneity:
    """All indices of a partition from its per-client cluster and predicate count matrices."""
    cluster_counts = np.asarray(cluster_counts, dtype=np.float64)
    predicate_counts = np.asarray(predicate_counts, dtype=np.float64)
    sizes = cluster_counts.sum(axis=1)
    cluster_index, cluster_rows = _weighted_jsd(cluster_counts, sizes)
    predicate_index, predicate_rows = _weighted_jsd(predicate_counts, sizes)
    pooled = cluster_counts.sum(axis=0)
    share = pooled / pooled.sum()
    pure = np.eye(len(pooled))
    jsd_max = float(sum(share[c] * jsd(pure[c], pooled) for c in np.flatnonzero(share)))
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = cluster_counts / sizes[:, None]
    largest = np.where(sizes > 0, np.nan_to_num(shares).max(axis=1), np.nan)
    entropies = np.array(
        [entropy(row, base=2) if row.sum() > 0 else np.nan for row in cluster_counts]
    )
    clients = [
        {
            "cluster_jsd": _clean(cluster_rows[i]),
            "predicate_jsd": _clean(predicate_rows[i]),
            "largest_cluster_share": _clean(largest[i]),
            "cluster_entropy": _clean(entropies[i]),
        }
        for i in range(len(cluster_counts))
    ]
    return Heterogeneity(
        cluster_jsd=cluster_index,
        predicate_jsd=predicate_index,
        cluster_jsd_max=jsd_max,
        mean_largest_cluster_share=_mean(largest),
        mean_cluster_entropy=_mean(entropies),
        clients=clients,
    )


def _clean(value: float) -> float | None:
    """JSON-friendly: ``None`` for an undefined (empty client) value."""
    return None if np.isnan(value) else float(value)


def _mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0


def image_predicate_counts(images: list[dict], num_predicates: int) -> np.ndarray:
    """``[num_images, num_predicates]`` relation counts per predicate of every image record."""
    counts = np.zeros((len(images), num_predicates), dtype=np.int64)
    for i, image in enumerate(images):
        for _, _, predicate in image["relations"]:
            counts[i, predicate] += 1
    return counts


def client_counts(item_counts: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    """Sum the rows of ``item_counts`` (one row per image) over each client's image indices."""
    return np.stack([item_counts[np.asarray(p, dtype=np.int64)].sum(axis=0) for p in parts])


def cluster_jsd(labels: np.ndarray, num_clusters: int, parts: list[np.ndarray]) -> float:
    """Only the overall cluster index (cheap; used by the alpha search)."""
    counts = client_counts(np.eye(num_clusters, dtype=np.int64)[labels], parts)
    return _weighted_jsd(counts, counts.sum(axis=1))[0]


def partition_heterogeneity(
    labels: np.ndarray, num_clusters: int, predicates: np.ndarray, parts: list[np.ndarray]
) -> Heterogeneity:
    """Indices of ``parts`` (image indices per client) given image cluster labels and predicates."""
    one_hot = np.eye(num_clusters, dtype=np.int64)[labels]
    return heterogeneity(client_counts(one_hot, parts), client_counts(predicates, parts))
