"""FID with the real offline Inception-v3: ~0 for a set against itself, larger once noised
(Inception at 299x299 is slow on a CPU, so the sets are three digits each); the real-vs-real
floor against the Frechet formula computed independently.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from diffusion_clients.data import load_digits_set
from diffusion_clients.fid import FIDScorer, InceptionFeatures, inception_path, split_halves_fid


def test_fid_self_zero_and_grows_with_noise():
    assert inception_path().is_file()
    real = load_digits_set(16).images[:3]
    scorer = FIDScorer(real)
    noisy = real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    same, worse = scorer(real), scorer(noisy.clamp(-1, 1))
    assert abs(same) < 1e-2
    assert worse > 10.0
    assert InceptionFeatures.num_features == 2048


class _PooledPixels(nn.Module):
    """A small stand-in extractor (images in [0, 1] -> 4x4 average-pooled pixels and their
    squares: 32 features), so the Frechet formula can be checked on CPU in milliseconds."""

    num_features = 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 4).flatten(1)
        return torch.cat([pooled, pooled**2], dim=1)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), by scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_split_halves_floor_matches_the_frechet_formula():
    """Two disjoint random halves of 400 real digits, against an independent NumPy/SciPy
    computation of the same halves' statistics; the floor is well above zero and larger at
    a smaller N, as the audit measured with Inception (about 10 at N=900, 35 at N=100)."""
    images = load_digits_set(16).images[:400]
    extractor = _PooledPixels()
    got = split_halves_fid(images, seed=5, features=extractor)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(5))
    feats = extractor(((images + 1) / 2).clamp(0, 1)).double().numpy()
    expected = _frechet(feats[order[:200].numpy()], feats[order[200:].numpy()])
    assert got == pytest.approx(expected, rel=1e-4)
    assert got > 0
    assert split_halves_fid(images[:60], seed=5, features=extractor) > got
