"""Partitioning: heterogeneity follows alpha on real and synthetic data; flwr-datasets interop."""

from pathlib import Path

import numpy as np
import pytest
from builder_helpers import cache_dir, real_clusters
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import Partitioner

from benchmark_builder.build import BuildConfig, build_benchmark
from benchmark_builder.heterogeneity import cluster_jsd, partition_heterogeneity
from benchmark_builder.partition import (
    PartitionError,
    SemanticPartitioner,
    partition_indices,
    search_alpha,
    split_test,
)
from benchmark_builder.shards import open_benchmark
from benchmark_builder.synthetic import generate_synthetic_psg

ALPHAS = (100, 10, 1, 0.1)


def indices_by_alpha(labels, predicates, method, clients=10):
    out = []
    for alpha in ALPHAS:
        parts = partition_indices(labels, clients, method, alpha, min_size=1, seed=0)
        out.append(partition_heterogeneity(labels, 5, predicates, parts))
    return out


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("method", ["dirichlet", "dirichlet-client"])
def test_heterogeneity_rises_as_alpha_falls_on_real_annotations(method: str) -> None:
    labels, predicates = real_clusters()
    het = indices_by_alpha(labels, predicates, method)
    cluster = [h.cluster_jsd for h in het]
    predicate = [h.predicate_jsd for h in het]
    assert cluster == sorted(cluster) and len(set(cluster)) == len(cluster), cluster
    assert predicate == sorted(predicate), predicate
    assert cluster[0] < 0.01 and cluster[-1] > 0.15  # alpha 100 ~ IID, alpha 0.1 far from it


def test_iid_is_near_zero_and_shard_reaches_the_maximum_on_real_annotations() -> None:
    labels, predicates = real_clusters()
    iid = partition_heterogeneity(labels, 5, predicates, partition_indices(labels, 10, "iid"))
    shard = partition_heterogeneity(labels, 5, predicates, partition_indices(labels, 10, "shard"))
    assert iid.cluster_jsd < 0.005
    assert shard.cluster_jsd == pytest.approx(shard.cluster_jsd_max, abs=1e-9)
    assert all(c["largest_cluster_share"] == 1.0 for c in shard.clients)
    assert shard.predicate_jsd > 10 * iid.predicate_jsd


@pytest.mark.parametrize("method", ["dirichlet", "dirichlet-client", "iid", "shard"])
def test_every_image_lands_in_exactly_one_client(method: str) -> None:
    labels, _ = real_clusters()
    alpha = 0.3 if method.startswith("dirichlet") else None
    for clients in (3, 10):  # fewer and more clients than clusters
        parts = partition_indices(labels, clients, method, alpha, min_size=5, seed=1)
        assert len(parts) == clients
        assert min(len(p) for p in parts) >= 5
        assert_exact_cover(parts, len(labels))


def test_seed_fixes_the_partition_and_min_size_is_enforced() -> None:
    labels, _ = real_clusters()
    a = partition_indices(labels, 10, "dirichlet", 0.5, seed=3)
    b = partition_indices(labels, 10, "dirichlet", 0.5, seed=3)
    c = partition_indices(labels, 10, "dirichlet", 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    with pytest.raises(PartitionError, match="min"):
        partition_indices(labels, 10, "dirichlet", 0.01, min_size=500, seed=0)
    with pytest.raises(PartitionError, match="alpha"):
        partition_indices(labels, 10, "iid", 1.0)


def test_test_split_is_stratified_by_cluster() -> None:
    labels, _ = real_clusters()
    train, test = split_test(labels, 0.2, seed=0)
    assert_exact_cover([train, test], len(labels))
    for c in range(5):
        share = np.sum(labels[test] == c) / np.sum(labels == c)
        assert share == pytest.approx(0.2, abs=0.002)


def test_alpha_search_hits_a_target_index() -> None:
    labels, _ = real_clusters()
    alpha, achieved = search_alpha(labels, 5, 10, target=0.15, seed=0)
    assert achieved == pytest.approx(0.15, abs=0.01)
    parts = partition_indices(labels, 10, "dirichlet", alpha, seed=0)
    assert cluster_jsd(labels, 5, parts) == achieved


def test_heterogeneity_rises_as_alpha_falls_on_synthetic_data(tmp_path: Path) -> None:
    psg = generate_synthetic_psg(tmp_path / "syn", 300, seed=1, image_size=32)
    config = BuildConfig(
        num_clients=5,
        partition="dirichlet",
        alpha=1.0,
        num_clusters=5,
        featurizer_options={"cache_dir": cache_dir(tmp_path)},
        alpha_sweep=ALPHAS,
    )
    result = build_benchmark(psg, tmp_path / "bench", config)
    rows = list((tmp_path / "bench" / "plots" / "heterogeneity_vs_alpha.csv").open())[1:]
    cluster = [float(r.split(",")[1]) for r in rows]
    assert cluster == sorted(cluster) and cluster[0] < 0.02 and cluster[-1] > 0.2, cluster
    assert result.manifest["heterogeneity"]["cluster_jsd"] < cluster[-1]

    config.alpha, config.target_index, config.alpha_sweep = None, 0.15, ()
    searched = build_benchmark(psg, tmp_path / "searched", config).manifest
    assert searched["heterogeneity"]["cluster_jsd"] == searched["partition"]["achieved_index"]
    assert searched["partition"]["achieved_index"] == pytest.approx(0.15, abs=0.02)
    assert ALPHAS[-1] < searched["partition"]["alpha"] < ALPHAS[0]


def test_partitioner_plugs_into_federated_dataset(tmp_path: Path, synthetic_psg: Path) -> None:
    config = BuildConfig(
        num_clients=3, num_clusters=3, featurizer_options={"cache_dir": cache_dir(tmp_path)}
    )
    build_benchmark(synthetic_psg, tmp_path / "bench", config, synthetic_psg.parent)
    benchmark = open_benchmark(tmp_path / "bench")
    files = [str(tmp_path / "bench" / c["file"]) for c in benchmark.manifest["clients"]]
    partitioner = SemanticPartitioner(4, "shard", partition_by="cluster", seed=0)
    assert isinstance(partitioner, Partitioner)
    fds = FederatedDataset(
        dataset="parquet", data_files={"train": files}, partitioners={"train": partitioner}
    )
    parts = [fds.load_partition(i) for i in range(4)]
    assert sum(len(p) for p in parts) == sum(len(benchmark.client_table(i)) for i in range(3))
    assert all(len(set(p["cluster"])) == 1 for p in parts)  # shard: one cluster per client
    assert fds.partitioners["train"].num_partitions == 4
