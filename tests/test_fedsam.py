"""FedSAM: hand-worked SAM/ASAM steps, the SAM traps, rho=0 is FedAvg, SAM finds flatter minima."""


import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from strategies_harness import (
    heterogeneous_least_squares,
    initial_arrays,
    make_grid,
)
from torch import nn

from strategies import client_half, server_strategy, train_local
from strategies.base import ClientHalf
from strategies.fedsam import FedSAMClient
from strategies.local_grid import LocalGrid
from strategies.server import to_numpy, to_record


def _quadratic_step(adaptive: bool) -> float:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0)
    half = client_half({"algorithm": "fedsam", "rho": 0.1, "adaptive": adaptive}, lr=0.1)
    train_local(model, [None], lambda m, _: 0.5 * m.weight.sum() ** 2, half)
    return model.weight.item()


def test_sam_and_asam_steps_match_hand_worked_case():
    # f(w) = w^2 / 2 at w = 2, gradient g = 2, lr 0.1, rho 0.1.
    # SAM:  e = rho g / |g| = 0.1;                   w <- 2 - 0.1 * f'(2.1) = 1.79
    # ASAM: e = rho w^2 g / |w g| = 0.1 * 4 * 2 / 4 = 0.2; w <- 2 - 0.1 * f'(2.2) = 1.78
    assert _quadratic_step(adaptive=False) == pytest.approx(1.79, rel=1e-6)
    assert _quadratic_step(adaptive=True) == pytest.approx(1.78, rel=1e-6)


def test_server_sends_rho_and_adaptive():
    strategy = server_strategy("fedsam", rho=0.07, adaptive=True)
    msg = next(
        iter(
            strategy.configure_train(
                1, to_record(initial_arrays()), ConfigRecord(), LocalGrid({1: None, 2: None})
            )
        )
    )
    half = client_half(msg.content["config"], lr=0.1, momentum=0.9)
    assert isinstance(half, FedSAMClient)
    assert (half.rho, half.adaptive, half.momentum) == (0.07, True, 0.9)


def _bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1)
    )


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(4)
    ]


def _mse(model, batch):
    return torch.mean((model(batch[0]) - batch[1]) ** 2)


def test_rho_zero_reproduces_sgd_bitwise_with_batchnorm_and_dropout():
    states = []
    for half in [
        ClientHalf(0.05, momentum=0.9, weight_decay=1e-3),
        FedSAMClient(0.05, momentum=0.9, weight_decay=1e-3, rho=0.0),
    ]:
        model = _bn_dropout_model()
        torch.manual_seed(1)  # dropout masks
        train_local(model, _batches(), _mse, half, epochs=3)
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


def test_second_pass_leaves_batchnorm_statistics_alone():
    batch = _batches()[0]
    after = []
    for half in [ClientHalf(0.05), FedSAMClient(0.05, rho=0.5)]:
        model = _bn_dropout_model()
        train_local(model, [batch], _mse, half)
        after.append({k: v for k, v in model.state_dict().items() if "1." in k[:2]})
    # one SAM step updates BatchNorm statistics exactly once, from the unperturbed pass
    for key in ["1.running_mean", "1.running_var", "1.num_batches_tracked"]:
        assert torch.equal(after[0][key], after[1][key]), key
    assert int(after[1]["1.num_batches_tracked"]) == 1


def test_second_pass_sees_the_same_dropout_mask():
    # With dropout p = 0.5 the gradient depends on the mask: a SAM step with a tiny rho must
    # land where the plain SGD step lands with the same mask, up to O(rho).
    ends = []
    for half in [ClientHalf(0.1), FedSAMClient(0.1, rho=1e-6)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 32), nn.Dropout(0.5), nn.Linear(32, 1))
        torch.manual_seed(5)
        train_local(model, _batches()[:1], _mse, half)
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(ends[0], ends[1], atol=1e-5)


def test_low_precision_weights_are_refused_and_bf16_autocast_works():
    model = nn.Linear(5, 1).to(torch.bfloat16)
    with pytest.raises(TypeError, match="fp32 master weights"):
        train_local(model, _batches()[:1], _mse, FedSAMClient(0.1, rho=0.05))

    def autocast_mse(m, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _mse(m, batch).float()

    model = nn.Linear(5, 1)
    before = _mse(model, _batches()[0]).item()
    for _ in range(20):
        train_local(model, _batches()[:1], autocast_mse, FedSAMClient(0.05, rho=0.05))
    assert model.weight.dtype == torch.float32
    assert _mse(model, _batches()[0]).item() < 0.9 * before


def test_rho_zero_reproduces_fedavg_through_the_server():
    data = heterogeneous_least_squares()
    finals = {}
    for name, options in [("fedavg", {}), ("fedsam", {"rho": 0.0})]:
        grid, _ = make_grid(data, epochs=2)
        strategy = server_strategy(
            name, fraction_train=0.5, fraction_evaluate=0.0, seed=3, **options
        )
        result = strategy.start(
            grid, to_record(initial_arrays()), num_rounds=3
        )
        finals[name] = to_numpy(result.arrays)
    for key, value in finals["fedavg"].items():
        np.testing.assert_array_equal(finals["fedsam"][key], value)


def _largest_hessian_eigenvalue(model, loss_fn, iters: int = 100) -> float:
    """Power iteration on Hessian-vector products."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    eig = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x**2).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
        v = [h.detach() for h in hv]
    return eig


def test_sam_ends_at_a_flatter_minimum_than_sgd():
    # Two-layer linear regression from an unbalanced start: the minima form a manifold whose
    # sharpness grows with the imbalance; SGD keeps the imbalance, SAM moves to flatter minima.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.randn(4, 1, generator=gen)

    def loss(m, batch=(x, y)):
        return torch.mean((m(batch[0]) - batch[1]) ** 2)

    results = {}
    for name, half in [("sgd", ClientHalf(0.05)), ("sam", FedSAMClient(0.05, rho=0.1))]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 1, bias=False))
        with torch.no_grad():
            model[0].weight.mul_(4.0)
            model[1].weight.mul_(0.05)
        start = loss(model).item()
        train_local(model, [(x, y)] * 600, loss, half)
        results[name] = (loss(model).item(), _largest_hessian_eigenvalue(model, loss))
    # both at (near) zero loss ...
    assert results["sgd"][0] < 1e-3 * start and results["sam"][0] < 1e-3 * start, results
    # ... SAM at a much flatter point
    assert results["sam"][1] < 0.5 * results["sgd"][1], results
