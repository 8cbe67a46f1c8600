"""The denoiser: diffusers' UNet2DModel in a few named sizes.

GroupNorm, a sinusoidal time embedding and self-attention at the lowest resolution come
from diffusers; the sizes here only choose widths and depth so that CPU tests stay tiny and
the GPU experiment gets a real model.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

#: name -> (block widths, resnet layers per block, GroupNorm groups)
UNET_SIZES: dict[str, tuple[tuple[int, ...], int, int]] = {
    "tiny": ((16, 32), 1, 8),
    "small": ((32, 64, 64), 1, 16),
    "base": ((64, 128, 128), 2, 32),
}


def build_unet(
    size: str, image_size: int, channels: int, seed: int = 0, dropout: float = 0.0
) -> UNet2DModel:
    """A freshly initialised UNet2DModel; attention only in the lowest-resolution block;
    `dropout` in every resnet block (ADM's regulariser; no parameters, so the weights of
    models with and without it are interchangeable)."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown unet size {size!r}; choose one of {sorted(UNET_SIZES)}")
    widths, layers, groups = UNET_SIZES[size]
    levels = len(widths)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"image-size {image_size} must be divisible by {2 ** (levels - 1)}")
    down = ("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=layers,
            block_out_channels=widths,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=groups,
            attention_head_dim=8,
            dropout=dropout,
        )
