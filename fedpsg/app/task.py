"""The one surface a workload shows the Flower app; implementations import no flwr.

The ServerApp and ClientApp look a task up by the run-config key `task` and call only these
methods, so the PSG task and the diffusion task are interchangeable under every strategy.
A task may also implement `Statistics`: the ServerApp then runs a statistics round before
round 1 and starts every strategy's model from the clients' summed statistics; and
`BatchedTraining`: an engine that holds a round's clients together (the in-process one) may
then train them in one call per device.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from strategies.base import ArrayDict, ClientHalf

RunConfig = Mapping[str, bool | int | float | str]
STATISTICS = "statistics"  # the statistics round: QUERY action and reply record name


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


@runtime_checkable
class Statistics(Protocol):
    """Optional task surface: statistics summed over every client before round 1 (the PSG
    frequency prior). The sum is all the server sees of them (see `sum_statistics`)."""

    def wants_statistics(self, config: RunConfig) -> bool:
        """Whether this run config needs the round (checked before anything is sent)."""

    def statistics(self, data: Any, config: RunConfig) -> dict[str, np.ndarray]:
        """This client's summand (named arrays; empty when the run config asks for none)."""

    def apply_statistics(
        self, model: nn.Module, statistics: Mapping[str, np.ndarray], config: RunConfig
    ) -> None:
        """Set `model` (freshly built) from the sum over all clients."""


@runtime_checkable
class BatchedTraining(Protocol):
    """Optional task surface: many clients' local training in one call on one device, each
    client getting what `Task.train` would give it alone (the clients share one model
    shape and every run-config setting but their seed)."""

    def train_many(
        self,
        models: Sequence[nn.Module],
        datas: Sequence[Any],
        halves: Sequence[ClientHalf],
        configs: Sequence[RunConfig],
        incoming: Sequence[Mapping[str, ArrayDict]],
        states: Sequence[dict[str, ArrayDict]],
        *,
        device: torch.device | None = None,
    ) -> list[tuple[int, dict[str, float], dict[str, ArrayDict]]]:
        """`Task.train` for each client, on `device` (None: the run config's)."""


def sum_statistics(parts: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Key-wise sum of the clients' statistics in float64, exact for counts below 2**53."""
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for key, value in part.items():
            value = np.asarray(value, dtype=np.float64)
            if key in total and total[key].shape != value.shape:
                raise ValueError(
                    f"statistics {key!r}: shapes {total[key].shape} and {value.shape} differ"
                )
            total[key] = total[key] + value if key in total else value.copy()
    return total


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
