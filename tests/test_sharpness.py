"""Sharpness and power iteration on problems whose answers are known."""

import numpy as np
import torch
from torch import nn

from diffusion_clients.flatness import (
    filter_normalized_direction,
    hessian_top_eigenvalue,
    sharpness,
)


def _fitted(scale: float):
    """A linear least-squares model at its minimum; inputs scaled by `scale` make the same
    minimum `scale**2` times as curved."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g) * scale
    w = torch.randn(1, 6, generator=g)
    model = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    y = x @ w.T
    return model, x, lambda m: ((m(x) - y) ** 2).mean()


def test_power_iteration_matches_top_eigenvalue_of_quadratic():
    model, x, loss = _fitted(1.0)
    hessian = 2 * x.T @ x / len(x)
    expected = float(np.linalg.eigvalsh(hessian.double().numpy())[-1])
    got = hessian_top_eigenvalue(model, loss, num_iters=200, tol=1e-9)
    assert abs(got - expected) / expected < 1e-3


def test_sharper_model_has_larger_sharpness():
    flat, _, flat_loss = _fitted(1.0)
    sharp, _, sharp_loss = _fitted(5.0)
    sigmas = (0.01, 0.05)
    s_flat = sharpness(flat, flat_loss, sigmas, num_directions=4)
    s_sharp = sharpness(sharp, sharp_loss, sigmas, num_directions=4)
    for sigma in sigmas:
        assert s_flat[sigma] > 0
        assert s_sharp[sigma] > 10 * s_flat[sigma]
    assert s_flat[0.05] > s_flat[0.01]
    w = flat.weight.detach().clone()
    sharpness(flat, flat_loss, sigmas)
    assert torch.equal(flat.weight, w)


def test_direction_is_filter_normalised():
    conv = nn.Conv2d(3, 5, 3)
    d = filter_normalized_direction(conv, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d[0].flatten(1).norm(dim=1), conv.weight.flatten(1).norm(dim=1))
    assert torch.count_nonzero(d[1]) == 0
