"""Exposure bias on denoisers whose behaviour is known in closed form.

For data that is a single image x*, the exact noise predictor is
eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t): along its own DDPM trajectory the
inputs are distributed exactly as forward-noised data, so the gap is ~0. A predictor that
over-shoots the noise drives samples off that distribution, and the gap shows it.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_clients.exposure import ExposureBias, exposure_bias
from diffusion_clients.sampling import make_scheduler


class PointMassDenoiser(nn.Module):
    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor, gain: float = 1.0):
        super().__init__()
        self.target = nn.Parameter(target, requires_grad=False)
        self.abar = alphas_cumprod
        self.gain = gain
        self.config = SimpleNamespace(in_channels=target.shape[0], sample_size=target.shape[-1])

    def forward(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.target) / (1 - abar).sqrt()
        return SimpleNamespace(sample=self.gain * eps)


def test_exact_denoiser_has_no_gap_and_a_biased_one_does():
    scheduler = make_scheduler(1000, clip_sample=False)
    target = torch.rand(1, 8, 8) * 2 - 1
    real = target.expand(64, -1, -1, -1).clone()
    exact = exposure_bias(PointMassDenoiser(target, scheduler.alphas_cumprod), scheduler, real, 20)
    assert len(exact.timesteps) == 20 and exact.timesteps[0] > exact.timesteps[-1]
    assert np.abs(exact.gap).max() < 0.05
    np.testing.assert_allclose(exact.real_norm, 1.0, atol=0.05)
    biased_model = PointMassDenoiser(target, scheduler.alphas_cumprod, gain=1.3)
    biased = exposure_bias(biased_model, scheduler, real, 20)
    assert abs(biased.mean_gap) > 0.1
    summary = biased.as_dict()
    assert summary["mean_gap"] == biased.mean_gap and len(summary["gap"]) == 20


def test_curve_summaries_and_sign_convention_by_hand():
    """Sampled norms 1.2, 1.0, 0.8 against real 1.0 everywhere: gap +0.2, 0, -0.2 (positive =
    Ning et al.'s over-prediction, their lambda_t = 1.2 there); the mean hides both ends."""
    eb = ExposureBias(np.array([999, 500, 0]), np.array([1.2, 1.0, 0.8]), np.ones(3))
    np.testing.assert_allclose(eb.gap, [0.2, 0.0, -0.2])
    np.testing.assert_allclose(eb.epsilon_scaling, [1.2, 1.0, 0.8])
    assert abs(eb.mean_gap) < 1e-12
    assert eb.mean_abs_gap == pytest.approx(0.4 / 3)
    assert eb.largest_gap == pytest.approx(0.2)
    curve = eb.as_dict()
    assert curve["timesteps"] == [999, 500, 0]
    np.testing.assert_allclose(curve["gap"], [0.2, 0.0, -0.2])
