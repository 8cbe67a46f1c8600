"""Per-channel symmetric weight quantization: error bounds, levels, what it leaves alone, and
the loss damage (rise and ratio) of a hand-worked case."""

import pytest
import torch
from torch import nn

from diffusion_clients.model import build_unet
from diffusion_clients.quantization import (
    channel_scales,
    loss_damage,
    quantize_tensor,
    quantize_weights,
)


def test_8bit_error_at_most_half_a_step_per_channel():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16).view(-1, 1, 1, 1)
    q = quantize_tensor(w, 8)
    step = channel_scales(w, 8).view(-1, 1, 1, 1)
    assert ((q - w).abs() <= step / 2 + 1e-7 * step).all()
    levels = (q / step).flatten(1)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.abs().max() <= 127 + 1e-3


def test_fewer_bits_more_error_and_levels_bounded():
    w = torch.randn(32, 64)
    errors = {b: (quantize_tensor(w, b) - w).abs().mean() for b in (8, 6, 4)}
    assert errors[8] < errors[6] < errors[4]
    for row in quantize_tensor(w, 4):
        assert len(row.unique()) <= 15


def test_quantize_weights_copies_and_keeps_biases_and_norms():
    model = build_unet("tiny", 8, 1)
    q = quantize_weights(model, 4)
    for (name, p), qp in zip(model.named_parameters(), q.parameters(), strict=True):
        if p.ndim >= 2:
            assert not torch.equal(p, qp), name
        else:
            assert torch.equal(p, qp), name
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 500])
    assert q(x, t).sample.shape == (2, 1, 8, 8)


def test_loss_damage_rise_and_ratio_by_hand():
    """w = [1.0, 0.3] at 4 bits: step 1/7, 0.3 -> 2/7. On x = [0, 1], y = 0.5 the loss goes
    (0.3 - 0.5)^2 = 0.04 -> (2/7 - 0.5)^2 = 0.0459184: rise 0.0059184, ratio 1.14796."""
    model = nn.Linear(2, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.3]], dtype=torch.float64))
    x, y = torch.tensor([[0.0, 1.0]], dtype=torch.float64), 0.5
    damage = loss_damage(model, 4, lambda m: float(((m(x) - y) ** 2).mean()))
    q = (2 / 7 - 0.5) ** 2
    assert damage["loss"] == pytest.approx(0.04)
    assert damage["loss_q"] == pytest.approx(q)
    assert damage["rise"] == pytest.approx(q - 0.04)
    assert damage["ratio"] == pytest.approx(q / 0.04)
    assert model.weight[0, 1].item() == 0.3  # the model itself stays float
