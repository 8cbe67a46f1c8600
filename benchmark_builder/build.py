"""The build pipeline shared by the CLI, the FL-PSG importer and the benchmark script.

validate (``load_psg``) -> featurize -> cluster -> split test / partition -> export (shards,
manifest, plots), each stage timed. ``on_stage`` (opt-in) is told when a stage starts, so a CLI
can show progress; the library itself prints nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmark_builder.clustering import Clustering, cluster_images, labelled_clustering
from benchmark_builder.featurizers import Featurizer, build_featurizer, dataset_triplets
from benchmark_builder.heterogeneity import (
    Heterogeneity,
    client_counts,
    image_predicate_counts,
    partition_heterogeneity,
)
from benchmark_builder.partition import (
    DIRICHLET_METHODS,
    ConfigError,
    PartitionError,
    check_seed,
    partition_indices,
    search_alpha,
    split_test,
)
from benchmark_builder.plots import benchmark_plots, heterogeneity_vs_alpha
from benchmark_builder.psg import PSGDataset, PSGFormatError, load_psg
from benchmark_builder.shards import (
    FORMAT_VERSION,
    TEST_FILE,
    atomic_directory,
    check_output,
    client_file,
    shard_entry,
    shard_metadata,
    write_manifest,
)

StageCallback = Callable[[str], None]
STAGES = ("load", "featurize", "cluster", "partition", "export")


@dataclass
class BuildConfig:
    """Everything that decides a benchmark besides its input file."""

    num_clients: int = 10
    partition: str = "dirichlet"
    alpha: float | None = 1.0
    num_clusters: int = 5
    featurizer: str = "embedding"
    featurizer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    test_fraction: float = 0.1
    min_size: int = 1
    target_index: float | None = None
    alpha_sweep: Sequence[float] = ()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first setting out of its range."""
        check_seed(self.seed)
        for name in ("num_clients", "num_clusters", "min_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        alphas = [("alpha", self.alpha)] if self.alpha is not None else []
        for name, alpha in [*alphas, *(("alpha_sweep", a) for a in self.alpha_sweep)]:
            if not (math.isfinite(alpha) and alpha > 0):
                raise ConfigError(f"{name} values must be finite and > 0, got {alpha}")
        if self.target_index is not None and not math.isfinite(self.target_index):
            raise ConfigError(f"target_index must be a finite number, got {self.target_index}")


@dataclass
class Semantics:
    """What the featurize + cluster stages produce for a dataset."""

    featurizer: Featurizer
    features: np.ndarray
    clustering: Clustering
    predicates: np.ndarray  # [num_images, num_predicates] relation counts


@dataclass
class BuildResult:
    """The written manifest and the wall and CPU (all threads) seconds of each stage."""

    manifest: dict
    timings: dict[str, float]
    cpu_timings: dict[str, float] = field(default_factory=dict)


class Timer:
    """Times named stages (wall and process CPU) and reports each start to a callback."""

    def __init__(self, on_stage: StageCallback | None = None) -> None:
        self.on_stage = on_stage
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage is not None:
            self.on_stage(name)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - wall
        self.cpu_timings[name] = self.cpu_timings.get(name, 0.0) + time.process_time() - cpu

    def result(self, manifest: dict) -> BuildResult:
        return BuildResult(manifest, self.timings, self.cpu_timings)


def featurize_and_cluster(
    dataset: PSGDataset,
    featurizer: Featurizer,
    num_clusters: int,
    seed: int,
    timer: Timer | None = None,
    labels: np.ndarray | None = None,
) -> Semantics:
    """Features and clusters of every image; ``labels`` (if given) replace the KMeans clusters."""
    timer = timer or Timer()
    with timer.stage("featurize"):
        features = featurizer.fit_transform(dataset)
    with timer.stage("cluster"):
        texts = dataset_triplets(dataset)
        distinct = distinct_rows(features)
        if labels is None and distinct < num_clusters:
            raise PartitionError(
                f"{dataset.source}: only {distinct} distinct image features"
                f" ({featurizer.name}) for {num_clusters} clusters; lower --clusters"
            )
        if labels is None:
            clustering = cluster_images(features, num_clusters, seed, texts)
        else:
            clustering = labelled_clustering(features, labels, num_clusters, seed, texts)
        predicates = image_predicate_counts(dataset.images, len(dataset.predicate_classes))
    return Semantics(featurizer, features, clustering, predicates)


def distinct_rows(features: np.ndarray) -> int:
    """Number of distinct feature vectors (rows compared as raw bytes: one 1-D sort)."""
    rows = np.ascontiguousarray(features)
    return len(np.unique(rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1])))))


