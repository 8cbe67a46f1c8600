"""Replay with partial participation: which clients train in round r depends on (seed, r)
alone, so the Ray simulation, the in-process engine and a multi-process deployment pick the
same partitions in every round and end with identical metrics and weights.

The tests here pin the sampling itself (node ids, listing order, other consumers of
randomness, seeds) on 200 partitions; the engines replay each other with the real app in
`test_psg_federation.py` (Ray and in-process, 3 of 5 clients per round) and
`test_deploy_local.py` (the compose file's 3 SuperNodes, 2 per round).
`test_resume.py` shows a resumed run sampling as the uninterrupted one.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType

from strategies import server_strategy
from strategies.local_grid import LocalGrid
from strategies.server import sample_clients, to_record

TRAIN, EVALUATE = MessageType.TRAIN, MessageType.EVALUATE


class PartitionedGrid(LocalGrid):
    """A LocalGrid whose nodes carry partition ids (as the ServerApp's PartitionGrid)."""

    def __init__(self, partitions: dict[int, int]) -> None:
        super().__init__(dict.fromkeys(partitions))
        self.partitions = partitions

    def client_ids(self) -> dict[int, int]:
        return dict(self.partitions)


def sampled_partitions(strategy, grid: PartitionedGrid, rounds: int) -> list[list[int]]:
    arrays = to_record({"w": np.zeros(2, np.float32)})
    out = []
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        out.append([grid.partitions[m.metadata.dst_node_id] for m in messages])
        random.random(), np.random.rand(), torch.rand(1)  # other consumers draw in between
    return out


def test_the_sample_depends_on_seed_and_round_alone():
    rng = np.random.default_rng(0)
    # the same 200 partitions behind two sets of 64-bit node ids, listed in different orders
    node_ids = rng.choice(2**40, size=200, replace=False).tolist()
    first = dict(zip(node_ids, range(200), strict=True))
    items = list(first.items())
    rng.shuffle(items)
    second = {node + 12345: pid for node, pid in items}
    runs = []
    for partitions in (first, second):
        strategy = server_strategy("fedavg", fraction_train=0.05, min_train_nodes=2, seed=11)
        random.seed(len(runs))  # the global streams are no input of sampling
        np.random.seed(len(runs))
        runs.append(sampled_partitions(strategy, PartitionedGrid(partitions), 3))
    assert runs[0] == runs[1]
    assert [len(s) for s in runs[0]] == [10, 10, 10]
    assert len({tuple(s) for s in runs[0]}) == 3  # a new sample every round
    identity = {p: p for p in range(200)}
    assert runs[0] == [sample_clients(identity, 10, 11, r, TRAIN) for r in (1, 2, 3)]

    other = server_strategy("fedavg", fraction_train=0.05, min_train_nodes=2, seed=12)
    assert sampled_partitions(other, PartitionedGrid(first), 3) != runs[0]
    # evaluation draws from a generator of its own
    assert sample_clients(identity, 10, 11, 1, EVALUATE) != runs[0][0]


def test_a_plain_grid_samples_by_node_id_whatever_its_listing_order():
    nodes = [907, 13, 500, 42, 77, 1000, 3]

    def sample(order: list[int]) -> list[int]:
        strategy = server_strategy("scaffold", fraction_train=0.5, seed=5)
        grid = LocalGrid(dict.fromkeys(order))
        messages = strategy.configure_train(1, to_record({}), ConfigRecord(), grid)
        return [m.metadata.dst_node_id for m in messages]

    assert sample(nodes) == sample(sorted(nodes, reverse=True))
    assert len(sample(nodes)) == 3
    with pytest.raises(ValueError, match="seed must be >= 0"):
        server_strategy("fedavg", seed=-1)

