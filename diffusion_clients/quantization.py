"""Post-training weight-only quantization: per-output-channel, symmetric, round to nearest.

Every weight with two or more dimensions (convolutions, linear layers, attention
projections) is replaced by its fake-quantized value through PyTorch's
`fake_quantize_per_channel_affine`; biases and normalisation parameters stay in float, as in
weight-only PTQ. The model keeps float storage, so it runs anywhere and its outputs show the
quantization error alone.

`loss_damage` reports what quantization costs a model beside its own loss: the absolute rise
and the ratio quantized / float. Arms that end at different losses (SAM's is higher) are
compared by the ratio as well as the rise: a rise of 0.01 on a loss of 0.03 is a third, on
0.08 an eighth.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One step size per output channel: max |w| of the channel over the largest level."""
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_tensor(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`weight` rounded to `bits`-bit symmetric levels per output channel (dim 0)."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    scale = channel_scales(weight, bits).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    out = torch.fake_quantize_per_channel_affine(weight.float(), scale, zero, 0, -qmax, qmax)
    return out.to(weight.dtype)


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int) -> nn.Module:
    """A copy of `model` whose multi-dimensional weights are quantized to `bits` bits."""
    quantized = copy.deepcopy(model)
    for param in quantized.parameters():
        if param.ndim >= 2:
            param.copy_(quantize_tensor(param, bits))
    return quantized


def loss_damage(
    model: nn.Module, bits: int, loss_fn: Callable[[nn.Module], float]
) -> dict[str, float]:
    """`loss_fn` of `model` and of its `bits`-bit copy: float loss, quantized loss, the rise
    (quantized - float) and the ratio (quantized / float)."""
    before, after = float(loss_fn(model)), float(loss_fn(quantize_weights(model, bits)))
    return {"loss": before, "loss_q": after, "rise": after - before, "ratio": after / before}