def sweep_alpha(
    semantics: Semantics,
    train: np.ndarray,
    config: BuildConfig,
    alphas: Sequence[float],
) -> list[dict]:
    """Heterogeneity of a Dirichlet partition of ``train`` at each alpha: a diagnostic.

    Uses ``config.partition`` when it is a Dirichlet method, else ``dirichlet``. An alpha that
    cannot give every client ``min_size`` images gives a row with ``feasible`` false and no
    indices; the build goes on.
    """
    method = config.partition if config.partition in DIRICHLET_METHODS else "dirichlet"
    labels = semantics.clustering.labels[train]
    rows = []
    for alpha in alphas:
        try:
            parts = partition_indices(
                labels, config.num_clients, method, alpha, config.min_size, config.seed
            )
        except PartitionError:
            rows.append({"alpha": float(alpha), "feasible": False})
            continue
        h = partition_heterogeneity(
            labels, semantics.clustering.num_clusters, semantics.predicates[train], parts
        )
        rows.append({"alpha": float(alpha), "feasible": True, **h.summary()})
    return rows


def write_benchmark(
    tmp: Path,
    dataset: PSGDataset,
    semantics: Semantics,
    parts: list[np.ndarray],
    test: np.ndarray,
    partition: dict,
) -> dict:
    """Write shards, manifest and plots of a finished partition into the (temporary) folder.

    ``parts`` and ``test`` index ``dataset.images``.
    """
    clustering, k = semantics.clustering, semantics.clustering.num_clusters
    labels, images, root = clustering.labels, dataset.images, dataset.images_root
    het: Heterogeneity = partition_heterogeneity(labels, k, semantics.predicates, parts)
    predicate_hist = client_counts(semantics.predicates, parts)
    classes = {
        "thing": dataset.thing_classes,
        "stuff": dataset.stuff_classes,
        "predicates": dataset.predicate_classes,
    }
    clusters = clustering.describe()
    metadata = shard_metadata(classes, clusters)

    def write(file: str, part: np.ndarray) -> dict:
        return shard_entry(tmp, file, [images[j] for j in part], labels[part], k, root, metadata)

    clients = []
    for i, part in enumerate(parts):
        entry = write(client_file(i), part)
        entry["predicate_histogram"] = predicate_hist[i].tolist()
        entry["heterogeneity"] = het.clients[i]
        clients.append({"id": i, **entry})
    test_entry = write(TEST_FILE, test)
    featurizer = semantics.featurizer
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {
            "file": str(dataset.source),
            "sha256": dataset.sha256,
            "num_images": len(images),
            "has_pixels": root is not None,
        },
        "classes": classes,
        "featurizer": {
            "name": featurizer.name,
            "model_id": featurizer.model_id,
            "dim": int(semantics.features.shape[1]),
        },
        "clustering": {
            "method": "kmeans",
            "num_clusters": k,
            "silhouette": clustering.silhouette,
            "clusters": clusters,
        },
        "partition": partition,
        "num_clients": len(parts),
        "heterogeneity": het.summary(),
        "clients": clients,
        "test": test_entry,
    }
    write_manifest(tmp, manifest)
    benchmark_plots(manifest, tmp / "plots")
    write_clients_csv(manifest, tmp / "clients.csv")
    return manifest


def write_clients_csv(manifest: dict, path: Path) -> None:
    """One row per client: size, relations, dominant cluster and its heterogeneity indices."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "client",
                "num_images",
                "num_relations",
                "largest_cluster",
                "largest_cluster_share",
                "cluster_entropy",
                "cluster_jsd",
                "predicate_jsd",
            ]
        )
        for c in manifest["clients"]:
            h = c["heterogeneity"]
            writer.writerow(
                [
                    c["id"],
                    c["num_images"],
                    c["num_relations"],
                    int(np.argmax(c["cluster_histogram"])),
                    h["largest_cluster_share"],
                    h["cluster_entropy"],
                    h["cluster_jsd"],
                    h["predicate_jsd"],
                ]
            )


def write_sweep(rows: list[dict], out_dir: Path) -> None:
    """Heterogeneity-vs-alpha plot and CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heterogeneity_vs_alpha(rows, out_dir / "heterogeneity_vs_alpha.png")
    with open(out_dir / "heterogeneity_vs_alpha.csv", "w", newline="") as handle:
        indices = [f.name for f in dataclasses.fields(Heterogeneity) if f.name != "clients"]
        fields = ["alpha", *indices, "feasible"]
        writer = csv.DictWriter(handle, fieldnames=fields)  # infeasible rows leave indices blank
        writer.writeheader()
        writer.writerows(rows)


