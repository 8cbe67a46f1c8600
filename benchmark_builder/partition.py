"""Partition images over clients by semantic cluster, as a flwr-datasets ``Partitioner``.

Methods (``METHODS``), all seeded:

- ``dirichlet``: per *cluster*, proportions over clients drawn from Dir(alpha) - flwr-datasets'
  ``DirichletPartitioner`` (Yurochkin et al.), which resamples until every client holds at least
  ``min_partition_size`` images. Client sizes vary; at small alpha a cluster lands on one or two
  clients. This is the default and what ``--alpha`` means on the CLI.
- ``dirichlet-client``: per *client*, a cluster mixture drawn from Dir(alpha), with equal client
  sizes - flwr-datasets' ``InnerDirichletPartitioner`` (Acar et al.). The two differ in practice:
  per-cluster splits skew sizes as well as content, per-client mixtures skew only content.
- ``iid``: a seeded shuffle split evenly (flwr-datasets' ``IidPartitioner``).
- ``shard``: every client draws from exactly one cluster. Clients are given to clusters by the
  D'Hondt rule (largest images-per-client first) and a cluster's images are split evenly among
  its clients; with fewer clients than clusters each client takes whole clusters instead
  (largest cluster to the smallest client). flwr-datasets' ``ShardPartitioner`` is not used: it
  cuts label-sorted data into equal chunks that straddle clusters and drops the remainder, and
  here every image must land in exactly one client.

Also here: the held-out test split (stratified by cluster) and the alpha search for a target
cluster heterogeneity index (bisection on log-alpha).
"""

from __future__ import annotations

import math
import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    Partitioner,
)

from benchmark_builder.heterogeneity import cluster_jsd

METHODS = ("dirichlet", "dirichlet-client", "iid", "shard")
DIRICHLET_METHODS = ("dirichlet", "dirichlet-client")


SEED_END = 2**32  # numpy and scikit-learn seeds are 32-bit


class PartitionError(ValueError):
    """The requested partition cannot be made from this data (e.g. min size unreachable)."""


class ConfigError(PartitionError):
    """A setting is out of its range whatever the data (a usage error: the CLI exits 2)."""


def check_seed(seed: object) -> None:
    """Seeds are integers in ``[0, 2**32)``, the range every seeded library accepts."""
    if type(seed) is not int or not 0 <= seed < SEED_END:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")


class SemanticPartitioner(Partitioner):
    """Partition a ``datasets.Dataset`` by its cluster column; plugs into ``FederatedDataset``.

    Parameters
    ----------
    num_partitions : int
        Number of clients.
    method : str
        One of ``METHODS``.
    alpha : float | None
        Dirichlet concentration (only for the Dirichlet methods; small = heterogeneous).
    partition_by : str
        Column holding each row's cluster label.
    min_partition_size : int
        Fewest rows a client may get; Dirichlet draws are repeated until it holds.
    seed : int
        Seeds every random draw.
    """

    def __init__(
        self,
        num_partitions: int,
        method: str = "dirichlet",
        alpha: float | None = None,
        partition_by: str = "cluster",
        min_partition_size: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise PartitionError(f"unknown partition method {method!r}; choose one of {METHODS}")
        if (method in DIRICHLET_METHODS) != (alpha is not None):
            raise PartitionError(
                f"alpha is required for {DIRICHLET_METHODS} and only for them (method {method!r})"
            )
        if alpha is not None and not alpha > 0:
            raise PartitionError(f"alpha must be > 0, got {alpha}")
        if num_partitions < 1:
            raise PartitionError(f"need at least one partition, got {num_partitions}")
        check_seed(seed)
        self._num_partitions = num_partitions
        self.method = method
        self.alpha = None if alpha is None else float(alpha)
        self.partition_by = partition_by
        self.min_partition_size = min_partition_size
        self.seed = seed
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    @property
    def partition_indices(self) -> list[np.ndarray]:
        """Row indices of every partition (computed once, on first use)."""
        if self._indices is None:
            labels = np.asarray(self.dataset[self.partition_by][:])  # [:]: one bulk read
            self._indices = self._assign(labels)
        return self._indices

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The rows of partition ``partition_id``."""
        return self.dataset.select(self.partition_indices[partition_id])

    def _assign(self, labels: np.ndarray) -> list[np.ndarray]:
        n = len(labels)
        if n < self._num_partitions * self.min_partition_size:
            raise PartitionError(
                f"{n} images cannot give {self._num_partitions} clients"
                f" at least {self.min_partition_size} each"
            )
        if self.method == "shard":
            parts = _shard(labels, self._num_partitions, np.random.default_rng(self.seed))
        else:
            parts = self._flwr_assign(labels)
        smallest = min(len(p) for p in parts)
        if smallest < self.min_partition_size:
            raise PartitionError(
                f"a client got {smallest} images, fewer than min size {self.min_partition_size}"
                f" ({self.method}); lower the min size or use fewer clients"
            )
        return parts

    def _flwr_assign(self, labels: np.ndarray) -> list[np.ndarray]:
        """Delegate to flwr-datasets on a (dense cluster id, row index) helper dataset."""
        rows = np.arange(len(labels))
        n, k = self._num_partitions, self.method
        if k == "iid":  # IidPartitioner splits contiguously: shuffle first
            rows = np.random.default_rng(self.seed).permutation(rows)
        dense = np.unique(labels, return_inverse=True)[1]
        helper = datasets.Dataset.from_dict({"cluster": dense[rows], "row": rows})
        if k == "iid":
            inner: Partitioner = IidPartitioner(n)
        elif k == "dirichlet":
            inner = DirichletPartitioner(
                n, "cluster", self.alpha, min_partition_size=self.min_partition_size, seed=self.seed
            )
        else:
            sizes = [len(part) for part in np.array_split(np.arange(len(labels)), n)]
            inner = InnerDirichletPartitioner(sizes, "cluster", self.alpha, seed=self.seed)
        inner.dataset = helper
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return [np.asarray(inner.load_partition(i)["row"][:], np.int64) for i in range(n)]
        except ValueError as error:
            raise PartitionError(
                f"{k} partition with alpha={self.alpha} could not give all {n} clients at least"
                f" {self.min_partition_size} images ({error}); raise alpha or lower the min size"
            ) from error


def _shard(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client from one cluster (see the module docstring); every row is assigned."""
    clusters, sizes = np.unique(labels, return_counts=True)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in clusters]
    if num_clients < len(clusters):
        loads, parts = np.zeros(num_clients), [[] for _ in range(num_clients)]
        for c in np.argsort(-sizes, kind="stable"):
            client = int(np.argmin(loads))
            parts[client].append(members[c])
            loads[client] += sizes[c]
        return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    seats = np.ones(len(clusters), dtype=np.int64)
    for _ in range(num_clients - len(clusters)):
        seats[np.argmax(sizes / (seats + 1))] += 1
    return [part for c, m in enumerate(members) for part in np.array_split(m, seats[c])]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str = "dirichlet",
    alpha: float | None = None,
    min_size: int = 1,
    seed: int = 0,
) -> list[np.ndarray]:
    """Indices into ``labels`` of each client's images (see ``SemanticPartitioner``)."""
    partitioner = SemanticPartitioner(num_partitions, method, alpha, "cluster", min_size, seed)
    partitioner.dataset = datasets.Dataset.from_dict({"cluster": np.asarray(labels)})
    return partitioner.partition_indices


