"""A real Flower simulation (the app under `flwr run`, Ray backend): two FedSAM rounds of the
diffusion task on a tiny image folder."""

import json

import numpy as np
import pytest
from PIL import Image

from fedpsg.run.simulate import simulate


@pytest.mark.slow
def test_two_fedsam_rounds_on_diffusion_task(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    config = {
        "task": "diffusion",
        "strategy": "fedsam",
        "num-server-rounds": 2,
        "data": f"folder:{tmp_path / 'images'}",
        "image-size": 8,
        "unet": "tiny",
        "batch-size": 4,
        "lr": 0.02,
        "dirichlet-alpha": 100.0,
        "test-fraction": 0.25,
        "device": "cpu",
    }
    code = simulate(config, num_supernodes=2, out_dir=tmp_path / "run", timeout=600)
    assert code == 0, (tmp_path / "run" / "flwr_run.log").read_text()[-3000:]
    outputs = [p for p in (tmp_path / "run").rglob("*.json")]
    assert outputs, "the run wrote no results"
    text = " ".join(p.read_text() for p in outputs)
    assert "fedsam" in text
    json.loads(outputs[0].read_text())
