"""Symmetric sharpness and Lanczos eigenvalues against answers computed another way: the
exact quadratic form of a least-squares loss, and the dense Hessian of a small network."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from diffusion_clients.flatness import (
    filter_normalized_direction,
    hessian_eigenvalues,
    sharpness,
)


def _least_squares(scale: float, at_minimum: bool = True):
    """A linear least-squares model; inputs scaled by `scale` make the loss `scale**2` times
    as curved. Off the minimum the loss has a slope, which one-sided perturbations pick up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64) * scale
    w = torch.randn(1, 6, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w if at_minimum else w + 0.3)
    y = x @ w.T
    return model, x, lambda m: ((m(x) - y) ** 2).mean()


def test_symmetric_sharpness_is_the_exact_quadratic_form_off_the_minimum():
    """For L(w) = mean((x w - y)^2), (L(w + s d) + L(w - s d)) / 2 - L(w) = s^2 mean((x d)^2)
    exactly, slope or not; a one-sided increase would add s * grad . d."""
    model, x, loss = _least_squares(1.0, at_minimum=False)
    sigmas, num = (0.001, 0.02, 0.05), 6
    got = sharpness(model, loss, sigmas, num_directions=num, seed=3)
    gen = torch.Generator().manual_seed(3)
    directions = [filter_normalized_direction(model, gen)[0] for _ in range(num)]
    quadratic = np.mean([float(((x @ d.T) ** 2).mean()) for d in directions])
    for sigma in sigmas:
        assert got[sigma] == pytest.approx(sigma**2 * quadratic, rel=1e-8)
    assert got[0.001] > 0  # the one-sided version is dominated by the slope here


def test_sharper_model_has_larger_sharpness_and_weights_come_back():
    flat, _, flat_loss = _least_squares(1.0)
    sharp, _, sharp_loss = _least_squares(5.0)
    sigmas = (0.01, 0.05)
    s_flat = sharpness(flat, flat_loss, sigmas, num_directions=4)
    s_sharp = sharpness(sharp, sharp_loss, sigmas, num_directions=4)
    for sigma in sigmas:
        assert s_sharp[sigma] == pytest.approx(25 * s_flat[sigma], rel=1e-9)
    w = flat.weight.detach().clone()
    sharpness(flat, flat_loss, sigmas)
    assert torch.equal(flat.weight, w)


def test_direction_is_filter_normalised():
    conv = nn.Conv2d(3, 5, 3)
    d = filter_normalized_direction(conv, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d[0].flatten(1).norm(dim=1), conv.weight.flatten(1).norm(dim=1))
    assert torch.count_nonzero(d[1]) == 0


def _indefinite_problem():
    """A tanh network with biases and a LayerNorm away from any minimum: its Hessian has
    eigenvalues of both signs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64) * 3
    return model, lambda m: ((m(x) - y) ** 2).mean()


def _dense_hessian(model: nn.Module, loss, names: list[str]) -> np.ndarray:
    """The Hessian over the named parameters by torch.autograd.functional.hessian on a
    flat vector (no Hessian-vector products, no Lanczos)."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return loss(lambda inp: functional_call(model, {**params, **pieces}, (inp,)))

    start = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(flat_loss, start).numpy()


@pytest.mark.parametrize("parameters", ["all", "weights"])
def test_lanczos_extremes_match_the_dense_hessian(parameters):
    model, loss = _indefinite_problem()
    names = [n for n, p in model.named_parameters() if parameters == "all" or p.ndim >= 2]
    spectrum = np.linalg.eigvalsh(_dense_hessian(model, loss, names))
    assert spectrum[0] < 0 < spectrum[-1]
    got = hessian_eigenvalues(model, loss, parameters=parameters, tol=1e-10)
    assert got.num_parameters == len(spectrum)
    assert got.largest == pytest.approx(spectrum[-1], rel=1e-6)
    assert got.smallest == pytest.approx(spectrum[0], rel=1e-6)
    assert got.as_dict()["parameters"] == parameters


def test_unknown_parameter_set_is_refused():
    model, loss = _indefinite_problem()
    with pytest.raises(ValueError, match="parameters must be one of"):
        hessian_eigenvalues(model, loss, parameters="biases")
