"""Shared by the strategy tests: a federated least-squares problem and its client.

With `strategies.local_grid.LocalGrid` the server halves run their real configure_train and
aggregate_train on real flwr Messages. `LeastSquaresNode` does what a fedpsg ClientApp does:
build the client half from the train config, run `train_local`, reply with "arrays",
"metrics" and the client half's extra records.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from torch import nn

from strategies import client_half, train_local
from strategies.base import ArrayDict
from strategies.local_grid import LocalGrid
from strategies.server import to_numpy, to_record


def heterogeneous_least_squares(
    num_clients: int = 4, n: int = 32, dim: int = 5, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clients with different optima and differently scaled features (different Hessians)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for i in range(num_clients):
        scale = 0.5 + 1.5 * torch.rand(dim, generator=gen)
        x = torch.randn(n, dim, generator=gen) * scale + 0.5 * i
        w_star = 3.0 * torch.randn(dim, 1, generator=gen)
        y = x @ w_star + 0.1 * torch.randn(n, 1, generator=gen)
        data.append((x, y))
    return data


def linear_model(dim: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(dim, 1)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.mean((model(x) - y) ** 2)


def global_loss(arrays: ArrayDict, data, make_model=linear_model) -> float:
    """Example-weighted MSE of the global model over all clients' data."""
    model = make_model()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    with torch.no_grad():
        total = sum(float(mse(model, d)) * len(d[0]) for d in data)
    return total / sum(len(d[0]) for d in data)


class LeastSquaresNode:
    """One client: trains on its shard with the client half named by the train config.

    `state` survives across rounds (what context.state is to a SuperNode). Reports the local
    training loss and its drift ||w_local - w_global|| as metrics.
    """

    def __init__(
        self,
        data: tuple[torch.Tensor, torch.Tensor],
        lr: float = 0.02,
        batch_size: int = 8,
        epochs: int = 1,
        make_model: Callable[[], nn.Module] = linear_model,
    ) -> None:
        self.data = data
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.make_model = make_model
        self.state: dict[str, ArrayDict] = {}

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.data
        return [
            (x[i : i + self.batch_size], y[i : i + self.batch_size])
            for i in range(0, len(x), self.batch_size)
        ]

    def __call__(self, msg: Message) -> RecordDict:
        content = msg.content
        model = self.make_model()
        model.load_state_dict(content["arrays"].to_torch_state_dict())
        if msg.metadata.message_type == MessageType.EVALUATE:
            with torch.no_grad():
                loss = float(mse(model, self.data))
            return RecordDict(
                {"metrics": MetricRecord({"num-examples": len(self.data[0]), "loss": loss})}
            )
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        half = client_half(content["config"], lr=self.lr)
        incoming = {k: to_numpy(v) for k, v in content.array_records.items() if k != "arrays"}
        loss, outgoing = train_local(
            model, self.batches(), mse, half, incoming, self.state, self.epochs
        )
        drift = float(
            torch.cat([p.detach().flatten() for p in model.parameters()]).sub(start).norm()
        )
        reply = RecordDict(
            {
                "arrays": to_record(
                    {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
                ),
                "metrics": MetricRecord(
                    {"num-examples": len(self.data[0]), "train-loss": loss, "drift": drift}
                ),
            }
        )
        for key, arrays in outgoing.items():
            reply[key] = to_record(arrays)
        return reply


def make_grid(data, **node_kwargs) -> tuple[LocalGrid, dict[int, LeastSquaresNode]]:
    """A LocalGrid with one LeastSquaresNode per shard, node ids 1..N."""
    nodes = {i + 1: LeastSquaresNode(d, **node_kwargs) for i, d in enumerate(data)}
    return LocalGrid(dict(nodes)), nodes


def initial_arrays(make_model=linear_model) -> ArrayDict:
    return {k: v.detach().numpy().copy() for k, v in make_model().state_dict().items()}
