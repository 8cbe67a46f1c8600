"""Replay with partial participation: which clients train in round r depends on (seed, r)
alone, so the Ray simulation, the in-process engine and a multi-process deployment pick the
same partitions in every round and end with identical metrics and weights.

The strategy-level tests pin the sampling itself (node ids, listing order, other consumers of
randomness, seeds); the engine tests run the real app on a 200-client benchmark at 5% per
round (Ray and in-process) and on the compose file's 3 SuperNodes, 2 per round (deployment).
`test_resume.py` shows a resumed run sampling as the uninterrupted one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_synthetic_benchmark
from flwr.app import ConfigRecord, MessageType

from fedpsg.run.simulate import simulate, simulate_in_process
from strategies import server_strategy
from strategies.local_grid import LocalGrid
from strategies.server import sample_clients, to_record

ROOT = Path(__file__).resolve().parents[1]
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


CLIENTS, FRACTION, ROUNDS = 200, 0.05, 3
RUN = {
    "task": "psg",
    "model": "frequency",
    "num-server-rounds": ROUNDS,
    "fraction-train": FRACTION,
    "min-train-nodes": 2,
    "local-epochs": 1,
    "lr": 0.1,
    "batch-size": 4,
    "seed": 0,
}


@pytest.fixture(scope="module")
def bench200(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sampling")
    return build_synthetic_benchmark(
        root, 480, 1, with_pixels=False, num_clients=CLIENTS, partition="iid", alpha=None,
        num_clusters=3, seed=0, featurizer_options={"cache_dir": str(root / "cache")},
    )  # fmt: skip


def rounds(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["rounds"]


def assert_same_run(ours: Path, theirs: Path) -> None:
    """Same partitions sampled, same metrics, same final weights, round by round."""
    a, b = rounds(ours), rounds(theirs)
    assert [r["round"] for r in a] == [r["round"] for r in b]
    assert [r["sampled"] for r in a] == [r["sampled"] for r in b]
    assert [r["server"] for r in a] == [r["server"] for r in b]
    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    wa, wb = torch.load(ours / "final_model.pt"), torch.load(theirs / "final_model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_ray_and_in_process_sample_the_same_partitions_every_round(bench200, tmp_path):
    config = {**RUN, "benchmark-dir": str(bench200)}
    ray_dir, local_dir = tmp_path / "ray", tmp_path / "in-process"
    code = simulate(config, CLIENTS, ray_dir, flwr_home=tmp_path / "flwr-home", stream=False,
                    timeout=500)  # fmt: skip
    assert code == 0, (ray_dir / "flwr_run.log").read_text()[-3000:]
    simulate_in_process(config, CLIENTS, local_dir)
    assert_same_run(ray_dir, local_dir)
    identity = {p: p for p in range(CLIENTS)}
    expected = [sample_clients(identity, 10, 0, r, TRAIN) for r in range(1, ROUNDS + 1)]
    assert [r["sampled"]["train"] for r in rounds(ray_dir)[1:]] == expected
    assert [sorted(c["partition-id"] for c in r["clients"]) for r in rounds(ray_dir)[1:]] == (
        expected
    )
    assert rounds(ray_dir)[-1]["server"]["R@50"] > rounds(ray_dir)[0]["server"]["R@50"]


# The deployment engine's replay of the in-process engine under sampling:
# tests/test_deploy_local.py::test_local_federation_replays_the_in_process_engine_with_sampling.
