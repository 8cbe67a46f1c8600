"""Shared by the strategy tests: an in-process Flower Grid and a federated least-squares problem.

`LocalGrid` delivers real flwr Messages to in-process node handlers (an exception becomes an
error reply, as a crashing ClientApp's does), so the server halves run their real
configure_train/aggregate_train. `LeastSquaresNode` is what a fedpsg ClientApp does: build the
client half from the train config, run `train_local`, reply with "arrays", "metrics" and the
client half's extra records.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from strategies import client_half, train_local
from strategies.base import ArrayDict
from strategies.server import to_numpy, to_record

Handler = Callable[[Message], RecordDict]


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, above all on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LocalGrid(Grid):
    """A Grid whose nodes are Python callables in this process."""

    def __init__(self, nodes: dict[int, Handler]) -> None:
        # This process plays the ServerApp: Flower's messages read their sender from here.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.nodes = nodes
        self._run = Run.create_empty(run_id=1)
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(next(self._ids))
            try:
                reply = Message(self.nodes[msg.metadata.dst_node_id](msg), reply_to=msg)
            except Exception as err:  # a crashing client: Flower replies with an error
                reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


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
