"""Flatness of a trained model, generic over any model and loss closure.

* `sharpness`: mean loss increase under random filter-normalised weight perturbations
  (Li et al., 2018) of relative size sigma: each filter of the direction is rescaled to the
  norm of the matching weight filter, so sigma is a size relative to the weights.
* `hessian_top_eigenvalue`: the largest Hessian eigenvalue by power iteration on
  Hessian-vector products (double backward).

A loss closure takes the model and returns a scalar loss on fixed data (fixed noise and
timesteps for diffusion), so repeated calls are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

LossClosure = Callable[[nn.Module], torch.Tensor]


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
    """Mean loss increase over `num_directions` random directions, for each sigma."""
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
            for p, w, d in zip(params, saved, direction, strict=True):
                p.copy_(w + sigma * d)
            increases.append(float(loss_fn(model)) - base)
        result[float(sigma)] = sum(increases) / len(increases)
    for p, w in zip(params, saved, strict=True):
        p.copy_(w)
    model.train(was_training)
    return result


def hessian_top_eigenvalue(
    model: nn.Module, loss_fn: LossClosure, num_iters: int = 20, tol: float = 1e-3, seed: int = 0
) -> float:
    """Largest-magnitude Hessian eigenvalue of `loss_fn` at the current weights.

    Attention runs on PyTorch's math kernel here: the fused ones have no double backward.
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(params[0].device).manual_seed(seed)
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
        v = [torch.randn(p.shape, generator=generator, device=p.device) for p in params]
        eigenvalue = 0.0
        for _ in range(num_iters):
            norm = torch.sqrt(sum((x * x).sum() for x in v))
            v = [x / norm for x in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            new = float(sum((h * x).sum() for h, x in zip(hv, v, strict=True)))
            v = [h.detach() for h in hv]
            converged = abs(new - eigenvalue) <= tol * max(abs(new), 1e-12)
            eigenvalue = new
            if converged:
                break
    model.train(was_training)
    return eigenvalue
