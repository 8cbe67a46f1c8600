"""Exposure bias: how differently the model behaves on its own samples than on training inputs.

At every timestep of a sampler, compare the norm of the noise the model predicts along its
own sampling trajectory with the norm it predicts on real images forward-noised to the same
timestep (the inputs it was trained on). Training-time inputs give a predicted noise of
about unit RMS; a model that drifts off the training distribution while sampling predicts
noise of a different norm (Ning et al., 2024). The relative gap per timestep (the curve, not
only its mean: a small mean can hide a gap that grows at the last steps) and summaries of it
are reported.

Sign convention: gap_t = ||eps(x^_t)|| / ||eps(x_t)|| - 1, sampled over real. Ning et al.'s
exposure bias is an over-prediction while sampling, ||eps(x^_t)|| > ||eps(x_t)||, which their
Epsilon Scaling corrects by dividing the prediction by lambda_t > 1: in this convention their
effect is a positive gap and lambda_t = 1 + gap_t (`epsilon_scaling`). A negative gap is an
under-prediction, the opposite direction; Epsilon Scaling would enlarge it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import nn

from diffusion_clients.sampling import predict_noise, sample


@dataclass(frozen=True)
class ExposureBias:
    """Per sampling timestep (noisiest first): mean RMS of the predicted noise."""

    timesteps: np.ndarray
    sampled_norm: np.ndarray
    real_norm: np.ndarray

    @property
    def gap(self) -> np.ndarray:
        """Relative gap (sampled - real) / real per timestep."""
        return (self.sampled_norm - self.real_norm) / self.real_norm

    @property
    def epsilon_scaling(self) -> np.ndarray:
        """Ning et al.'s lambda_t per timestep: sampled / real (> 1 is their exposure bias)."""
        return self.sampled_norm / self.real_norm

    @property
    def mean_gap(self) -> float:
        return float(np.mean(self.gap))

    @property
    def mean_abs_gap(self) -> float:
        """Mean |gap|: gaps of both signs do not cancel."""
        return float(np.mean(np.abs(self.gap)))

    @property
    def largest_gap(self) -> float:
        """The gap of largest magnitude along the trajectory, with its sign."""
        return float(self.gap[np.argmax(np.abs(self.gap))])

    def as_dict(self) -> dict[str, list[float] | float]:
        return {
            "timesteps": self.timesteps.tolist(),
            "sampled_norm": self.sampled_norm.tolist(),
            "real_norm": self.real_norm.tolist(),
            "gap": self.gap.tolist(),
            "epsilon_scaling": self.epsilon_scaling.tolist(),
            "mean_gap": self.mean_gap,
            "mean_abs_gap": self.mean_abs_gap,
            "largest_gap": self.largest_gap,
        }


def _rms(eps: torch.Tensor) -> torch.Tensor:
    return eps.float().flatten(1).pow(2).mean(dim=1).sqrt()


@torch.no_grad()
def exposure_bias(
    model: nn.Module,
    scheduler: DDPMScheduler,
    real_images: torch.Tensor,
    num_steps: int,
    sampler: str = "ddpm",
    seed: int = 0,
) -> ExposureBias:
    """Noise-norm gap along a `num_steps` sampler, with as many samples as real images."""
    sampled: dict[int, list[torch.Tensor]] = {}

    def record(t: int, x: torch.Tensor, eps: torch.Tensor) -> None:
        sampled.setdefault(t, []).append(_rms(eps))

    sample(
        model, scheduler, len(real_images), num_steps, sampler=sampler, seed=seed, on_step=record
    )
    timesteps = list(sampled)
    device = next(model.parameters()).device
    real = real_images.to(device)
    generator = torch.Generator(device).manual_seed(seed + 1)
    was_training = model.training
    model.eval()
    real_norm = []
    for t in timesteps:
        noise = torch.randn(real.shape, generator=generator, device=device)
        tt = torch.full((len(real),), t, device=device, dtype=torch.long)
        real_norm.append(
            float(_rms(predict_noise(model, scheduler.add_noise(real, noise, tt), tt)).mean())
        )
    model.train(was_training)
    return ExposureBias(
        np.asarray(timesteps),
        np.asarray([float(torch.cat(sampled[t]).mean()) for t in timesteps]),
        np.asarray(real_norm),
    )
