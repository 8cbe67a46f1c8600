"""Inputs shared by the benchmark-builder tests, built once per pytest process."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from benchmark_builder.featurizers import CategoryMapFeaturizer, dataset_triplets
from benchmark_builder.psg import PSGDataset, load_psg

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REAL_PSG = SHARED_DATA / "psg_annotations.json.gz"
CATEGORY_MAP = SHARED_DATA / "fl_psg_word_categorized.json"
REAL_SUBSET = 6000  # first images of the real file: real content, seconds instead of a minute


@functools.lru_cache(maxsize=1)
def real_dataset() -> PSGDataset:
    """All 24,378 real PSG images (no pixels)."""
    return load_psg(REAL_PSG)


@functools.lru_cache(maxsize=1)
def real_subset() -> PSGDataset:
    """The first ``REAL_SUBSET`` real images."""
    dataset = real_dataset()
    return dataclasses.replace(dataset, images=dataset.images[:REAL_SUBSET])


@functools.lru_cache(maxsize=1)
def real_clusters() -> tuple[np.ndarray, np.ndarray]:
    """(cluster labels, predicate counts) of the real subset: FL-PSG category map + KMeans k=5."""
    from benchmark_builder.clustering import cluster_images
    from benchmark_builder.heterogeneity import image_predicate_counts

    dataset = real_subset()
    features = CategoryMapFeaturizer(CATEGORY_MAP).fit_transform(dataset)
    clustering = cluster_images(features, 5, seed=0, texts_per_image=dataset_triplets(dataset))
    counts = image_predicate_counts(dataset.images, len(dataset.predicate_classes))
    return clustering.labels, counts


def cache_dir(tmp: Path) -> Path:
    """A per-test embedding cache, so no test reads vectors another test wrote."""
    path = tmp / "embedding-cache"
    os.makedirs(path, exist_ok=True)
    return path
