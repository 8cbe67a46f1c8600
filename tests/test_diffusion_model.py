"""The denoiser learns, samples are well formed, and DDIM(eta=1) is DDPM where the math says."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusion_clients.data import load_digits_set
from diffusion_clients.model import build_unet
from diffusion_clients.sampling import make_scheduler, sample
from diffusion_clients.train import DenoisingLoss, NoisyBatches, mean_loss
from strategies.base import ClientHalf, train_local


def test_loss_decreases_on_digits():
    images = load_digits_set(8).images[:48]
    model = build_unet("tiny", 8, 1, seed=0)
    loss = DenoisingLoss(make_scheduler(100))
    fixed = list(NoisyBatches(images, 48, 100, seed=1))
    before = mean_loss(model, loss, fixed)
    train_local(model, NoisyBatches(images, 16, 100, 2), loss, ClientHalf(0.05, 0.9), epochs=4)
    after = mean_loss(model, loss, fixed)
    assert after < 0.7 * before


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samples_shape_and_range(sampler):
    model = build_unet("tiny", 8, 1, seed=0)
    x = sample(model, make_scheduler(100), 5, 4, sampler=sampler, batch_size=3)
    assert x.shape == (5, 1, 8, 8)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.05


def test_ddim_eta1_step_equals_ddpm_posterior_step():
    """With all timesteps and eta=1, DDIM's sigma_t^2 is DDPM's posterior variance and its
    mean is DDPM's posterior mean, so one step from the same (x_t, eps, z) agrees."""
    ddpm = make_scheduler(50, clip_sample=False)
    ddpm.set_timesteps(50)
    ddim = DDIMScheduler.from_config(ddpm.config)
    ddim.set_timesteps(50)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    g = torch.Generator().manual_seed(0)
    for t in ddpm.timesteps:
        x, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
        a = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        z = randn_tensor(eps.shape, generator=torch.Generator().manual_seed(int(t)))
        b = ddim.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_full_ddim_eta1_trajectory_equals_ddpm():
    model = build_unet("tiny", 8, 1, seed=0)
    scheduler = make_scheduler(10, clip_sample=False)
    a = sample(model, scheduler, 4, 10, sampler="ddpm", seed=3)
    b = sample(model, scheduler, 4, 10, sampler="ddim", eta=1.0, seed=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = sample(model, scheduler, 4, 10, sampler="ddim", eta=0.0, seed=3)
    assert not torch.allclose(a, c, atol=1e-2)


def test_unknown_size_and_sampler_are_refused():
    with pytest.raises(ValueError, match="unknown unet size"):
        build_unet("huge", 8, 1)
    with pytest.raises(ValueError, match="sampler"):
        sample(build_unet("tiny", 8, 1), DDPMScheduler(), 1, 2, sampler="euler")
