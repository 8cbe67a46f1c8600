"""Noise schedule and samplers: diffusers' DDPM and DDIM schedulers, driven step by step.

One scheduler configuration (linear betas, epsilon prediction, trailing timestep spacing so
that a short sampler starts from the noisiest step) serves training and both samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


def make_scheduler(num_train_timesteps: int = 1000, clip_sample: bool = True) -> DDPMScheduler:
    """The DDPM noise schedule used for training (and as the config of every sampler)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=clip_sample,
        timestep_spacing="trailing",
    )


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """The model's noise prediction at timestep(s) `t` (a scalar is broadcast to the batch)."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return model(x, t).sample


@torch.no_grad()
def sample(
    model: nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int,
    num_steps: int,
    sampler: str = "ddpm",
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 512,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Draw `num_samples` images in [-1, 1] with `num_steps` DDPM or DDIM steps.

    `on_step(t, x_t, eps)` sees every intermediate sample and noise prediction (exposure bias
    is measured that way).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    device = next(model.parameters()).device
    cfg = model.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    generator = torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        steps = cls.from_config(scheduler.config)
        steps.set_timesteps(num_steps, device=device)
        x = torch.randn((n, *shape), generator=generator, device=device)
        for t in steps.timesteps:
            eps = predict_noise(model, x, t)
            if on_step is not None:
                on_step(int(t), x, eps)
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = steps.step(eps, t, x, generator=generator, **kwargs).prev_sample
        out.append(x.clamp(-1, 1))
    model.train(was_training)
    return torch.cat(out)