def check_alpha(config: BuildConfig) -> None:
    """Dirichlet methods take exactly one of alpha / target index; the others take neither."""
    given = (config.alpha is not None) + (config.target_index is not None)
    if config.partition in DIRICHLET_METHODS and given != 1:
        raise ConfigError(f"{config.partition} needs exactly one of --alpha and --target-index")
    if config.partition not in DIRICHLET_METHODS and given:
        raise ConfigError(
            f"--alpha and --target-index are only for {', '.join(DIRICHLET_METHODS)},"
            f" not {config.partition!r}"
        )


def check_relations(dataset: PSGDataset) -> None:
    """Without a single relation there are no triplet semantics to cluster or measure."""
    if not any(image["relations"] for image in dataset.images):
        raise PSGFormatError(
            dataset.source, None, "data[*].relations",
            f"at least one relation in the dataset, got none in {len(dataset.images)} images",
        )  # fmt: skip


def check_test_split(labels: np.ndarray, test: np.ndarray, fraction: float) -> None:
    """An empty test split leaves the server nothing to evaluate: refuse it with the reason."""
    if len(test) == 0:
        largest = int(np.bincount(labels).max())
        raise PartitionError(
            f"the test split is empty: {fraction:g} of each cluster rounds to 0 images"
            f" (the largest cluster has {largest}); raise --test-fraction or lower --clusters"
        )


@contextmanager
def _naming(source: Path) -> Iterator[None]:
    """Prefix a partition error with the input file, so the CLI's one line names it."""
    try:
        yield
    except PartitionError as error:
        raise type(error)(f"{source}: {error}") from error


def build_benchmark(
    psg: str | Path,
    out: str | Path,
    config: BuildConfig,
    images_root: str | Path | None = None,
    overwrite: bool = False,
    on_stage: StageCallback | None = None,
) -> BuildResult:
    """Build a benchmark folder from a ``psg.json(.gz)``; nothing is left at ``out`` on failure.

    Raises ``ConfigError`` for settings out of range, ``PSGFormatError`` for bad input,
    ``PartitionError`` for data that cannot be split as asked, ``BenchmarkError`` for the output.
    """
    config.validate()
    check_alpha(config)
    check_output(Path(out), overwrite)
    timer = Timer(on_stage)
    with timer.stage("load"):
        dataset = load_psg(psg, images_root)
        check_relations(dataset)
        if not 1 <= config.num_clusters <= len(dataset.images):
            raise PartitionError(
                f"{psg}: {len(dataset.images)} images cannot form {config.num_clusters} clusters"
            )
        featurizer = build_featurizer(config.featurizer, **config.featurizer_options)
    semantics = featurize_and_cluster(dataset, featurizer, config.num_clusters, config.seed, timer)
    with timer.stage("partition"), _naming(dataset.source):
        labels = semantics.clustering.labels
        train, test = split_test(labels, config.test_fraction, config.seed)
        check_test_split(labels, test, config.test_fraction)
        alpha, partition = config.alpha, {"method": config.partition}
        if config.target_index is not None:
            alpha, achieved = search_alpha(
                labels[train],
                config.num_clusters,
                config.num_clients,
                config.target_index,
                config.seed,
                config.partition,
                config.min_size,
            )
            partition.update(target_index=config.target_index, achieved_index=achieved)
        parts = [
            train[p]
            for p in partition_indices(
                labels[train],
                config.num_clients,
                config.partition,
                alpha,
                config.min_size,
                config.seed,
            )
        ]
        partition.update(
            alpha=alpha,
            num_clients=config.num_clients,
            min_size=config.min_size,
            seed=config.seed,
            test_fraction=config.test_fraction,
        )
        sweep = sweep_alpha(semantics, train, config, config.alpha_sweep)
    with timer.stage("export"), atomic_directory(out, overwrite) as tmp:
        manifest = write_benchmark(tmp, dataset, semantics, parts, test, partition)
        if sweep:
            write_sweep(sweep, tmp / "plots")
    return timer.result(manifest)
