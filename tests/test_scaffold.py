"""SCAFFOLD: hand-worked client and server updates, partial participation, and less drift bias
than FedAvg on heterogeneous least squares."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from strategies_harness import (
    LeastSquaresNode,
    global_loss,
    heterogeneous_least_squares,
    initial_arrays,
    make_grid,
)
from torch import nn

from strategies import client_half, server_strategy, train_local
from strategies.local_grid import LocalGrid
from strategies.scaffold import CLIENT_CONTROL, CONTROL_DELTA, SERVER_CONTROL
from strategies.server import to_numpy, to_record


def test_client_update_matches_hand_worked_case():
    # loss (w - 3)^2 from x = 1, lr 0.1, c = 0.5, c_i = 0.2, K = 2 steps of g - c_i + c:
    # step 1: g = -4    -> -3.7  -> w = 1.37
    # step 2: g = -3.26 -> -2.96 -> w = 1.666
    # c_i+ = c_i - c + (x - w) / (K lr) = 0.2 - 0.5 - 0.666 / 0.2 = -3.63; delta = -3.83
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    half = client_half({"algorithm": "scaffold", "server-lr": 1.0}, lr=0.1)
    state = {CLIENT_CONTROL: {"weight": np.array([[0.2]], np.float32)}}
    incoming = {SERVER_CONTROL: {"weight": np.array([[0.5]], np.float32)}}
    _, out = train_local(
        model, [None, None], lambda m, _: (m.weight.sum() - 3.0) ** 2, half, incoming, state
    )
    assert model.weight.item() == pytest.approx(1.666, rel=1e-5)
    assert state[CLIENT_CONTROL]["weight"].item() == pytest.approx(-3.63, rel=1e-5)
    assert out[CONTROL_DELTA]["weight"].item() == pytest.approx(-3.83, rel=1e-5)


def test_client_control_is_the_mean_gradient_under_momentum():
    # loss 2 w has the constant gradient 2, corrected to 2 + c - c_i = 2.5. With momentum 0.9
    # and K = 4 steps of lr 0.01 the model moves 0.01 * 2.5 * (1 + 1.9 + 2.71 + 3.439) =
    # 0.2262, so option II's c_i - c + (x - y) / (K lr) would give 5.16; c_i+ must be the
    # mean raw gradient, 2.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    half = client_half({"algorithm": "scaffold"}, lr=0.01, momentum=0.9)
    state: dict = {}
    incoming = {SERVER_CONTROL: {"weight": np.array([[0.5]], np.float32)}}
    train_local(model, [None] * 4, lambda m, _: 2 * m.weight.sum(), half, incoming, state)
    assert model.weight.item() == pytest.approx(1 - 0.01 * 2.5 * 9.049, rel=1e-5)
    assert state[CLIENT_CONTROL]["weight"].item() == pytest.approx(2.0, rel=1e-6)


def test_first_round_controls_default_to_zero():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    state: dict = {}
    _, out = train_local(
        model,
        [None],
        lambda m, _: (m.weight.sum() - 3.0) ** 2,
        client_half({"algorithm": "scaffold"}, lr=0.1),
        {SERVER_CONTROL: {}},
        state,
    )
    # one plain SGD step to 1.4; c_i+ = (1 - 1.4) / 0.1 = -4 (the negative gradient at x)
    assert out[CONTROL_DELTA]["weight"].item() == pytest.approx(-4.0, rel=1e-5)
    assert state[CLIENT_CONTROL]["weight"].item() == pytest.approx(-4.0, rel=1e-5)


def _reply(msg: Message, y, delta, n: int) -> Message:
    content = RecordDict(
        {
            "arrays": to_record({"w": np.array(y, np.float32)}),
            CONTROL_DELTA: to_record({"w": np.array(delta, np.float32)}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, reply_to=msg)


def test_server_update_matches_hand_worked_case():
    # N = 4 nodes, 2 sampled; x = [1, 1], server_lr = 0.5
    # weighted mean y = (1 [2, 0] + 3 [0, 4]) / 4 = [0.5, 3]
    # x <- x + 0.5 ([0.5, 3] - x) = [0.75, 2]
    # c <- 0 + (2 / 4) * mean([1, 2], [3, -2]) = [1, 0]
    strategy = server_strategy("scaffold", server_lr=0.5, fraction_train=0.5)
    grid = LocalGrid({i: None for i in range(1, 5)})
    msgs = list(
        strategy.configure_train(1, to_record({"w": np.ones(2, np.float32)}), ConfigRecord(), grid)
    )
    assert len(msgs) == 2 and dict(msgs[0].content[SERVER_CONTROL]) == {}
    replies = [_reply(msgs[0], [2, 0], [1, 2], 1), _reply(msgs[1], [0, 4], [3, -2], 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(to_numpy(arrays)["w"], [0.75, 2.0])
    np.testing.assert_allclose(strategy.control["w"], [1.0, 0.0])
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    np.testing.assert_allclose(msgs[0].content[SERVER_CONTROL]["w"].numpy(), [1.0, 0.0])


def test_server_control_stays_the_mean_of_all_client_controls_under_partial_participation():
    data = heterogeneous_least_squares(num_clients=5)
    grid, nodes = make_grid(data, epochs=2)
    strategy = server_strategy("scaffold", fraction_train=0.4, fraction_evaluate=0.0, seed=1)
    strategy.start(grid, to_record(initial_arrays()), num_rounds=4)
    zero = {k: np.zeros_like(v) for k, v in strategy.control.items()}
    for key, c in strategy.control.items():
        mean_ci = np.mean([n.state.get(CLIENT_CONTROL, zero)[key] for n in nodes.values()], axis=0)
        np.testing.assert_allclose(c, mean_ci, rtol=1e-4, atol=1e-5)
    assert np.abs(strategy.control["weight"]).sum() > 0


def test_scaffold_reaches_lower_global_loss_than_fedavg():
    data = heterogeneous_least_squares()
    x = torch.cat([torch.cat([d[0], torch.ones(len(d[0]), 1)], 1) for d in data])
    y = torch.cat([d[1] for d in data])
    optimum = float(((x @ torch.linalg.lstsq(x, y).solution - y) ** 2).mean())
    excess = {}
    for name in ["fedavg", "scaffold"]:
        grid, _ = make_grid(data, epochs=5)
        result = server_strategy(name, fraction_evaluate=0.0).start(
            grid, to_record(initial_arrays()), num_rounds=15
        )
        excess[name] = global_loss(to_numpy(result.arrays), data) - optimum
    # FedAvg's many local steps on heterogeneous clients stall at a biased point.
    assert excess["scaffold"] < 0.1 * excess["fedavg"], excess


class ForgetsControl(LeastSquaresNode):
    """A client that trains but sends no control delta (e.g. a FedAvg ClientApp)."""

    def __call__(self, msg):
        reply = super().__call__(msg)
        reply.pop(CONTROL_DELTA)
        return reply


def test_reply_without_control_delta_is_left_out(caplog):
    data = heterogeneous_least_squares(num_clients=3)
    nodes = {1: LeastSquaresNode(data[0]), 2: LeastSquaresNode(data[1]), 3: ForgetsControl(data[2])}
    strategy = server_strategy("scaffold", fraction_evaluate=0.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy.start(LocalGrid(nodes), to_record(initial_arrays()), num_rounds=1)
    assert any(
        "node 3" in r.getMessage() and "control-delta" in r.getMessage() for r in caplog.records
    )
    # c = |S|/N * mean of the 2 usable deltas (= their new c_i, from zero) with N = 3
    for key, c in strategy.control.items():
        expected = (
            (2 / 3)
            * (nodes[1].state[CLIENT_CONTROL][key] + nodes[2].state[CLIENT_CONTROL][key])
            / 2
        )
        np.testing.assert_allclose(c, expected, rtol=1e-5)
