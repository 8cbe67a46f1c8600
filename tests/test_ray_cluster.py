"""`fedpsg simulate --ray-address`: the ClientApps run on an existing Ray cluster (and,
without it, not on one that happens to run).

A two-node cluster on this machine (`ray.cluster_utils.Cluster`: a head and a second raylet,
one CPU each); with one CPU per ClientApp, Flower's actor pool holds one actor per node, and
the cluster's actor table shows a ClientAppActor on each of the two nodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from conftest import build_synthetic_benchmark
from ray._private.state import actors  # the GCS actor table: no dashboard needed
from ray.cluster_utils import Cluster

from fedpsg.run.simulate import simulate

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    """A head node and one more node, one CPU each; both stopped afterwards."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_client_apps_run_on_both_nodes_of_an_existing_cluster(
    tmp_path: Path, cluster, capfd, monkeypatch
):
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    bench = build_synthetic_benchmark(
        tmp_path, 60, 0, with_pixels=False, num_clients=2, alpha=1.0, seed=0
    )
    config = {"benchmark-dir": str(bench), "num-server-rounds": 2, "batch-size": 8}
    code = simulate(config, 2, tmp_path / "run", ray_address=cluster.address)
    assert code == 0
    shown = [line for line in capfd.readouterr().out.splitlines() if line.strip()]
    assert sum("[fedpsg] round" in line for line in shown) == 3  # rounds 0, 1, 2: once each
    assert not any("[ROUND" in line for line in shown)  # Flower's echo is in the log only
    assert "[ROUND 2/2]" in (tmp_path / "run" / "flwr_run.log").read_text()

    ray.init(address=cluster.address)
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    client_apps = [a for a in actors().values() if a["ActorClassName"] == "ClientAppActor"]
    assert len(nodes) == 2
    assert {a["Address"]["NodeID"] for a in client_apps} == nodes

    # without an address, a simulation starts its own Ray: Ray's default would have joined
    # this cluster, the last one started on the machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert simulate({**config, "num-server-rounds": 1}, 2, tmp_path / "own") == 0
    after = [a for a in actors().values() if a["ActorClassName"] == "ClientAppActor"]
    assert len(after) == len(client_apps)
