"""`DiffusionTask`: the diffusion workload behind the Task protocol the Flower app uses.

Run-config keys (all optional): `data` ("digits" | "folder:/path" | "parquet:/path"),
`image-size`, `unet` ("tiny" | "small" | "base"), `diffusion-steps`, `batch-size`,
`local-epochs`, `seed`, `dirichlet-alpha`, `test-fraction`, `device` ("auto" | "cpu" |
"cuda"), `dropout`, and for FID in `evaluate`: `eval-fid-samples` (0 = off) and
`eval-sampling-steps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusion_clients import data as imgdata
from diffusion_clients.model import build_unet
from diffusion_clients.sampling import make_scheduler, sample
from diffusion_clients.train import DenoisingLoss, NoisyBatches, mean_loss
from strategies.base import ArrayDict, ClientHalf, train_local
from strategies.batched import train_local_stacked

Config = Mapping[str, bool | int | float | str]

DEFAULTS: dict[str, bool | int | float | str] = {
    "data": "digits",
    "image-size": 16,
    "unet": "small",
    "diffusion-steps": 1000,
    "batch-size": 64,
    "local-epochs": 1,
    "seed": 0,
    "dirichlet-alpha": 0.5,
    "test-fraction": 0.2,
    "device": "auto",
    "eval-fid-samples": 0,
    "eval-sampling-steps": 20,
    "dropout": 0.0,
}


@dataclass(frozen=True)
class ClientImages:
    """One client's training images and the id that seeds its draws."""

    images: imgdata.ImageSet
    partition_id: int


def _get(config: Config, key: str) -> bool | int | float | str:
    return config.get(key, DEFAULTS[key])


def _device(config: Config) -> torch.device:
    name = str(_get(config, "device"))
    return torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )


@lru_cache(maxsize=4)
def _split(
    spec: str, image_size: int, test_fraction: float, seed: int
) -> tuple[imgdata.ImageSet, imgdata.ImageSet]:
    return imgdata.train_test_split(imgdata.load_images(spec, image_size), test_fraction, seed)


def _round_batches(
    data: ClientImages, config: Config, state: dict[str, ArrayDict], device: torch.device
) -> NoisyBatches:
    """This round's batches of one client, seeded by (seed, partition, the client's round
    counter kept in `state`), so each round draws fresh noise."""
    counter = state.setdefault("diffusion", {"rounds": np.zeros(1, dtype=np.int64)})
    round_seed = int(
        np.random.SeedSequence(
            [int(_get(config, "seed")), data.partition_id, int(counter["rounds"][0])]
        ).generate_state(1)[0]
    )
    counter["rounds"] = counter["rounds"] + 1
    steps = int(_get(config, "diffusion-steps"))
    images = data.images.images.to(device)
    return NoisyBatches(images, int(_get(config, "batch-size")), steps, round_seed)


