"""FID with the real offline Inception-v3: ~0 for a set against itself, larger once noised.

Inception at 299x299 is slow on a CPU, so the sets are three digits each.
"""

import torch

from diffusion_clients.data import load_digits_set
from diffusion_clients.fid import FIDScorer, InceptionFeatures, inception_path


def test_fid_self_zero_and_grows_with_noise():
    assert inception_path().is_file()
    real = load_digits_set(16).images[:3]
    scorer = FIDScorer(real)
    noisy = real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    same, worse = scorer(real), scorer(noisy.clamp(-1, 1))
    assert abs(same) < 1e-2
    assert worse > 10.0
    assert InceptionFeatures.num_features == 2048
