"""The one surface a workload shows the Flower app; implementations import no flwr.

The ServerApp and ClientApp look a task up by the run-config key `task` and call only these
methods, so the PSG task and the diffusion task are interchangeable under every strategy.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from strategies.base import ArrayDict, ClientHalf

RunConfig = Mapping[str, bool | int | float | str]


class Task(Protocol):
    """A federated workload: a model, its data, local training and evaluation."""

    def build_model(self, config: RunConfig) -> nn.Module:
        """A freshly initialised model (seeded by `config["seed"]`)."""

    def load_partition(self, config: RunConfig, partition_id: int, num_partitions: int) -> Any:
        """This client's training data; raise a clear error if it is missing or corrupt."""

    def load_test(self, config: RunConfig) -> Any:
        """The held-out data the server evaluates the global model on."""

    def train(
        self,
        model: nn.Module,
        data: Any,
        half: ClientHalf,
        config: RunConfig,
        incoming: Mapping[str, ArrayDict],
        state: dict[str, ArrayDict],
    ) -> tuple[int, dict[str, float], dict[str, ArrayDict]]:
        """Local training with `half`; returns (num examples, metrics, extra arrays to send)."""

    def evaluate(
        self, model: nn.Module, data: Any, config: RunConfig
    ) -> tuple[int, dict[str, float]]:
        """Evaluate `model` on `data`; returns (num examples, metrics)."""


TASKS = {
    "psg": "fedpsg.psg.task:PSGTask",
    "diffusion": "diffusion_clients.task:DiffusionTask",
}


def load_task(name: str) -> Task:
    """Instantiate the task registered under `name` (imported lazily: tasks are heavy)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
