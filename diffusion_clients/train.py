"""The DDPM objective and its batches, for `strategies.base.train_local`.

Timesteps and noise are drawn when a batch is built, never inside the loss, so a client half
that evaluates the loss twice on one batch (FedSAM's ascent and descent passes) sees one draw.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler
from torch import nn

from diffusion_clients.sampling import predict_noise


class NoisyBatch(NamedTuple):
    """Clean images with the noise and timesteps drawn for them (a NamedTuple, so that
    `strategies.batched` can stack and vmap it)."""

    images: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


class NoisyBatches:
    """Re-iterable mini-batches: every pass shuffles and draws fresh timesteps and noise.

    Parameters
    ----------
    images : torch.Tensor
        Training images in [-1, 1], already on the training device.
    batch_size : int
        Images per batch (the last batch of a pass may be smaller).
    num_train_timesteps : int
        Timesteps are drawn uniformly from [0, num_train_timesteps).
    seed : int
        Seeds the shuffles and draws, so a run is reproducible.
    """

    def __init__(
        self, images: torch.Tensor, batch_size: int, num_train_timesteps: int, seed: int
    ) -> None:
        self.images = images
        self.batch_size = batch_size
        self.num_train_timesteps = num_train_timesteps
        self.generator = torch.Generator(images.device).manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[NoisyBatch]:
        device, g = self.images.device, self.generator
        order = torch.randperm(len(self.images), generator=g, device=device)
        for start in range(0, len(order), self.batch_size):
            x = self.images[order[start : start + self.batch_size]]
            noise = torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
            t = torch.randint(0, self.num_train_timesteps, (len(x),), generator=g, device=device)
            yield NoisyBatch(x, noise, t)


class DenoisingLoss:
    """The DDPM training loss: mean squared error of the predicted noise.

    Parameters
    ----------
    scheduler : DDPMScheduler
        Gives the forward process (`add_noise`).
    autocast : bool
        Run the model under bfloat16 autocast (GPU throughput); the loss stays in the
        noise's dtype (float32).
    """

    def __init__(self, scheduler: DDPMScheduler, autocast: bool = False) -> None:
        self.scheduler = scheduler
        self.autocast = autocast

    def __call__(self, model: nn.Module, batch: NoisyBatch) -> torch.Tensor:
        return self.per_sample(model, batch).mean()

    def per_sample(self, model: nn.Module, batch: NoisyBatch) -> torch.Tensor:
        """Each image's mean squared error, shape (B,): the client-batched engine weights
        the padding of a short batch out of it."""
        noisy = self.scheduler.add_noise(batch.images, batch.noise, batch.timesteps)
        device = noisy.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.autocast):
            eps = predict_noise(model, noisy, batch.timesteps)
        return (eps.to(batch.noise.dtype) - batch.noise).square().flatten(1).mean(1)


@torch.no_grad()
def mean_loss(model: nn.Module, loss: DenoisingLoss, batches: Iterable[NoisyBatch]) -> float:
    """Image-weighted mean loss over `batches`; pass a list (one fixed draw) to compare models."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(loss(model, batch)) * len(batch.images)
        count += len(batch.images)
    model.train(was_training)
    return total / max(count, 1)
