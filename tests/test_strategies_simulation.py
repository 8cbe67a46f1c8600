"""Every strategy in a real Flower simulation (Ray backend): one ServerApp runs all four on the
same simulated federation of least-squares clients, so Ray starts once."""

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from strategies_harness import (
    LeastSquaresNode,
    global_loss,
    heterogeneous_least_squares,
    initial_arrays,
)

from strategies import ALGORITHMS, server_strategy
from strategies.server import to_numpy, to_record

NUM_CLIENTS = 4
ROUNDS = 3
OPTIONS = {
    "fedavg": {"ema_decay": 0.5},
    "fedprox": {"proximal_mu": 0.1},
    "fedsam": {"rho": 0.05, "adaptive": True},
    "scaffold": {"swa_start": 2},
}
DATA = heterogeneous_least_squares(num_clients=NUM_CLIENTS)

client_app = ClientApp()


def _node(context: Context) -> LeastSquaresNode:
    """This SuperNode's client; its persistent arrays live in context.state."""
    node = LeastSquaresNode(DATA[int(context.node_config["partition-id"])], epochs=2)
    node.state = {k: to_numpy(v) for k, v in context.state.array_records.items()}
    return node


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    reply = node(msg)
    for key, arrays in node.state.items():
        context.state[key] = to_record(arrays)
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(_node(context)(msg), reply_to=msg)


RESULTS: dict = {}
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    for name in ALGORITHMS:
        strategy = server_strategy(
            name,
            fraction_train=0.75,
            fraction_evaluate=0.5,
            min_available_nodes=NUM_CLIENTS,
            **OPTIONS[name],
        )
        RESULTS[name] = strategy.start(
            grid,
            to_record(initial_arrays()),
            num_rounds=ROUNDS,
            evaluate_fn=lambda r, a: MetricRecord({"loss": global_loss(to_numpy(a), DATA)}),
        )


@pytest.mark.slow
def test_every_strategy_learns_in_a_flower_simulation():
    import ray

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "num_gpus": 0, "log_to_driver": False},
        },
    )
    assert not ray.is_initialized()
    assert set(RESULTS) == set(ALGORITHMS)
    for name, result in RESULTS.items():
        losses = [result.evaluate_metrics_serverapp[r]["loss"] for r in range(ROUNDS + 1)]
        assert losses[-1] < 0.5 * losses[0], (name, losses)
        assert set(result.train_metrics_clientapp) == set(range(1, ROUNDS + 1)), name
        assert "loss" in result.evaluate_metrics_clientapp[ROUNDS], name
        assert np.isfinite(to_numpy(result.arrays)["weight"]).all()
