"""Flatness of a trained model, generic over any model and loss closure.

* `sharpness`: mean loss increase under random filter-normalised weight perturbations
  (Li et al., 2018) of relative size sigma: each filter of the direction is rescaled to the
  norm of the matching weight filter, so sigma is a size relative to the weights. Every
  direction is applied both ways and the two losses averaged, (L(w + s d) + L(w - s d)) / 2
  - L(w): the first-order term cancels, leaving s^2/2 d'Hd + O(s^4), so small-sigma values
  measure curvature rather than the slope of a model that is not exactly at a minimum.
* `hessian_eigenvalues`: the largest and the smallest Hessian eigenvalue by Lanczos
  (`scipy.sparse.linalg.eigsh`) on Hessian-vector products (double backward), over all
  trainable parameters or over the weights only (biases and normalisation parameters, the
  one-dimensional tensors, held fixed). Power iteration would return the largest
  *magnitude* and can stall when the spectrum has a large negative part.

A loss closure takes the model and returns a scalar loss on fixed data (fixed noise and
timesteps for diffusion), so repeated calls are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

LossClosure = Callable[[nn.Module], torch.Tensor]
#: Parameter sets the Hessian is taken over.
PARAMETER_SETS = ("all", "weights")


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction with each filter scaled to its weight filter's norm; biases and
    normalisation parameters (one-dimensional) are left unperturbed."""
    direction = []
    for p in model.parameters():
        if p.ndim < 2:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        p_norm = p.detach().flatten(1).norm(dim=1)
        direction.append(d * (p_norm / d_norm).view(-1, *([1] * (p.ndim - 1))))
    return direction


@torch.no_grad()
def sharpness(
    model: nn.Module,
    loss_fn: LossClosure,
    sigmas: Sequence[float],
    num_directions: int = 5,
    seed: int = 0,
) -> dict[float, float]:
    """Mean symmetric loss increase (L(w + s d) + L(w - s d)) / 2 - L(w) over
    `num_directions` random filter-normalised directions d, for each sigma s."""
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    base = float(loss_fn(model))
    generator = torch.Generator(params[0].device).manual_seed(seed)
    directions = [filter_normalized_direction(model, generator) for _ in range(num_directions)]
    result = {}
    for sigma in sigmas:
        increases = []
        for direction in directions:
            both = []
            for sign in (1.0, -1.0):
                for p, w, d in zip(params, saved, direction, strict=True):
                    p.copy_(w + sign * sigma * d)
                both.append(float(loss_fn(model)))
            increases.append(sum(both) / 2 - base)
        result[float(sigma)] = sum(increases) / len(increases)
    for p, w in zip(params, saved, strict=True):
        p.copy_(w)
    model.train(was_training)
    return result


@dataclass(frozen=True)
class HessianEigenvalues:
    """Extreme Hessian eigenvalues over one parameter set."""

    largest: float
    smallest: float
    parameters: str  # "all" or "weights"
    num_parameters: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def hessian_parameters(model: nn.Module, parameters: str = "all") -> list[torch.Tensor]:
    """The trainable tensors of a parameter set: "all", or "weights" (two or more
    dimensions: convolutions, linear layers, attention; no biases, no norm scales/shifts)."""
    if parameters not in PARAMETER_SETS:
        raise ValueError(f"parameters must be one of {PARAMETER_SETS}, got {parameters!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    return trainable if parameters == "all" else [p for p in trainable if p.ndim >= 2]


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossClosure,
    parameters: str = "all",
    tol: float = 1e-4,
    max_iters: int | None = None,
    seed: int = 0,
) -> HessianEigenvalues:
    """Largest and smallest eigenvalue of the Hessian of `loss_fn` with respect to a
    parameter set (the rest held fixed), by Lanczos on Hessian-vector products.

    Attention runs on PyTorch's math kernel here: the fused ones have no double backward.
    """
    was_training = model.training
    model.eval()
    params = hessian_parameters(model, parameters)
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)

        def hvp(v: np.ndarray) -> np.ndarray:
            flat = torch.as_tensor(np.ravel(v), dtype=params[0].dtype, device=params[0].device)
            pieces = [c.view_as(p) for c, p in zip(flat.split(sizes), params, strict=True)]
            hv = torch.autograd.grad(grads, params, grad_outputs=pieces, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv]).double().cpu().numpy()

        operator = LinearOperator((n, n), matvec=hvp, dtype=np.float64)
        start = np.random.default_rng(seed).standard_normal(n)
        extremes = [
            float(eigsh(operator, k=1, which=which, tol=tol, maxiter=max_iters, v0=start,
                        return_eigenvectors=False)[0])  # fmt: skip
            for which in ("LA", "SA")
        ]
    model.train(was_training)
    return HessianEigenvalues(extremes[0], extremes[1], parameters, n)
