"""The centralized ("CL") baseline: the same model on the pooled client data, same budget.

Every table of federated results gets this row, as FL-PSG's do. The run config is the
federated one (`benchmark-dir`, `model`, `mode`, `lr`, `momentum`, `batch-size`, `seed`,
`features`, `device`, `model-*`) and `frequency-prior`: `pooled` (the default) starts the
frequency table at the prior counted on the pooled training data, the like-for-like row of a
federation's `federated` (whose summed client counts are the same table); `none` starts it at
zero, as a federation's `none` does. Training uses the FedAvg client half (plain SGD), so only
the data's location differs from a federated run.

Budget: a round in which `k` of `n` clients run `E` local epochs passes over `k / n * E` of the
pooled data in expectation, so `R` rounds match `budget_epochs(R, k, n, E)` centralized epochs.

    fedpsg centralized /abs/benchmark --epochs 5 --model motifs --out runs/cl
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpsg.psg.models import RelationModel, build_model
from fedpsg.psg.models.base import with_frequency_table
from fedpsg.psg.task import (
    benchmark_from_config,
    load_scenes,
    model_hparams,
    model_spec,
    prior_mode,
    uses_visual,
)
from fedpsg.psg.train import evaluate, frequency_prior, train
from strategies.base import ClientHalf


def budget_epochs(
    num_rounds: int, clients_per_round: int, num_clients: int, local_epochs: int = 1
) -> int:
    """Centralized epochs matching a federated run's passes over the pooled data (at least 1)."""
    return max(1, round(num_rounds * clients_per_round / num_clients * local_epochs))


@dataclass
class CentralizedResult:
    """Per-epoch test metrics (epoch 0 = before training) and the trained model."""

    history: list[dict[str, float]]
    model: RelationModel


def run_centralized(
    config: Mapping[str, Any],
    epochs: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> CentralizedResult:
    """Train `config["model"]` on all client shards pooled; evaluate on the test split after
    every epoch. `on_epoch` (opt-in) sees each history row as it is made."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    benchmark = benchmark_from_config(config)
    visual = uses_visual(benchmark, config)
    spec = model_spec(benchmark, visual)
    scenes = [
        scene
        for client in range(benchmark.num_clients)
        for scene in load_scenes(benchmark, client, visual)
    ]
    test = load_scenes(benchmark, None, visual)
    mode, seed = str(config.get("mode", "predcls")), int(config.get("seed", 0))
    device = torch.device(str(config.get("device", "cpu")))
    batch_size = int(config.get("batch-size", 16))
    prior = None
    if prior_mode({"frequency-prior": "pooled", **config}, ("none", "pooled")) == "pooled":
        prior = frequency_prior(scenes, spec.num_classes, spec.num_predicates)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        name, hparams = str(config.get("model", "motifs")), model_hparams(config)
        if prior is not None:
            hparams = with_frequency_table(name, hparams)
        model = build_model(name, spec, **hparams)
    if prior is not None:
        try:
            model.set_prior(prior)
        except ValueError as exc:
            raise ValueError(f"frequency-prior='pooled': {exc}") from None
    model.to(device)
    half = ClientHalf(
        float(config.get("lr", 0.03)),
        momentum=float(config.get("momentum", 0.0)),
        weight_decay=float(config.get("weight-decay", 0.0)),
    )
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(epochs + 1):
        loss = float("nan")
        if epoch:
            loss, _ = train(model, scenes, half, mode=mode, batch_size=batch_size,
                            seed=seed * 100_003 + epoch, device=device)  # fmt: skip
        metrics = evaluate(model, test, mode=mode, batch_size=batch_size, device=device)
        row = {
            "epoch": epoch,
            "train_loss": loss,
            "test_loss": metrics.pop("loss"),
            **metrics,
            "wall_s": time.perf_counter() - start,
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return CentralizedResult(history, model)


def write_outputs(result: CentralizedResult, out: Path) -> None:
    """metrics.json/.csv, the R@K / mR@K curve (recall.png) and the final weights (model.pt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.history, indent=2) + "\n")
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
    torch.save(result.model.state_dict(), out / "model.pt")
    epochs = [row["epoch"] for row in result.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("R@20", "R@50", "R@100", "mR@20", "mR@50", "mR@100"):
        style = "-" if key.startswith("R") else "--"
        ax.plot(epochs, [row[key] for row in result.history], style, marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="recall", title="Centralized baseline (test split)")
    ax.legend(ncol=2)
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=120)
    plt.close(fig)
