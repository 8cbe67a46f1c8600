"""FedAvg: hand-worked aggregate and client step, and a federated least-squares run."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from strategies_harness import (
    global_loss,
    heterogeneous_least_squares,
    initial_arrays,
    make_grid,
)
from torch import nn

from strategies import client_half, server_strategy, train_local
from strategies.base import ClientHalf
from strategies.local_grid import LocalGrid
from strategies.server import to_numpy, to_record


def _reply(msg: Message, arrays: dict, n: int, loss: float) -> Message:
    content = RecordDict(
        {"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": n, "loss": loss})}
    )
    return Message(content, reply_to=msg)


def test_aggregate_matches_hand_worked_weighted_mean():
    strategy = server_strategy("fedavg", min_train_nodes=2)
    grid = LocalGrid({1: None, 2: None})
    global_model = {"w": np.array([0.0, 0.0], np.float32), "n": np.array(5, np.int64)}
    msgs = list(strategy.configure_train(1, to_record(global_model), ConfigRecord(), grid))
    assert msgs[0].content["config"]["algorithm"] == "fedavg"
    replies = [
        _reply(msgs[0], {"w": np.array([1.0, 2.0], np.float32), "n": np.array(7)}, 1, 4.0),
        _reply(msgs[1], {"w": np.array([4.0, 8.0], np.float32), "n": np.array(7)}, 3, 2.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = to_numpy(arrays)
    # (1*[1, 2] + 3*[4, 8]) / 4 = [3.25, 6.5]; loss (1*4 + 3*2) / 4 = 2.5
    np.testing.assert_allclose(w["w"], [3.25, 6.5])
    assert w["w"].dtype == np.float32 and w["n"].dtype == np.int64 and int(w["n"]) == 7
    assert metrics["loss"] == 2.5


def test_client_step_matches_hand_worked_sgd():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    batch = (torch.tensor([[2.0]]), torch.tensor([[0.0]]))
    half = client_half({"algorithm": "fedavg"}, lr=0.1)
    assert type(half) is ClientHalf

    def loss_fn(m, b):
        return ((m(b[0]) - b[1]) ** 2).sum()

    # loss (2w)^2 at w = 1: gradient 8w = 8, so w <- 1 - 0.1 * 8 = 0.2; then 0.2 - 0.1 * 1.6
    loss, extra = train_local(model, [batch], loss_fn, half, epochs=2)
    assert extra == {}
    assert half.num_steps == 2
    np.testing.assert_allclose(model.weight.item(), 0.04, rtol=1e-6)
    assert loss == pytest.approx((4.0 + 0.16) / 2, rel=1e-6)


def test_federated_least_squares_loss_falls():
    data = heterogeneous_least_squares()
    grid, _ = make_grid(data, epochs=2)
    init = initial_arrays()
    result = server_strategy("fedavg", fraction_evaluate=0.5).start(
        grid, to_record(init), num_rounds=5
    )
    assert global_loss(to_numpy(result.arrays), data) < 0.3 * global_loss(init, data)
    assert set(result.train_metrics_clientapp) == {1, 2, 3, 4, 5}
    assert "loss" in result.evaluate_metrics_clientapp[5]
