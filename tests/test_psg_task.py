"""PSGTask on a small built synthetic benchmark: the Task surface the Flower app drives."""

import shutil

import numpy as np
import pytest
import torch
from conftest import build_synthetic_benchmark

from benchmark_builder.shards import BenchmarkError
from fedpsg.app.task import load_task
from fedpsg.psg.data import VisualFeaturizer
from strategies.base import ClientHalf


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("psg_task")
    return build_synthetic_benchmark(root, 120, 3, num_clients=2, seed=0)


def config(benchmark_dir, **extra):
    return {
        "benchmark-dir": str(benchmark_dir),
        "model": "motifs",
        "mode": "predcls",
        "batch-size": 4,
        "local-epochs": 8,
        "seed": 0,
        "model-hidden-dim": 32,
        **extra,
    }


def test_train_improves_recall_over_the_untrained_model(benchmark_dir):
    task = load_task("psg")
    cfg = config(benchmark_dir)
    model = task.build_model(cfg)
    assert model.spec.visual_dim == VisualFeaturizer.dim  # the benchmark has pixels: auto = visual
    data = task.load_partition(cfg, 0, 2)
    test = task.load_test(cfg)
    assert all(scene.visual is not None for scene in data)
    _, before = task.evaluate(model, test, cfg)
    num_examples, metrics, extra = task.train(model, data, ClientHalf(0.1, 0.9), cfg, {}, {})
    count, after = task.evaluate(model, test, cfg)
    assert num_examples == len(data) > 0 and count == len(test) > 0
    assert np.isfinite(metrics["train_loss"]) and extra == {}
    names = ("R", "mR", "mR-present")
    assert set(after) == {"loss", *(f"{m}@{k}" for m in names for k in (20, 50, 100))}
    assert after["R@50"] > before["R@50"] + 0.3, (before, after)
    assert after["loss"] < before["loss"]


def test_build_model_is_seeded_and_geometry_mode_drops_pixels(benchmark_dir):
    task = load_task("psg")
    a, b = task.build_model(config(benchmark_dir)), task.build_model(config(benchmark_dir))
    c = task.build_model(config(benchmark_dir, seed=1))
    keys = list(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in keys)
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in keys)
    cfg = config(benchmark_dir, features="geometry", model="imp")
    assert task.build_model(cfg).spec.visual_dim == 0
    assert all(scene.visual is None for scene in task.load_partition(cfg, 1, 2))


def test_bad_partitions_and_folders_are_clear_errors(benchmark_dir, tmp_path):
    task = load_task("psg")
    with pytest.raises(BenchmarkError, match="no client 2"):
        task.load_partition(config(benchmark_dir), 2, 2)
    with pytest.raises(BenchmarkError, match="2 clients but the federation has 5"):
        task.load_partition(config(benchmark_dir), 0, 5)
    with pytest.raises(BenchmarkError, match="no manifest"):
        task.load_partition(config(tmp_path / "missing"), 0, 2)
    with pytest.raises(ValueError, match="absolute path"):
        task.build_model(config("relative/bench"))
    with pytest.raises(ValueError, match="features must be one of"):
        task.build_model(config(benchmark_dir, features="pixels"))
    tampered = tmp_path / "tampered"
    shutil.copytree(benchmark_dir, tampered)
    shard = tampered / "clients" / "client_00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-9] + b"tampered!")
    with pytest.raises(BenchmarkError, match=r"client_00001\.parquet: sha256 does not match"):
        task.load_partition(config(tampered), 1, 2)
    assert len(task.load_partition(config(tampered), 0, 2)) > 0  # the other shard still loads
