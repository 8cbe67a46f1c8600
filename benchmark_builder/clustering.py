"""Semantic clusters of images: KMeans on featurizer vectors, described by their top triplets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score


@dataclass
class Clustering:
    """Cluster label per image (0 = largest cluster), a quality score and a description per cluster.

    ``silhouette`` is the mean (Euclidean) silhouette coefficient, in [-1, 1], on a seeded sample;
    ``None`` when it is undefined (a single cluster). ``top_triplets[c]`` holds the
    most frequent ``(text, count)`` relation texts of cluster ``c``.
    """

    labels: np.ndarray
    num_clusters: int
    silhouette: float | None
    top_triplets: list[list[tuple[str, int]]]

    def sizes(self) -> list[int]:
        """Images per cluster."""
        return np.bincount(self.labels, minlength=self.num_clusters).tolist()

    def describe(self) -> list[dict]:
        """Manifest-ready description of every cluster."""
        return [
            {
                "id": c,
                "num_images": size,
                "description": "; ".join(text for text, _ in self.top_triplets[c]),
                "top_triplets": [{"text": text, "count": n} for text, n in self.top_triplets[c]],
            }
            for c, size in enumerate(self.sizes())
        ]


def top_triplets(
    texts_per_image: Sequence[Sequence[str]], labels: np.ndarray, num_clusters: int, top: int = 5
) -> list[list[tuple[str, int]]]:
    """The ``top`` most frequent relation texts of each cluster (ties broken alphabetically)."""
    counters = [Counter() for _ in range(num_clusters)]
    for texts, label in zip(texts_per_image, labels, strict=True):
        counters[label].update(texts)
    return [sorted(c.items(), key=lambda item: (-item[1], item[0]))[:top] for c in counters]


def cluster_images(
    features: np.ndarray,
    num_clusters: int,
    seed: int,
    texts_per_image: Sequence[Sequence[str]],
    n_init: int = 2,
) -> Clustering:
    """KMeans with ``num_clusters`` (seeded, ``n_init`` restarts); clusters renumbered by size.

    Renumbering (largest first, ties by the smallest member index) makes cluster ids stable and
    readable.
    """
    num_images = len(features)
    if not 1 <= num_clusters <= num_images:
        raise ValueError(f"need 1 <= clusters <= images ({num_images}), got {num_clusters}")
    raw = KMeans(n_clusters=num_clusters, random_state=seed, n_init=n_init).fit_predict(features)
    sizes = np.bincount(raw, minlength=num_clusters)
    first = [np.flatnonzero(raw == c)[0] if sizes[c] else num_images for c in range(num_clusters)]
    order = np.lexsort((first, -sizes))
    rank = np.empty(num_clusters, dtype=np.int64)
    rank[order] = np.arange(num_clusters)
    return labelled_clustering(features, rank[raw], num_clusters, seed, texts_per_image)


def labelled_clustering(
    features: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    seed: int,
    texts_per_image: Sequence[Sequence[str]],
    silhouette_sample: int = 4000,
    top: int = 5,
) -> Clustering:
    """Score and describe given cluster labels (from KMeans, or from an imported benchmark).

    The silhouette is computed on at most ``silhouette_sample`` images drawn with ``seed``, which
    keeps it cheap on tens of thousands of images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    distinct = len(np.unique(labels))
    silhouette = None
    if 1 < distinct < len(labels):
        sample = min(silhouette_sample, len(labels))
        silhouette = float(
            silhouette_score(features, labels, sample_size=sample, random_state=seed)
        )
    return Clustering(
        labels=labels,
        num_clusters=num_clusters,
        silhouette=silhouette,
        top_triplets=top_triplets(texts_per_image, labels, num_clusters, top),
    )
