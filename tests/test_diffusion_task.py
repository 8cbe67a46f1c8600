"""DiffusionTask behind the Task protocol: data sources, Dirichlet splits, training through the
client halves (FedSAM's two passes see one draw), evaluation, clear errors on bad input."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_clients.data import dirichlet_partition, load_images
from diffusion_clients.train import DenoisingLoss
from fedpsg.app.task import load_task
from strategies import client_half
from strategies.base import train_local

CONFIG = {"unet": "tiny", "image-size": 8, "batch-size": 32, "seed": 0, "device": "cpu"}


def _label_share(labels, parts):
    """Mean share of each client's largest label."""
    return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])


def test_dirichlet_heterogeneity_moves_with_alpha():
    labels = load_images("digits", 8).labels
    skewed = dirichlet_partition(labels, 10, 0.1, seed=0)
    even = dirichlet_partition(labels, 10, 100.0, seed=0)
    assert sum(map(len, skewed)) == len(labels)
    assert len(np.unique(np.concatenate(skewed))) == len(labels)
    assert _label_share(labels, skewed) > 2 * _label_share(labels, even)


def test_train_and_evaluate_through_the_protocol():
    task = load_task("diffusion")
    model = task.build_model(CONFIG)
    part = task.load_partition(CONFIG, 1, 20)
    test = task.load_test(CONFIG)
    assert part.images.images.shape[1:] == (1, 8, 8) and len(test) == 360
    _, before = task.evaluate(model, test, CONFIG)
    state = {}
    half = client_half({"algorithm": "fedavg"}, lr=0.05, momentum=0.9)
    n, metrics, extra = task.train(model, part, half, {**CONFIG, "local-epochs": 3}, {}, state)
    assert n == len(part.images) and np.isfinite(metrics["train_loss"]) and extra == {}
    assert state["diffusion"]["rounds"][0] == 1
    _, after = task.evaluate(model, test, CONFIG)
    assert after["loss"] < before["loss"]


def test_fedsam_second_pass_reuses_timesteps_and_noise():
    task = load_task("diffusion")
    model = task.build_model(CONFIG)
    images = task.load_partition(CONFIG, 0, 20).images.images
    from diffusion_clients.sampling import make_scheduler
    from diffusion_clients.train import NoisyBatches

    seen = []
    loss = DenoisingLoss(make_scheduler(1000))

    def recording_loss(m, batch):
        seen.append((batch.timesteps.clone(), batch.noise.clone()))
        return loss(m, batch)

    half = client_half({"algorithm": "fedsam", "rho": 0.5, "adaptive": False}, lr=0.01)
    batches = NoisyBatches(images[:48], 16, 1000, seed=0)
    train_local(model, batches, recording_loss, half)
    assert len(seen) == 2 * half.num_steps == 6
    for (t1, n1), (t2, n2) in zip(seen[::2], seen[1::2], strict=True):
        assert torch.equal(t1, t2) and torch.equal(n1, n2)
    assert not torch.equal(seen[0][1], seen[2][1])


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_and_parquet_sources(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / label / f"{i}.png"
            )
    data = load_images(f"folder:{tmp_path / 'folder'}", 8)
    assert data.images.shape == (6, 3, 8, 8) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.min() >= -1 and data.images.max() <= 1
    blobs = [_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    table = pa.table({"image_id": ["a", "b", "c"], "image": blobs, "cluster": [0, 1, 1]})
    pq.write_table(table, tmp_path / "shard.parquet")
    shard = load_images(f"parquet:{tmp_path / 'shard.parquet'}", 8)
    assert shard.images.shape == (3, 3, 8, 8) and shard.labels.tolist() == [0, 1, 1]
    bad = pa.table({"image_id": ["a", "b"], "image": [blobs[0], None], "cluster": [0, 1]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: record 1 \(image_id b\): field 'image'"):
        load_images(f"parquet:{tmp_path / 'bad.parquet'}", 8)
    with pytest.raises(ValueError, match="unknown data source"):
        load_images("cifar", 8)
