"""The client-half contract every algorithm implements, and the one local-training loop.

A task's training code never branches on the algorithm: it builds batches and a loss, and
`train_local` calls the client half's hooks. The base class is plain local SGD, i.e. FedAvg's
client half; FedProx adds a loss term, FedSAM replaces the step, SCAFFOLD corrects gradients
and sends its control variate back. Nothing here imports flwr, so tasks run without Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

ArrayDict = dict[str, np.ndarray]
Closure = Callable[[], torch.Tensor]


def config_value(
    config: Mapping[str, bool | int | float | str], key: str, kind: type, algorithm: str
) -> Any:
    """`config[key]` as `kind`, or a clear error naming the algorithm and the missing field."""
    if key not in config:
        raise KeyError(f"{algorithm}: train config has no {key!r} (sent keys: {sorted(config)})")
    value = config[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind):
        raise TypeError(f"{algorithm}: train config {key!r} = {value!r}, expected {kind.__name__}")
    return value


class ClientHalf:
    """Plain local SGD (FedAvg's client half), and the hooks other algorithms override.

    Parameters
    ----------
    lr : float
        Local learning rate.
    momentum : float
        SGD momentum.
    weight_decay : float
        SGD weight decay.
    """

    name = "fedavg"

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.num_steps = 0

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, bool | int | float | str],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> ClientHalf:
        """Build this client half from the train ConfigRecord its server half wrote."""
        return cls(lr, momentum=momentum, weight_decay=weight_decay)

    def begin(
        self,
        model: nn.Module,
        incoming: Mapping[str, ArrayDict],
        state: dict[str, ArrayDict],
    ) -> torch.optim.Optimizer:
        """Start a round: `model` holds the global weights; return the local optimizer.

        `incoming` holds the extra ArrayRecords the server sent (e.g. SCAFFOLD's `c`),
        `state` is this client's persistent state (kept by the app across rounds).
        """
        self.num_steps = 0
        return torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the task loss (FedProx's proximal term); None for none."""
        return None

    def step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, closure: Closure
    ) -> torch.Tensor:
        """One local optimizer step on one batch; `closure` zeroes grads, runs forward and
        backward on the *same* batch (same noise, same timesteps) each time it is called,
        and returns the loss."""
        loss = closure()
        optimizer.step()
        self.num_steps += 1
        return loss

    def end(self, model: nn.Module, state: dict[str, ArrayDict]) -> dict[str, ArrayDict]:
        """Finish a round: update `state`, return extra ArrayRecords to send to the server."""
        return {}


def train_local(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    half: ClientHalf,
    incoming: Mapping[str, ArrayDict] | None = None,
    state: dict[str, ArrayDict] | None = None,
    epochs: int = 1,
) -> tuple[float, dict[str, ArrayDict]]:
    """Run `epochs` passes over `batches` (an iterable re-iterated each epoch) with `half`.

    Returns the mean training loss and the extra arrays the client half wants to send.
    Any randomness of the loss (diffusion timesteps and noise) must be drawn in the batch,
    not inside `loss_fn`, so that SAM's second pass sees the same draw.
    """
    state = {} if state is None else state
    model.train()
    optimizer = half.begin(model, incoming or {}, state)
    total, count = 0.0, 0
    for _ in range(epochs):
        for batch in batches:

            def closure(batch: Any = batch) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                extra = half.loss_term(model)
                if extra is not None:
                    loss = loss + extra
                loss.backward()
                return loss

            loss = half.step(model, optimizer, closure)
            total += float(loss.detach())
            count += 1
    outgoing = half.end(model, state)
    return total / max(count, 1), outgoing
