"""The centralized (CL) baseline: MOTIFS must learn what geometry decides on synthetic data,
and stay at or above the frequency baseline on real annotations (labels + geometry only)."""

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import build_synthetic_benchmark
from typer.testing import CliRunner

from benchmark_builder.shards import image_row
from fedpsg.psg.centralized import budget_epochs, run_centralized, write_outputs
from fedpsg.psg.data import GEOMETRY_DIM, PAIR_GEOMETRY_DIM, scenes_from_rows
from fedpsg.psg.models import ModelSpec, build_model
from fedpsg.psg.train import evaluate, frequency_prior, train
from fedpsg.run.cli import app
from strategies.base import ClientHalf

KEYS = [f"{m}@{k}" for m in ("R", "mR") for k in (20, 50, 100)]




@pytest.fixture(scope="module")
def synthetic_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("psg_cl")
    return build_synthetic_benchmark(root, 360, 1, num_clients=3, seed=0)


def test_motifs_clearly_beats_frequency_on_synthetic(synthetic_benchmark, tmp_path):
    config = {
        "benchmark-dir": str(synthetic_benchmark),
        "features": "geometry",
        "batch-size": 8,
        "lr": 0.1,
        "momentum": 0.9,
        "seed": 0,
        "model-hidden-dim": 32,
    }
    frequency = run_centralized({**config, "model": "frequency"}, epochs=0).history[-1]
    result = run_centralized({**config, "model": "motifs"}, epochs=5)
    first, last = result.history[0], result.history[-1]
    # Untrained MOTIFS scores exactly as its frequency bias (zero-initialised predicate head).
    assert first["R@50"] == pytest.approx(frequency["R@50"])
    assert last["R@50"] > frequency["R@50"] + 0.1, (frequency, last)
    assert last["mR@50"] > frequency["mR@50"] + 0.1, (frequency, last)
    write_outputs(result, tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(6)) and set(KEYS) <= set(rows[0])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,test_loss")
    assert (tmp_path / "recall.png").stat().st_size > 0
    assert set(torch.load(tmp_path / "model.pt")) == set(result.model.state_dict())


def test_cli_reports_a_missing_benchmark_and_budget_matches_rounds(tmp_path):
    outcome = CliRunner().invoke(
        app, ["centralized", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert outcome.exit_code == 1 and "no manifest" in outcome.output
    assert not (tmp_path / "o").exists()
    # FL-PSG: 100 rounds, 5 of 100 clients, 1 local epoch = 5 passes over the pooled data.
    assert budget_epochs(100, 5, 100, 1) == 5 and budget_epochs(3, 1, 100) == 1


def test_real_annotations_frequency_and_motifs_are_sensible(real_psg_path):
    with gzip.open(real_psg_path, "rt") as handle:
        doc = json.load(handle)
    order = np.random.default_rng(0).permutation(len(doc["data"]))
    rows = [image_row(doc["data"][i], 0, None) for i in order[:2000]]
    train_scenes, test_scenes = scenes_from_rows(rows[:1500]), scenes_from_rows(rows[1500:])
    num_classes = len(doc["thing_classes"]) + len(doc["stuff_classes"])
    num_predicates = len(doc["predicate_classes"])
    spec = ModelSpec(num_classes, num_predicates, GEOMETRY_DIM, PAIR_GEOMETRY_DIM)
    prior = frequency_prior(train_scenes, num_classes, num_predicates)
    frequency = evaluate(build_model("frequency", spec, prior), test_scenes)
    torch.manual_seed(0)
    motifs = build_model("motifs", spec, prior)
    train(motifs, train_scenes, ClientHalf(0.03, momentum=0.9), epochs=2, seed=0)
    trained = evaluate(motifs, test_scenes)
    for metrics in (frequency, trained):
        assert 0.3 < metrics["R@20"] <= metrics["R@50"] <= metrics["R@100"] < 0.9
        assert 0.05 < metrics["mR@20"] <= metrics["mR@50"] <= metrics["mR@100"] < metrics["R@100"]
    assert trained["R@50"] >= frequency["R@50"] and trained["mR@50"] >= frequency["mR@50"]