def split_test(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices; each cluster gives ``round(test_fraction * size)`` images to test.

    Stratifying by cluster keeps the server's test set as semantically mixed as the whole data.
    """
    if not 0 <= test_fraction < 1:
        raise PartitionError(f"test fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = [
        rng.permutation(members)[: round(test_fraction * len(members))]
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def search_alpha(
    labels: np.ndarray,
    num_clusters: int,
    num_partitions: int,
    target: float,
    seed: int,
    method: str = "dirichlet",
    min_size: int = 1,
    bounds: tuple[float, float] = (1e-3, 1e3),
    steps: int = 24,
    tolerance: float = 0.005,
) -> tuple[float, float]:
    """Alpha whose partition's cluster JSD is closest to ``target``: bisection on log-alpha.

    The index falls as alpha grows; at a fixed seed it is not strictly monotone, so the best
    alpha seen is returned with its index. An alpha whose draw cannot meet ``min_size`` counts as
    too heterogeneous. Both ends of ``bounds`` are tried first, so a target that no alpha reaches
    is refused with ``PartitionError`` naming the reachable range. Returns
    ``(alpha, achieved_index)``.
    """
    if method not in DIRICHLET_METHODS:
        raise PartitionError(f"alpha search needs a Dirichlet method, got {method!r}")
    seen: dict[float, float] = {}

    def index_at(alpha: float) -> float | None:
        try:
            parts = partition_indices(labels, num_partitions, method, alpha, min_size, seed)
        except PartitionError:
            return None
        seen[alpha] = cluster_jsd(labels, num_clusters, parts)
        return seen[alpha]

    for alpha in bounds:
        index_at(alpha)
    low, high = math.log(bounds[0]), math.log(bounds[1])
    for _ in range(steps):
        if seen and min(abs(i - target) for i in seen.values()) <= tolerance:
            break
        mid = (low + high) / 2
        index = index_at(math.exp(mid))
        if index is None or index > target:
            low = mid
        else:
            high = mid
    if not seen:
        raise PartitionError(
            f"no alpha in [{bounds[0]:g}, {bounds[1]:g}] gives all {num_partitions} clients"
            f" at least {min_size} images; use fewer clients or a lower min size"
        )
    alpha = min(seen, key=lambda a: (abs(seen[a] - target), a))
    reachable = (min(seen.values()), max(seen.values()))
    if abs(seen[alpha] - target) > tolerance and not reachable[0] <= target <= reachable[1]:
        raise PartitionError(
            f"target index {target:g} is outside the reachable cluster JSD range"
            f" [{reachable[0]:.4f}, {reachable[1]:.4f}] (alpha {bounds[0]:g} to {bounds[1]:g},"
            f" {num_partitions} clients, {num_clusters} clusters, {method})"
        )
    return alpha, seen[alpha]
