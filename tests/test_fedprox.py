"""FedProx: hand-worked proximal step, mu=0 is FedAvg, and drift shrinks as mu grows."""


import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from strategies_harness import heterogeneous_least_squares, initial_arrays, make_grid
from torch import nn

from strategies import client_half, server_strategy, train_local
from strategies.fedprox import FedProxClient
from strategies.local_grid import LocalGrid
from strategies.server import to_numpy, to_record


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_server_sends_proximal_mu():
    strategy = server_strategy("fedprox", proximal_mu=0.25)
    grid = LocalGrid({7: None, 8: None})
    (msg, _) = strategy.configure_train(1, to_record(initial_arrays()), ConfigRecord(), grid)
    config = msg.content["config"]
    assert (config["algorithm"], config["proximal-mu"]) == ("fedprox", 0.25)
    half = client_half(config, lr=0.1)
    assert isinstance(half, FedProxClient) and half.mu == 0.25


def test_client_steps_match_hand_worked_case():
    # local loss (w - 3)^2 from w_global = 1, lr 0.1, mu 1:
    # step 1: grad 2(1 - 3) + 1 * (1 - 1) = -4        -> w = 1.4
    # step 2: grad 2(1.4 - 3) + 1 * (1.4 - 1) = -2.8  -> w = 1.68
    model = _scalar_model(1.0)
    half = client_half({"algorithm": "fedprox", "proximal-mu": 1.0}, lr=0.1)

    def loss_fn(m, _):
        return (m.weight.sum() - 3.0) ** 2

    loss, _ = train_local(model, [None, None], loss_fn, half)
    assert model.weight.item() == pytest.approx(1.68, rel=1e-6)
    # reported losses include the proximal term: (4 + 0) and (2.56 + 0.5 * 0.16)
    assert loss == pytest.approx((4.0 + 2.56 + 0.08) / 2, rel=1e-6)


def test_mu_zero_reproduces_fedavg_exactly():
    data = heterogeneous_least_squares()
    finals = {}
    for name, options in [("fedavg", {}), ("fedprox", {"proximal_mu": 0.0})]:
        grid, _ = make_grid(data, epochs=2)
        strategy = server_strategy(
            name, fraction_train=0.5, fraction_evaluate=0.0, seed=3, **options
        )
        result = strategy.start(
            grid, to_record(initial_arrays()), num_rounds=4
        )
        finals[name] = to_numpy(result.arrays)
    for key, value in finals["fedavg"].items():
        np.testing.assert_array_equal(finals["fedprox"][key], value)


def test_client_drift_shrinks_as_mu_grows():
    data = heterogeneous_least_squares()
    drift = []
    for mu in [0.0, 0.1, 1.0, 10.0]:
        grid, _ = make_grid(data, epochs=5)
        result = server_strategy("fedprox", proximal_mu=mu, fraction_evaluate=0.0).start(
            grid, to_record(initial_arrays()), num_rounds=3
        )
        # mean ||w_i - w_global|| over clients, averaged over rounds
        drift.append(np.mean([m["drift"] for m in result.train_metrics_clientapp.values()]))
    assert all(a > b for a, b in zip(drift, drift[1:], strict=False)), drift
    assert drift[-1] < 0.5 * drift[0], drift
