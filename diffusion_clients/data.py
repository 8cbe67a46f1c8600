"""Image data for the diffusion task and its federated splits.

Sources (run-config key `data`): `digits` (scikit-learn's bundled handwritten digits: real
images that need no download), `folder:/path` (an image folder, one sub-folder per class, or
flat) and `parquet:/path` (the benchmark builder's shards: `image` bytes and `cluster`
labels; a benchmark folder gives its own client shards). Images come back as float tensors
in [-1, 1], shape (N, C, S, S), with integer labels for Dirichlet splits.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageSet:
    """Images in [-1, 1] (N, C, S, S) with one integer label each."""

    images: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[torch.as_tensor(index, dtype=torch.long)], self.labels[index])


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size) in [-1, 1]."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def _decode(data: bytes, where: str, channels: int) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: cannot decode image ({err})") from err
    return np.asarray(image, dtype=np.float32) / 255.0


def _stack(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    tensors = [
        torch.from_numpy(a).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1) for a in arrays
    ]
    return torch.cat([_resize(t[None], size) for t in tensors])


def load_digits_set(image_size: int) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    return ImageSet(_resize(images, image_size), digits.target.astype(np.int64))


def load_folder_set(root: Path, image_size: int, channels: int) -> ImageSet:
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = (
        [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))]
        if classes
        else [(f, 0) for f in sorted(root.iterdir())]
    )
    files = [(f, y) for f, y in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = [_decode(f.read_bytes(), str(f), channels) for f, _ in files]
    return ImageSet(_stack(arrays, image_size), np.array([y for _, y in files], dtype=np.int64))


def load_parquet_set(path: Path, image_size: int, channels: int) -> ImageSet:
    """Rows of a builder shard: `image` (encoded bytes, non-null) and `cluster` (label)."""
    try:
        table = pq.read_table(path, columns=["image_id", "image", "cluster"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(
            f"{path}: not a shard with image_id, image, cluster columns ({err})"
        ) from err
    ids, blobs = table["image_id"].to_pylist(), table["image"].to_pylist()
    blobs = [b["bytes"] if isinstance(b, dict) else b for b in blobs]  # datasets.Image layout
    arrays = []
    for row, (image_id, blob) in enumerate(zip(ids, blobs, strict=True)):
        if blob is None:
            raise ValueError(f"{path}: record {row} (image_id {image_id}): field 'image' is null")
        arrays.append(
            _decode(blob, f"{path}: record {row} (image_id {image_id}): field 'image'", channels)
        )
    labels = np.asarray(table["cluster"].to_pylist(), dtype=np.int64)
    return ImageSet(_stack(arrays, image_size), labels)


def channels_of(spec: str) -> int:
    """Channels of a data source: the digits are grey, folders and shards are RGB."""
    return 1 if spec == "digits" else 3


def load_images(spec: str, image_size: int) -> ImageSet:
    """Every image of a source (for `parquet:` a single shard file)."""
    kind, _, where = spec.partition(":")
    if kind == "digits" and not where:
        return load_digits_set(image_size)
    if kind == "folder" and where:
        return load_folder_set(Path(where), image_size, channels_of(spec))
    if kind == "parquet" and where:
        return load_parquet_set(Path(where), image_size, channels_of(spec))
    raise ValueError(
        f"unknown data source {spec!r}; use 'digits', 'folder:/path' or 'parquet:/path'"
    )


def train_test_split(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded split, stratified by label so every class is in both halves."""
    from sklearn.model_selection import train_test_split as split

    index = np.arange(len(data))
    train, test = split(index, test_size=test_fraction, random_state=seed, stratify=data.labels)
    return data.subset(np.sort(train)), data.subset(np.sort(test))


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Row indices of each client: flwr-datasets' DirichletPartitioner over the labels."""
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.tolist(), "row": list(range(len(labels)))}
    )
    return [np.asarray(partitioner.load_partition(i)["row"]) for i in range(num_partitions)]


def benchmark_shard(root: Path, partition_id: int | None) -> Path:
    """A checksum-verified shard of a builder benchmark folder: client `partition_id`, or the
    test shard for None."""
    manifest = root / "manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        entry = meta["test"] if partition_id is None else meta["clients"][partition_id]
        path, digest = root / entry["file"], entry["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{manifest}: no usable entry for shard {partition_id} ({err!r})") from err
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
        raise ValueError(f"{path}: sha256 does not match {manifest}; refusing a modified shard")
    return path