class DiffusionTask:
    """Denoising diffusion (DDPM objective on a diffusers UNet) on federated image splits."""

    def build_model(self, config: Config) -> nn.Module:
        spec = str(_get(config, "data"))
        return build_unet(
            str(_get(config, "unet")),
            int(_get(config, "image-size")),
            imgdata.channels_of(spec),
            seed=int(_get(config, "seed")),
            dropout=float(_get(config, "dropout")),
        )

    def _benchmark(self, config: Config) -> Path | None:
        kind, _, where = str(_get(config, "data")).partition(":")
        root = Path(where)
        return root if kind == "parquet" and (root / "manifest.json").is_file() else None

    def load_partition(
        self, config: Config, partition_id: int, num_partitions: int
    ) -> ClientImages:
        size = int(_get(config, "image-size"))
        root = self._benchmark(config)
        if root is not None:
            shard = imgdata.benchmark_shard(root, partition_id)
            return ClientImages(imgdata.load_parquet_set(shard, size, 3), partition_id)
        train, _ = self._splits(config)
        parts = imgdata.dirichlet_partition(
            train.labels,
            num_partitions,
            float(_get(config, "dirichlet-alpha")),
            int(_get(config, "seed")),
        )
        return ClientImages(train.subset(parts[partition_id]), partition_id)

    def load_test(self, config: Config) -> imgdata.ImageSet:
        root = self._benchmark(config)
        if root is not None:
            shard = imgdata.benchmark_shard(root, None)
            return imgdata.load_parquet_set(shard, int(_get(config, "image-size")), 3)
        return self._splits(config)[1]

    def _splits(self, config: Config) -> tuple[imgdata.ImageSet, imgdata.ImageSet]:
        return _split(
            str(_get(config, "data")),
            int(_get(config, "image-size")),
            float(_get(config, "test-fraction")),
            int(_get(config, "seed")),
        )

    def train(
        self,
        model: nn.Module,
        data: ClientImages,
        half: ClientHalf,
        config: Config,
        incoming: Mapping[str, ArrayDict],
        state: dict[str, ArrayDict],
    ) -> tuple[int, dict[str, float], dict[str, ArrayDict]]:
        """Local DDPM training through `train_local`; a per-client round counter in `state`
        makes each round draw fresh noise."""
        device = _device(config)
        home = next(model.parameters()).device
        model.to(device)
        loss, outgoing = train_local(
            model,
            _round_batches(data, config, state, device),
            DenoisingLoss(make_scheduler(int(_get(config, "diffusion-steps")))),
            half,
            incoming,
            state,
            epochs=int(_get(config, "local-epochs")),
        )
        model.to(home)
        return len(data.images), {"train_loss": loss}, outgoing

    def train_many(
        self,
        models: Sequence[nn.Module],
        datas: Sequence[ClientImages],
        halves: Sequence[ClientHalf],
        configs: Sequence[Config],
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
        *,
        device: torch.device | str | None = None,
    ) -> list[tuple[int, dict[str, float], dict[str, ArrayDict]]]:
        """`train` for a round's clients at once (`strategies.batched`), on `device` (None:
        the run config's), with the step replayed from a CUDA graph on a GPU; each entry is
        what `train` returns for that client. The clients share every run-config setting
        but their seed. A CUDA `device` becomes the calling thread's current device, so
        that one thread per GPU can each train a share of a round's clients."""
        config = configs[0]
        device = _device(config) if device is None else torch.device(device)
        homes = [next(m.parameters()).device for m in models]
        with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
            for model in models:
                model.to(device)
            batches = [
                _round_batches(d, c, s, device)
                for d, c, s in zip(datas, configs, states, strict=True)
            ]
            results = train_local_stacked(
                models,
                batches,
                DenoisingLoss(make_scheduler(int(_get(config, "diffusion-steps")))),
                halves,
                incoming,
                states,
                epochs=int(_get(config, "local-epochs")),
                cuda_graph=device.type == "cuda",
            )
            for model, home in zip(models, homes, strict=True):
                model.to(home)
        return [
            (len(d.images), {"train_loss": loss}, outgoing)
            for d, (loss, outgoing) in zip(datas, results, strict=True)
        ]

    def evaluate(
        self, model: nn.Module, data: imgdata.ImageSet, config: Config
    ) -> tuple[int, dict[str, float]]:
        """Held-out denoising loss on one fixed draw; FID too when `eval-fid-samples` > 0."""
        device = _device(config)
        home = next(model.parameters()).device
        model.to(device)
        steps, seed = int(_get(config, "diffusion-steps")), int(_get(config, "seed"))
        scheduler = make_scheduler(steps)
        batches = list(
            NoisyBatches(data.images.to(device), int(_get(config, "batch-size")), steps, seed)
        )
        metrics = {"loss": mean_loss(model, DenoisingLoss(scheduler), batches)}
        num_fid = int(_get(config, "eval-fid-samples"))
        if num_fid > 0:
            from diffusion_clients.fid import fid_score

            fake = sample(
                model, scheduler, num_fid, int(_get(config, "eval-sampling-steps")), seed=seed
            )
            metrics["fid"] = fid_score(data.images, fake, device=device)
        model.to(home)
        return len(data), metrics
